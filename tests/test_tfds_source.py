"""tfds_source: rows staged as a TFDS array_record dataset read back (sources.read_rows) exactly as
sources.read_file reads the files (bad rows and reasons included), from a local dir or a remote
(fsspec) one, and data.build packs identical batches from 'files' and 'tfds'.
"""
import gzip
import json
import os

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed: pip install -e '.[tfds]'")

from gpt2_lora_jax import config, data, sources, tfds_source  # noqa: E402

FIELDS = ("chosen", "rejected")


def conversation(i: int, reply: str = "Sure.") -> str:
  return f"\n\nHuman: Question {i}?\n\nAssistant: {reply} ({i})"


def write_rows(path, lines):
  """Writes raw JSONL lines (str) to path, gzipped when it ends in .gz."""
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wt", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return str(path)


@pytest.fixture()
def small_files(tmp_path):
  """Two train files (one gzipped) and a test file, with every kind of bad row sources.read_file knows."""
  good = [json.dumps({"chosen": conversation(i), "rejected": conversation(i, "No.")}) for i in range(6)]
  bad = ['{"chosen": "unterminated',  # invalid_json in both fields
         json.dumps({"chosen": conversation(90)}),  # rejected: missing_field
         json.dumps({"chosen": 7, "rejected": None}),  # field_not_string / missing_field
         '{"chosen": "\\ud800 lone surrogate", "rejected": "x"}',  # chosen: not_utf8
         ""]  # a blank line is not a row
  train_a = write_rows(tmp_path / "train_a.jsonl", good[:3] + bad)
  train_b = write_rows(tmp_path / "train_b.jsonl.gz", good[3:] + [json.dumps({"chosen": "ü ✓ 😀", "rejected": ""})])
  test = write_rows(tmp_path / "test.jsonl", good[:2])
  return {"train": [train_a, train_b], "test": [test]}


def file_rows(paths, field):
  return [row for path in paths for row in sources.read_file(path, field)]


def test_rows_equal_the_local_file_rows_bad_rows_included(small_files, tmp_path):
  data_dir = str(tmp_path / "tfds")
  out_dir = tfds_source.prepare(small_files, data_dir)
  assert out_dir == sources.dataset_dir(data_dir) and os.path.isdir(out_dir)
  for split, paths in small_files.items():
    for field in FIELDS:
      expected = file_rows(paths, field)
      assert sources.read_rows(data_dir, split, field) == expected
  reasons = [reason for _, reason in sources.read_rows(data_dir, "train", "chosen")]
  assert reasons[3:7] == ["invalid_json", None, "field_not_string", "not_utf8"]
  assert tfds_source.stored_inputs(data_dir) == tfds_source.describe_inputs(small_files)


def test_real_hh_rows_round_trip(hh_test_file, tmp_path):
  data_dir = str(tmp_path / "tfds")
  tfds_source.prepare({"test": [hh_test_file]}, data_dir)
  for field in FIELDS:
    rows = sources.read_rows(data_dir, "test", field)
    assert len(rows) == 2312
    assert rows == sources.read_file(hh_test_file, field)


def test_data_build_gives_identical_batches_from_files_and_tfds(hh_test_file, tokenizer, tmp_path):
  assert "tfds" in data.SOURCES  # data._inputs dispatches source='tfds' to sources.input_for
  data_dir = str(tmp_path / "tfds")
  tfds_source.prepare({"train": [hh_test_file], "test": [hh_test_file]}, data_dir)

  files_cfg = config.default_config().data
  files_cfg.source = "files"
  files_cfg.train_files = (hh_test_file,)
  files_cfg.max_length = 512
  tfds_cfg = config.default_config().data
  tfds_cfg.max_length = 512
  tfds_cfg.source = "tfds"
  if "tfds_dir" not in tfds_cfg:  # config.py's field (c.data.tfds_dir) may not be committed yet
    tfds_cfg.tfds_dir = ""
  tfds_cfg.tfds_dir = data_dir

  batch_size = 8
  packed_files, summary_files = data.build(files_cfg, tokenizer, "train", batch_size,
                                           cache_dir=str(tmp_path / "cache_files"), log=None)
  packed_tfds, summary_tfds = data.build(tfds_cfg, tokenizer, "train", batch_size,
                                         cache_dir=str(tmp_path / "cache_tfds"), log=None)
  assert summary_tfds["inputs"] == [f"tfds {sources.dataset_dir(data_dir)} (split train)"]
  assert not summary_tfds["token_cache"]["from_cache"]  # tokenised again, independently
  for key in ("rows_read", "rows_used", "rows_truncated", "rows_bad", "rows_skipped", "tokens",
              "loss_tokens", "packed_rows"):
    assert summary_tfds[key] == summary_files[key], key
  for name in ("inputs", "targets", "loss_mask", "segment_ids", "positions", "conversation_rows"):
    np.testing.assert_array_equal(getattr(packed_tfds, name), getattr(packed_files, name), err_msg=name)
  for step in (0, 1, 57):
    batch_files = data.batch_for_step(packed_files, seed=3, step=step, global_batch_size=batch_size)
    batch_tfds = data.batch_for_step(packed_tfds, seed=3, step=step, global_batch_size=batch_size)
    assert batch_tfds.keys() == batch_files.keys()
    for key in batch_files:
      np.testing.assert_array_equal(batch_tfds[key], batch_files[key], err_msg=f"step {step} {key}")


def test_prepare_reuses_refuses_and_overwrites(small_files, tmp_path):
  data_dir = str(tmp_path / "tfds")
  out_dir = tfds_source.prepare(small_files, data_dir)
  shard = next(name for name in os.listdir(out_dir) if ".array_record" in name)
  written = os.path.getmtime(os.path.join(out_dir, shard))
  assert tfds_source.prepare(small_files, data_dir) == out_dir  # same bytes: reused as it is
  assert os.path.getmtime(os.path.join(out_dir, shard)) == written
  other = {"train": small_files["test"]}
  with pytest.raises(ValueError, match="other inputs.*overwrite"):
    tfds_source.prepare(other, data_dir)
  tfds_source.prepare(other, data_dir, overwrite=True)
  assert sources.read_rows(data_dir, "train", "chosen") == file_rows(small_files["test"], "chosen")
  with pytest.raises(ValueError, match="no split 'test'.*\\['train'\\]"):
    sources.read_rows(data_dir, "test", "chosen")


def test_remote_data_dir_is_staged_and_read_through_a_local_copy(small_files, tmp_path):
  """memory:// stands in for gs://: both go through fsspec (gs:// with gcsfs)."""
  fsspec = pytest.importorskip("fsspec")
  remote = f"memory://bucket-{tmp_path.name}/tfds"
  cache = str(tmp_path / "cache")
  try:
    assert tfds_source.prepare(small_files, remote) == sources.dataset_dir(remote)
    assert sources.read_rows(remote, "train", "rejected", cache_dir=cache) == \
        file_rows(small_files["train"], "rejected")
    (copy_root,) = os.listdir(cache)
    assert os.path.isdir(sources.dataset_dir(os.path.join(cache, copy_root)))
    # Prepared again with other rows: the next read refreshes the local copy.
    tfds_source.prepare({"train": small_files["test"]}, remote, overwrite=True)
    assert sources.read_rows(remote, "train", "chosen", cache_dir=cache) == \
        file_rows(small_files["test"], "chosen")
    assert os.listdir(cache) == [copy_root]  # replaced in place, no staging left behind
  finally:
    fsspec.filesystem("memory").rm(f"/bucket-{tmp_path.name}", recursive=True)


def test_hub_rows_are_read_with_sources_read_hub(monkeypatch, tmp_path):
  calls = []

  def fake_read_hub(hub_id, subset, split, field):
    calls.append((hub_id, subset, split, field))
    return [(conversation(i) + field, None) for i in range(3)] + [(None, "field_not_string")]
  monkeypatch.setattr(sources, "read_hub", fake_read_hub)
  data_dir = str(tmp_path / "tfds")
  tfds_source.prepare({"train": [tfds_source.HubRows("Anthropic/hh-rlhf", "harmless-base", "train")]},
                      data_dir)
  assert sorted(calls) == [("Anthropic/hh-rlhf", "harmless-base", "train", f) for f in FIELDS]
  assert sources.read_rows(data_dir, "train", "rejected") == fake_read_hub("", "", "", "rejected")


def test_errors_name_the_input_and_what_to_do(small_files, tmp_path):
  with pytest.raises(ValueError, match="data.tfds_dir"):
    sources.input_for("", "train", "chosen")
  with pytest.raises(FileNotFoundError, match="no prepared dataset.*python -m gpt2_lora_jax.tfds_source"):
    sources.input_for(str(tmp_path / "nothing"), "train", "chosen")
  data_dir = str(tmp_path / "tfds")
  tfds_source.prepare(small_files, data_dir)
  with pytest.raises(ValueError, match="data.field='prompt'"):
    sources.input_for(data_dir, "train", "prompt")
  with pytest.raises(ValueError, match="no split 'validation'"):
    sources.input_for(data_dir, "validation", "chosen")
  name, read = sources.input_for(data_dir, "train", "chosen")
  assert data_dir in name and "train" in name
  assert read() == file_rows(small_files["train"], "chosen")
  with pytest.raises(ValueError, match="unknown type"):
    tfds_source.prepare({"train": [str(tmp_path / "rows.csv")]}, str(tmp_path / "other"))
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    tfds_source.prepare({"train": [str(tmp_path / "missing.jsonl")]}, str(tmp_path / "other"))
  with pytest.raises(ValueError, match="split name"):
    tfds_source.prepare({"train/2": small_files["test"]}, str(tmp_path / "other"))


def test_command_line_stages_once(small_files, tmp_path, capsys):
  data_dir = str(tmp_path / "tfds")
  argv = [f"--data_dir={data_dir}", "--files=train=" + ",".join(small_files["train"]),
          "--files=test=" + small_files["test"][0]]
  assert tfds_source.main(argv) == 0
  out = capsys.readouterr().out
  assert "'train': 11" in out and "'test': 2" in out and "--config.data.tfds_dir=" in out
  assert sources.read_rows(data_dir, "train", "chosen") == file_rows(small_files["train"], "chosen")
  assert tfds_source.main([f"--data_dir={data_dir}", "--files=nosplit.jsonl"]) == 1
  assert "SPLIT=PATH" in capsys.readouterr().err
  assert tfds_source.main([f"--data_dir={data_dir}"]) == 1  # neither --files nor --hub
