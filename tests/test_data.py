"""The data pipeline on real HH-RLHF rows and on small hand-made files: parsing, loss masks,
truncation, packing (checked against the model), the order of batches, bad input, the token cache."""
import gzip
import json

import numpy as np
import pytest

from gpt2_lora_jax import config, data, hub, sources
from gpt2_lora_jax.tokenizer import EOT, EOT_ID

REAL_ROWS = 2312
EMPTY_FINAL_REPLY_ROWS = [86, 516, 925, 1103]  # the real rows whose final reply is " " or ""
HELLO = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?"


def data_config(**overrides):
  cfg = config.default_config().data
  cfg.source = "files"
  for name, value in overrides.items():
    setattr(cfg, name, value)
  return cfg


def write_jsonl(path, lines):
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def decode(tokenizer, ids):
  return tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)


def conversations(packed):
  """(source row, packed row, slice) of every conversation in a PackedData."""
  for row, r, start, length in zip(packed.conversation_rows, packed.conversation_packed_row,
                                   packed.conversation_start, packed.conversation_length):
    yield int(row), int(r), slice(int(start), int(start + length))


@pytest.fixture(scope="module")
def real_texts(hh_test_file):
  with gzip.open(hh_test_file, "rt") as f:
    return [json.loads(line)["chosen"] for line in f]


@pytest.fixture(scope="module")
def real_builds(hh_test_file, tokenizer, tmp_path_factory):
  """{loss mask: (packed, summary)} of the real rows at max_length 1024; tokenised once, cached."""
  cache_dir = str(tmp_path_factory.mktemp("token_cache"))
  return {mode: data.build(data_config(train_files=(hh_test_file,), loss_mask=mode), tokenizer,
                           "train", batch_size=16, cache_dir=cache_dir, log=None)
          for mode in data.LOSS_MASKS}


# --- parsing -------------------------------------------------------------------------------------

def test_every_real_row_parses_and_splits_at_the_last_assistant_marker(real_texts, hh_test_file):
  assert len(real_texts) == REAL_ROWS
  assert data.read_texts(data_config(eval_files=(hh_test_file,)), "eval") == real_texts
  responses = []
  for text in real_texts:
    turns = data.parse_conversation(text)
    assert turns[-1].role == data.ASSISTANT and data.HUMAN in {t.role for t in turns}
    assert "".join(data.MARKERS[t.role] + t.text for t in turns) == text.rstrip()
    prompt, response = data.prompt_and_response(text)
    cut = text.rindex("\n\nAssistant:") + len("\n\nAssistant:")
    assert (prompt, response) == (text[:cut], text[cut:].rstrip())
    responses.append(response)
  # The quirks of real rows are in there: empty final replies, replies mentioning "Human:".
  assert [i for i, r in enumerate(responses) if not r] == EMPTY_FINAL_REPLY_ROWS
  assert sum("Human:" in r for r in responses) > 0


def test_parse_keeps_inline_markers_and_repeated_roles():
  text = "  \n\nHuman: Hi\n\nAssistant: Human: is what you call me.\n\nAssistant: Sorry.  \n"
  assert data.parse_conversation(text) == [
      ("Human", " Hi"), ("Assistant", " Human: is what you call me."), ("Assistant", " Sorry.")]
  assert data.prompt_and_response("Human: Hi\n\nAssistant: Hello") == ("\n\nHuman: Hi\n\nAssistant:", " Hello")


@pytest.mark.parametrize("text, reason", [
    ("\n\nAssistant: hello", "no_human_turn"),
    ("\n\nHuman: hello?", "no_assistant_turn"),
    ("Note:" + HELLO, "text_before_first_turn"),
    (HELLO + "\n\nHuman: and then?", "ends_with_human_turn"),
])
def test_malformed_conversations_name_their_reason(text, reason):
  with pytest.raises(data.MalformedConversation) as e:
    data.parse_conversation(text)
  assert e.value.reason == reason


# --- tokens and loss masks -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", data.LOSS_MASKS)
def test_tokens_under_the_loss_decode_to_exactly_the_masked_turns(real_builds, real_texts, tokenizer, mode):
  packed, summary = real_builds[mode]
  assert summary["rows_read"] == REAL_ROWS and summary["rows_used"] == REAL_ROWS - 4
  assert summary["rows_skipped"] == {"empty_final_reply": {"count": 4, "first_rows": EMPTY_FINAL_REPLY_ROWS}}
  assert summary["rows_truncated"]["count"] == 0  # no real row is over 1024 tokens
  seen = set()
  for row, r, span in conversations(packed):
    turns = data.parse_conversation(real_texts[row])
    masked = {"all": turns,
              "assistant": [t for t in turns if t.role == data.ASSISTANT],
              "final": turns[-1:]}[mode]
    want = "".join((data.MARKERS[t.role] if mode == "all" else "") + t.text for t in masked) + EOT
    targets, mask = packed.targets[r, span], packed.loss_mask[r, span]
    assert decode(tokenizer, targets[mask]) == want, row
    # Framed by end-of-text; targets are the inputs shifted inside the conversation.
    assert packed.inputs[r, span.start] == EOT_ID and targets[-1] == EOT_ID and mask[-1]
    np.testing.assert_array_equal(packed.inputs[r, span][1:], targets[:-1])
    seen.add(row)
  assert seen == set(range(REAL_ROWS)) - set(EMPTY_FINAL_REPLY_ROWS)


def test_prompt_token_ids_match_the_training_tokens(real_builds, real_texts, tokenizer):
  packed, _ = real_builds["final"]
  for row, r, span in list(conversations(packed))[:200]:
    prompt, _ = data.prompt_and_response(real_texts[row])
    ids = data.prompt_token_ids(tokenizer, prompt)
    assert ids == data.prompt_token_ids(tokenizer, real_texts[row])
    np.testing.assert_array_equal(packed.inputs[r, span][:len(ids)], ids)
    assert not packed.loss_mask[r, span][:len(ids) - 1].any()  # nothing before the reply is trained
    assert packed.loss_mask[r, span][len(ids) - 1]  # the reply's first token is


# --- length ----------------------------------------------------------------------------------------

def test_long_rows_are_cut_from_the_left_at_a_human_turn_or_skipped(tmp_path, tokenizer):
  long_exchange = "\n\nHuman: Tell me everything." + "\n\nAssistant:" + " Everything is a lot." * 30
  kept = "\n\nHuman: What is two plus two?\n\nAssistant: Four.\n\nAssistant: Anything else?"
  kept += "\n\nHuman: No.\n\nAssistant: Bye!"
  # Input positions of the kept part: [EOT] + its tokens (segment-wise = whole-text tokens here).
  kept_length = len(data.prompt_token_ids(tokenizer, kept)) + len(tokenizer(" Bye!")["input_ids"])
  assert kept_length == 1 + len(tokenizer(kept)["input_ids"])
  too_long_final = "\n\nHuman: Hi\n\nAssistant:" + " word" * kept_length
  path = write_jsonl(tmp_path / "rows.jsonl", [json.dumps({"chosen": t}) for t in (
      HELLO, long_exchange + long_exchange + kept, too_long_final)])
  cfg = data_config(train_files=(path,), loss_mask="all", max_length=kept_length + 5)
  packed, summary = data.build(cfg, tokenizer, cache_dir=str(tmp_path / "cache"), log=None)
  assert summary["rows_truncated"] == {"count": 1, "first_rows": [1]}
  assert summary["rows_skipped"] == {"final_exchange_too_long": {"count": 1, "first_rows": [2]}}
  assert summary["tokens_cut_by_truncation"] == 2 * len(tokenizer(long_exchange)["input_ids"])
  (row, r, span), = [c for c in conversations(packed) if c[0] == 1]
  # Everything from the first Human turn that fits, the second Assistant turn in a row included.
  assert decode(tokenizer, packed.targets[r, span]) == kept + EOT
  # A sampling prompt of that row, given the room of the kept prompt, is cut at the same turn.
  kept_prompt = data.prompt_token_ids(tokenizer, kept)
  ids, cut = data.fit_prompt_token_ids(tokenizer, long_exchange + long_exchange + kept, len(kept_prompt))
  assert ids == kept_prompt == packed.inputs[r, span][:len(ids)].tolist()
  assert cut == summary["tokens_cut_by_truncation"]


# --- packing -----------------------------------------------------------------------------------------

def test_padding_is_near_its_measured_share_on_real_rows(real_builds):
  packed, summary = real_builds["assistant"]
  print(f"\npadding fraction on the real rows at max_length 1024: {summary['padding_fraction']:.4%} "
        f"({summary['packed_rows']} rows for {summary['conversations']} conversations)")
  assert packed.max_length == 1024
  # Measured: 0.356% (376 rows for 2,308 conversations, harmless-base test, loss mask 'assistant',
  # at most 32 conversations per row; 0.0904% and 375 rows without the cap).
  assert summary["padding_fraction"] < 0.0045
  pad = packed.segment_ids == 0
  assert not packed.loss_mask[pad].any() and summary["padding_tokens"] == pad.sum()


def test_segments_have_their_own_ids_and_positions(real_builds):
  packed, _ = real_builds["assistant"]
  for row, r, span in conversations(packed):
    segment = packed.segment_ids[r, span]
    assert segment[0] > 0 and (segment == segment[0]).all()
    np.testing.assert_array_equal(packed.positions[r, span], np.arange(span.stop - span.start))


def test_the_segment_cap_holds_on_real_rows_and_is_counted(real_builds):
  packed, summary = real_builds["assistant"]
  per_row = np.bincount(packed.conversation_packed_row, minlength=packed.num_rows)
  counted = summary["segments_per_row"]
  assert counted["cap"] == 32 and counted["max"] == per_row.max() <= 32
  assert counted["rows_at_cap"] == (per_row == 32).sum()
  assert counted["mean"] * summary["packed_rows"] == pytest.approx(summary["conversations"])
  assert "segments per row" in data.format_summary(summary)
  # Segment ids run 1..n from the row's start, then one trailing padding run (id 0).
  for r in range(packed.num_rows):
    n = per_row[r]
    seg = packed.segment_ids[r]
    runs = seg[np.r_[True, seg[1:] != seg[:-1]]]
    np.testing.assert_array_equal(runs[:n], np.arange(1, n + 1))
    assert list(runs[n:]) in ([], [0])


def test_the_cap_moves_conversations_to_new_rows_and_drops_none():
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 40, size=80)  # short conversations: the uncapped packer piles them up
  ids = [rng.integers(0, 50000, size=n + 1).astype(np.int32) for n in lengths]
  masks = [rng.random(n) < 0.5 for n in lengths]
  free = data.pack(ids, masks, list(range(80)), max_length=256)
  capped = data.pack(ids, masks, list(range(80)), max_length=256, max_segments=5)
  assert free.segments_per_row.max() > 5 and capped.segments_per_row.max() == 5
  assert capped.num_rows > free.num_rows and capped.num_tokens == free.num_tokens == lengths.sum()
  for i, (r, start, n) in enumerate(zip(capped.conversation_packed_row, capped.conversation_start,
                                        capped.conversation_length)):
    np.testing.assert_array_equal(capped.inputs[r, start:start + n], ids[i][:-1])
    np.testing.assert_array_equal(capped.targets[r, start:start + n], ids[i][1:])
    np.testing.assert_array_equal(capped.loss_mask[r, start:start + n], masks[i])
  with pytest.raises(ValueError, match="max_segments"):
    data.pack(ids, masks, list(range(80)), max_length=256, max_segments=-1)


def test_a_packed_conversation_has_the_logits_it_has_alone(real_builds):
  import jax
  from gpt2_lora_jax import model
  packed, _ = real_builds["assistant"]
  cfg = model.GPT2Config(n_embd=64, n_layer=2, n_head=4)
  params = {"params": model.init_params(cfg, jax.random.PRNGKey(0))}
  gpt2 = model.GPT2(cfg)
  r = int(np.argmax(packed.segment_ids.max(axis=1)))  # the row with the most conversations
  batch = packed.rows([r])
  logits = np.asarray(gpt2.apply(params, batch["inputs"], position_ids=batch["positions"],
                                 segment_ids=batch["segment_ids"]))  # (1, T, V)
  spans = [span for _, row, span in conversations(packed) if row == r]
  assert len(spans) >= 3
  # Each conversation alone, right-padded into one batch: one compile; causal attention means the
  # padding after a conversation cannot change its logits.
  longest = max(len(range(*span.indices(batch["inputs"].shape[1]))) for span in spans)
  alone_ids = np.full((len(spans), longest), 50256, np.int32)
  for k, span in enumerate(spans):
    ids = batch["inputs"][0, span]
    alone_ids[k, :len(ids)] = ids
  alone = np.asarray(gpt2.apply(params, alone_ids))  # positions 0.., no segments
  for k, span in enumerate(spans):
    n = len(batch["inputs"][0, span])
    np.testing.assert_allclose(logits[0, span], alone[k, :n], atol=2e-5, rtol=2e-5)


# --- order of batches ----------------------------------------------------------------------------------

def test_the_batch_of_a_step_is_a_pure_function_of_seed_and_step(real_builds):
  packed, _ = real_builds["assistant"]
  batch = data.batch_for_step(packed, seed=3, step=7, global_batch_size=16)
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
      "inputs": ((16, 1024), "int32"), "targets": ((16, 1024), "int32"),
      "loss_mask": ((16, 1024), "float32"), "segment_ids": ((16, 1024), "int32"),
      "positions": ((16, 1024), "int32")}
  again = data.batch_for_step(packed, seed=3, step=7, global_batch_size=16)
  for name in batch:
    np.testing.assert_array_equal(batch[name], again[name])
  for other in (data.batch_for_step(packed, 3, 8, 16), data.batch_for_step(packed, 4, 7, 16)):
    assert not np.array_equal(batch["inputs"], other["inputs"])
  slices = [data.batch_for_step(packed, 3, 7, 16, process_index=p, process_count=2) for p in (0, 1)]
  for name in batch:
    assert slices[0][name].shape == (8, 1024)
    np.testing.assert_array_equal(np.concatenate([s[name] for s in slices]), batch[name])


@pytest.mark.parametrize("num_rows, batch_size", [(40, 8), (37, 8)])
def test_every_epoch_is_a_new_permutation(num_rows, batch_size):
  epochs = 3
  steps = -(-epochs * num_rows // batch_size)
  stream = np.concatenate([data.batch_row_indices(num_rows, 0, k, batch_size) for k in range(steps)])
  orders = [stream[e * num_rows:(e + 1) * num_rows] for e in range(epochs)]
  for order in orders:
    np.testing.assert_array_equal(np.sort(order), np.arange(num_rows))
  assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
  assert data.steps_per_epoch(num_rows, batch_size) == num_rows / batch_size


def test_eval_batches_cover_every_row_once(real_builds):
  packed, _ = real_builds["assistant"]
  seen = []
  for batch in data.eval_batches(packed, 64, process_index=1, process_count=2):
    assert batch["inputs"].shape == (32, 1024)
    seen.append(batch)
  # Process 1 holds rows [64 k + 32, 64 k + 64) of global batch k; rows past the end come empty.
  assert len(seen) == -(-packed.num_rows // 64)
  for k, batch in enumerate(seen):
    rows = np.arange(64 * k + 32, 64 * k + 64)
    real = rows < packed.num_rows
    np.testing.assert_array_equal(batch["inputs"][real], packed.inputs[rows[real]])
    assert not batch["segment_ids"][~real].any() and not batch["loss_mask"][~real].any()
  assert packed.num_rows % 64 and not real.all()  # the real rows do leave a partial last batch


# --- bad input -------------------------------------------------------------------------------------

BAD_LINES = {
    "invalid_json": '{"chosen": "\\n\\nHuman: hi',
    "missing_field": json.dumps({"rejected": HELLO}),
    "field_not_string": json.dumps({"chosen": ["\n\nHuman: hi"]}),
    "not_utf8": json.dumps({"chosen": "\n\nHuman: \ud800\n\nAssistant: hi"}),
    "no_human_turn": json.dumps({"chosen": "\n\nAssistant: hi"}),
    "no_assistant_turn": json.dumps({"chosen": "\n\nHuman: hi"}),
    "text_before_first_turn": json.dumps({"chosen": "Note:" + HELLO}),
    "ends_with_human_turn": json.dumps({"chosen": HELLO + "\n\nHuman: ok?"}),
}


def test_bad_rows_are_counted_by_reason(tmp_path, tokenizer):
  good = json.dumps({"chosen": HELLO})
  lines = [good, *BAD_LINES.values(), "[1, 2]", good, json.dumps({"chosen": HELLO + "\n\nHuman: ok?\n\nAssistant:  "})]
  path = write_jsonl(tmp_path / "rows.jsonl", lines)
  cfg = data_config(train_files=(path,), max_bad_fraction=1.0)
  packed, summary = data.build(cfg, tokenizer, cache_dir=str(tmp_path / "cache"), log=None)
  want = {reason: {"count": 1, "first_rows": [i]} for i, reason in enumerate(BAD_LINES, start=1)}
  want["missing_field"] = {"count": 2, "first_rows": [2, 9]}  # a row that is not an object has no field
  want["empty_final_reply"] = {"count": 1, "first_rows": [11]}
  assert summary["rows_skipped"] == dict(sorted(want.items()))
  assert (summary["rows_read"], summary["rows_used"], summary["rows_bad"]) == (12, 2, 9)
  assert sorted(packed.conversation_rows) == [0, 10]
  assert "not_utf8" in data.format_summary(summary)
  # Prompts for sampling come from every well-formed row (an empty final reply still has a prompt).
  assert data.read_texts(cfg, "train") == [json.loads(lines[i])["chosen"] for i in (0, 10, 11)]


def test_too_many_bad_rows_stop_with_an_error_naming_the_file(tmp_path, tokenizer):
  good = json.dumps({"chosen": HELLO})
  path = write_jsonl(tmp_path / "mostly_good.jsonl", [good] * 98 + [BAD_LINES["invalid_json"]] * 2)
  with pytest.raises(data.BadDataError, match=r"mostly_good\.jsonl: 2 of 100 rows.*invalid_json: 2"):
    data.build(data_config(train_files=(path,)), tokenizer, cache_dir=str(tmp_path / "c"), log=None)
  # 1 bad row in 100 is within the default 1%.
  path = write_jsonl(tmp_path / "ok.jsonl", [good] * 99 + [BAD_LINES["invalid_json"]])
  _, summary = data.build(data_config(train_files=(path,)), tokenizer, cache_dir=str(tmp_path / "c"), log=None)
  assert summary["rows_bad"] == 1


def test_missing_inputs_name_what_is_missing_and_the_choices(tmp_path, tokenizer):
  with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
    data.build(data_config(train_files=(str(tmp_path / "nowhere.jsonl"),)), tokenizer, log=None)
  with pytest.raises(ValueError, match="rows.csv.*\\.jsonl\\.gz"):
    data.build(data_config(train_files=("rows.csv",)), tokenizer, log=None)
  with pytest.raises(ValueError, match="'harmless'.*helpful-rejection-sampled, all"):
    data.build(data_config(source="hub", subset="harmless"), tokenizer, log=None)
  with pytest.raises(ValueError, match="train_files"):
    data.build(data_config(), tokenizer, log=None)


def test_unreachable_hub_says_how_to_use_local_files(tokenizer):
  # conftest sets HF_HUB_OFFLINE=1, so the real datasets.load_dataset call fails at once.
  with pytest.raises(hub.HubUnreachableError,
                     match="--config.data.source=files --config.data.train_files="):
    data.build(data_config(source="hub", subset="harmless-base"), tokenizer, log=None)


# --- other formats, eval split, cache ------------------------------------------------------------------

def test_json_and_parquet_files_read_like_jsonl(tmp_path, tokenizer):
  import datasets
  rows = [{"chosen": HELLO, "rejected": HELLO}, {"chosen": HELLO + "\n\nHuman: ok\n\nAssistant: ok"}]
  (tmp_path / "rows.json").write_text(json.dumps(rows))
  datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
  with gzip.open(tmp_path / "rows.jsonl.gz", "wt") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  sampled = []
  for name in ("rows.json", "rows.parquet", "rows.jsonl.gz"):
    packed, summary = data.build(data_config(eval_files=(str(tmp_path / name),), max_eval_rows=1),
                                 tokenizer, "eval", cache_dir=str(tmp_path / "cache"), log=None)
    assert (summary["rows_read"], summary["rows_used"]) == (1, 1), name
    row = int(packed.conversation_rows[0])  # the held-out sample's row
    sampled.append(row)
    assert decode(tokenizer, packed.targets[0, :packed.num_tokens]) == rows[row]["chosen"] + EOT
  assert len(set(sampled)) == 1  # the same row whatever the format and the file's name


def test_a_second_build_reads_the_token_cache(tmp_path, tokenizer, monkeypatch):
  tokenized = []
  call = type(tokenizer).__call__

  def counting_call(self, text, *args, **kwargs):
    tokenized.extend([text] if isinstance(text, str) else text)
    return call(self, text, *args, **kwargs)

  monkeypatch.setattr(type(tokenizer), "__call__", counting_call)
  path = write_jsonl(tmp_path / "rows.jsonl", [json.dumps({"chosen": HELLO})] * 3)
  summary_path = tmp_path / "out" / "data_summary.json"
  cfg = data_config(train_files=(path,), cache_dir=str(tmp_path / "cache"))
  first, summary = data.build(cfg, tokenizer, summary_path=str(summary_path), log=None)
  assert not summary["token_cache"]["from_cache"] and " Hi there" in tokenized
  assert json.loads(summary_path.read_text()) == json.loads(json.dumps(summary))
  tokenized.clear()
  second, summary = data.build(cfg, tokenizer, log=None)
  assert summary["token_cache"]["from_cache"]
  assert set(tokenized) <= set(data.MARKERS.values())  # only the two turn markers
  np.testing.assert_array_equal(first.inputs, second.inputs)


def test_seed_study_reads_helpful_base_as_the_study_did(monkeypatch):
  """The study trained on 43,835 rows and tested on 2,354: helpful-base's train and test splits."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "seed_study.py"
  spec = importlib.util.spec_from_file_location("seed_study", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config().data
  calls = []
  monkeypatch.setattr(sources, "read_hub", lambda *args: calls.append(args) or [(HELLO, None)])
  assert data.read_texts(cfg, "train") == data.read_texts(cfg, "eval") == [HELLO]
  assert calls == [("Anthropic/hh-rlhf", "helpful-base", "train", "chosen"),
                   ("Anthropic/hh-rlhf", "helpful-base", "test", "chosen")]
  assert cfg.max_eval_rows == 0  # held-out loss on every test row


# --- the held-out sample ---------------------------------------------------------------------------

def test_stratified_sample_allocates_by_largest_remainder():
  """Four subsets of 2,312 / 2,354 / 1,137 / 2,749 rows (the first two: harmless-base's and
  helpful-base's test splits; the last two made up) sampled to 2,000: quotas
  2000 n_s / 8552 = 540.69, 550.51, 265.90, 642.89 -> floors 540, 550, 265, 642 (1,997) and the 3
  left go to the largest remainders (0.90, 0.89, 0.69): 541, 550, 266, 643."""
  sizes = {"harmless-base": 2312, "helpful-base": 2354, "helpful-online": 1137, "helpful-rejection-sampled": 2749}
  labels = [name for name, n in sizes.items() for _ in range(n)]
  picked = data.stratified_sample(labels, 2000, seed=0)
  counts = {name: sum(labels[i] == name for i in picked) for name in sizes}
  assert counts == {"harmless-base": 541, "helpful-base": 550, "helpful-online": 266,
                    "helpful-rejection-sampled": 643}
  assert len(set(picked.tolist())) == 2000 and list(picked) == sorted(picked)
  np.testing.assert_array_equal(picked, data.stratified_sample(labels, 2000, seed=0))  # seeded
  assert not np.array_equal(picked, data.stratified_sample(labels, 2000, seed=1))
  # Not the first rows: the sample spreads over each subset's rows.
  first = [i for i in picked if labels[i] == "harmless-base"]
  assert max(first) > 2000 and min(first) < 300
  np.testing.assert_array_equal(data.stratified_sample(labels, 0, seed=0), np.arange(len(labels)))


def test_held_out_rows_are_one_stratified_sample_for_loss_pairs_and_prompts(hh_test_file, tokenizer, tmp_path):
  """Real harmless-base rows and a helpful-base file (demo rows, 400): 300 held-out rows are drawn
  from both subsets in proportion (2,312 : 400 -> 256 : 44), where the first 300 rows would all be
  harmless-base; SFT's held-out rows, the preference pairs and the prompts come from that sample."""
  from gpt2_lora_jax import evaluate, preference
  from gpt2_lora_jax.demo import data as demo_data
  helpful = tmp_path / "helpful-base" / "test.jsonl"
  helpful.parent.mkdir()
  demo_data.write_jsonl(str(helpful), "test", 400)
  cfg = data_config(eval_files=(hh_test_file, str(helpful)), max_eval_rows=300)
  assert [data.subset_of_path(p) for p in cfg.eval_files] == ["harmless-base", "helpful-base"]
  packed, summary = data.build(cfg, tokenizer, "eval", cache_dir=str(tmp_path / "cache"), log=None)
  assert {k: v["rows_read"] for k, v in summary["subsets"].items()} == {"harmless-base": 256, "helpful-base": 44}
  assert summary["subsets"]["harmless-base"]["rows_in_split"] == REAL_ROWS
  sampled = set(data.stratified_sample(["harmless-base"] * REAL_ROWS + ["helpful-base"] * 400, 300, 0).tolist())
  assert set(packed.conversation_rows.tolist()) <= sampled and summary["rows_read"] == 300
  pairs, pair_summary = preference.build(cfg, tokenizer, "eval", 16, str(tmp_path / "cache"), log=None)
  assert set(pairs.pair_rows.tolist()) <= sampled
  assert pair_summary["subsets"]["helpful-base"]["rows_used"] == 44  # demo pairs: none malformed
  rows, counts = data.read_heldout(cfg)
  assert {i for i, _, _ in rows} <= sampled and counts == {k: {"rows_in_split": v["rows_in_split"],
                                                               "rows_read": v["rows_read"]}
                                                           for k, v in summary["subsets"].items()}
  prompts = evaluate.choose_prompts(rows, 50, seed=0)
  by_subset = {s: sum(p[3] == s for p in prompts) for s in ("harmless-base", "helpful-base")}
  n_harmless = sum(s == "harmless-base" for _, _, s in rows)  # 256 less its malformed rows
  assert abs(by_subset["harmless-base"] - 50 * n_harmless / len(rows)) < 1 and sum(by_subset.values()) == 50
  assert all(p[0] in sampled and p[1].endswith("\n\nAssistant:") for p in prompts)


def test_hub_all_is_read_as_its_four_subsets_and_demo_rows_carry_their_task(monkeypatch):
  calls = []
  monkeypatch.setattr(sources, "read_hub", lambda hub_id, subset, split, field: calls.append(subset)
                      or [(HELLO, None)] * {"harmless-base": 30, "helpful-base": 30, "helpful-online": 15,
                                            "helpful-rejection-sampled": 25}[subset])
  cfg = data_config(source="hub", subset="all", max_eval_rows=10)
  split = data.read_split(cfg, "eval")
  assert calls == list(data.SUBSETS)
  assert {k: v["rows_read"] for k, v in split.subset_counts.items()} == {
      "harmless-base": 3, "helpful-base": 3, "helpful-online": 2, "helpful-rejection-sampled": 2}
  demo = data.read_split(data_config(source="demo", demo_rows=200, max_eval_rows=20), "eval")
  from gpt2_lora_jax.demo import data as demo_data
  rows = demo_data.rows("test", 200)
  assert all(demo.subsets[i] == demo_data.task_of(data.parse_conversation(rows[i]["chosen"])[-2].text.strip())
             for i in demo.subsets)
  assert len(demo.subset_counts) >= 4


def test_a_bad_row_in_a_small_held_out_sample_is_judged_against_the_whole_input(tmp_path, tokenizer):
  """One malformed row of 200 (0.5%, under data.max_bad_fraction=0.01) drawn into a 10-row held-out
  sample is 10% of the sample: it is counted, and the input is judged on all its rows."""
  from gpt2_lora_jax import preference
  bad_row = int(data.stratified_sample([path := str(tmp_path / "rows.jsonl")] * 200, 10, 0)[3])
  lines = [json.dumps({"chosen": f"\n\nHuman: Q{i}?\n\nAssistant: A{i}.", "rejected": f"\n\nHuman: Q{i}?\n\nAssistant: No."})
           for i in range(200)]
  lines[bad_row] = "{not json"
  write_jsonl(tmp_path / "rows.jsonl", lines)
  cfg = data_config(eval_files=(path,), max_eval_rows=10)
  _, summary = data.build(cfg, tokenizer, "eval", cache_dir=str(tmp_path / "cache"), log=None)
  assert summary["rows_skipped"] == {"invalid_json": {"count": 1, "first_rows": [bad_row]}}
  assert (summary["rows_read"], summary["rows_used"]) == (10, 9)
  _, pair_summary = preference.build(cfg, tokenizer, "eval", 4, str(tmp_path / "cache"), log=None)
  assert pair_summary["rows_skipped"] == {"invalid_json": {"count": 1, "first_rows": [bad_row]}}
  lines[(bad_row + 1) % 200] = lines[(bad_row + 2) % 200] = "{not json"  # 3 of 200: over 1%
  write_jsonl(tmp_path / "rows.jsonl", lines)
  with pytest.raises(data.BadDataError, match=r"3 of 200 rows are malformed"):
    data.build(cfg, tokenizer, "eval", cache_dir=str(tmp_path / "cache"), log=None)
