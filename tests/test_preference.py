"""Preference pairs: reasons counted, the real harmless-base rows accounted for, the packed layout."""
import json

import numpy as np
import pytest

from gpt2_lora_jax import config as config_lib
from gpt2_lora_jax import data, preference

H, A = "\n\nHuman:", "\n\nAssistant:"


def files_cfg(path, max_length=128, **kw):
  c = config_lib.default_config().data
  c.update(dict(source="files", train_files=(path,), max_length=max_length, **kw))
  return c


def write_rows(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def good(i):
  return {"chosen": f"{H} Question {i}?{A} A good answer {i}.",
          "rejected": f"{H} Question {i}?{A} No."}


def test_malformed_pairs_are_counted_by_reason(tmp_path, tokenizer):
  bad = [
      {"chosen": f"{H} Hi{A} Hello!", "rejected": f"{H} Hey{A} Hello?"},  # prompts differ
      {"chosen": f"{H} Hi{A} Same.", "rejected": f"{H} Hi{A} Same.  "},  # identical once stripped
      {"chosen": f"{H} Hi{A}   ", "rejected": f"{H} Hi{A} Something."},  # empty chosen reply
      {"chosen": f"{H} Hi{A} Something.", "rejected": f"{H} Hi{A}"},  # empty rejected reply
      {"chosen": f"{H} Hi{A} ok"},  # no rejected text
      "{not json",
      {"chosen": f"{H} Hi{A} a{H} more", "rejected": f"{H} Hi{A} x"},  # chosen ends with a Human turn
  ]
  rows = [good(i) for i in range(3)] + bad + [good(i) for i in range(3, 200)]
  path = write_rows(tmp_path / "pairs.jsonl", rows)
  pairs, s = preference.build(files_cfg(path, max_bad_fraction=0.05), tokenizer, "train", 4,
                              str(tmp_path / "cache"), log=None)
  skipped = {k: v["first_rows"] for k, v in s["rows_skipped"].items()}
  assert skipped == {"no_shared_prompt": [3], "chosen_equals_rejected": [4], "empty_reply": [5, 6],
                     "missing_field": [7], "invalid_json": [8], "ends_with_human_turn": [9]}
  assert s["rows_bad"] == 7 and s["rows_read"] == 207 and s["rows_used"] == 200 == pairs.num_pairs
  assert list(pairs.pair_rows[:4]) == [0, 1, 2, 10]
  # The same rows, over the limit: one error that names the reasons and the setting.
  with pytest.raises(data.BadDataError, match=r"7 of 207 .*max_bad_fraction=0.01.*no_shared_prompt: 1"):
    preference.build(files_cfg(path), tokenizer, "train", 4, str(tmp_path / "cache"), log=None)


def test_long_pairs_cut_the_same_turns_from_both_and_keep_both_replies(tmp_path, tokenizer):
  long_dialogue = "".join(f"{H} Tell me about topic number {k} in detail.{A} Topic {k} is broad." for k in range(6))
  rows = [{"chosen": long_dialogue + f"{H} And the last one?{A} The last one is short.",
           "rejected": long_dialogue + f"{H} And the last one?{A} I will not say."},
          {"chosen": f"{H} Hi{A} " + "word " * 80, "rejected": f"{H} Hi{A} " + "other " * 80},
          good(0)]
  path = write_rows(tmp_path / "long.jsonl", rows)
  pairs, s = preference.build(files_cfg(path, max_length=96), tokenizer, "train", 2,
                              str(tmp_path / "cache"), log=None)
  assert s["rows_skipped"] == {"final_exchange_too_long": {"count": 1, "first_rows": [1]}}
  assert s["rows_truncated"] == {"count": 1, "first_rows": [0]}
  p = int(np.flatnonzero(pairs.pair_rows == 0)[0])
  texts = {}
  for k, name in ((2 * p, "chosen"), (2 * p + 1, "rejected")):
    r, start, L = (pairs.packed.conversation_packed_row[k], pairs.packed.conversation_start[k],
                   pairs.packed.conversation_length[k])
    texts[name] = tokenizer.decode(pairs.packed.inputs[r, start:start + L].astype(int))
    reply = pairs.reply_index[r, start:start + L] == 2 * pairs.pair_slot[p] + (name == "rejected")
    texts[name + "_reply"] = tokenizer.decode(pairs.packed.targets[r, start:start + L][reply].astype(int))
  prompt_c, prompt_r = (texts[k].rsplit(A, 1)[0] for k in ("chosen", "rejected"))
  assert prompt_c == prompt_r and prompt_c.startswith("<|endoftext|>" + H)
  assert "topic number 0" not in prompt_c and "And the last one?" in prompt_c  # cut at a Human turn
  assert texts["chosen_reply"] == " The last one is short.<|endoftext|>"
  assert texts["rejected_reply"] == " I will not say.<|endoftext|>"


def test_pairs_share_a_row_and_reply_index_marks_each_reply(tmp_path, tokenizer):
  rows = [good(i) for i in range(40)]
  path = write_rows(tmp_path / "pairs.jsonl", rows)
  pairs, s = preference.build(files_cfg(path, max_length=64), tokenizer, "train", 4,
                              str(tmp_path / "cache"), log=None)
  packed = pairs.packed
  assert s["pairs_per_row"] >= 2 and s["pairs"] == 40
  chosen_row, rejected_row = packed.conversation_packed_row[0::2], packed.conversation_packed_row[1::2]
  assert np.array_equal(chosen_row, rejected_row) and np.array_equal(chosen_row, pairs.pair_packed_row)
  for p in range(40):
    r, j = pairs.pair_packed_row[p], pairs.pair_slot[p]
    for side, reply in ((0, f" A good answer {pairs.pair_rows[p]}."), (1, " No.")):
      at = pairs.reply_index[r] == 2 * j + side
      assert tokenizer.decode(packed.targets[r][at].astype(int)) == reply + "<|endoftext|>"
      assert at.sum() == pairs.pair_reply_tokens[p, side]
      assert len(set(packed.segment_ids[r][at])) == 1  # one reply, one segment
  batch = preference.batch_for_step(pairs, seed=0, step=0, global_batch_size=4)
  assert batch["pair_mask"].shape == (4, s["pairs_per_row"])
  assert batch["pair_mask"].sum() == sum(int((pairs.pair_packed_row == r).sum())
                                         for r in data.batch_row_indices(pairs.num_rows, 0, 0, 4))
  assert (batch["reply_index"] < 2 * batch["pair_mask"].sum(1, keepdims=True)).all()


def test_real_harmless_base_rows_give_a_summary_with_nothing_lost(hh_test_file, tokenizer, tmp_path):
  """2,312 rows (../shared/data/hh-rlhf/README.md): 4 have an empty chosen reply (empty_reply) and
  5 texts differ before their final reply (no_shared_prompt, rows found by reading them)."""
  cfg = files_cfg(hh_test_file, max_length=1024)
  pairs, s = preference.build(cfg, tokenizer, "train", 16, str(tmp_path / "cache"), log=None)
  assert s["rows_read"] == 2312
  assert s["rows_skipped"] == {
      "empty_reply": {"count": 4, "first_rows": [86, 516, 925, 1103]},
      "no_shared_prompt": {"count": 5, "first_rows": [1254, 1688, 1950, 1952, 2036]}}
  assert s["rows_used"] == s["pairs"] == pairs.num_pairs == 2312 - 9
  assert s["tokens"] == int((pairs.packed.segment_ids > 0).sum())
  assert s["loss_tokens"] == int((pairs.reply_index >= 0).sum()) == int(pairs.pair_reply_tokens.sum())
  assert s["padding_tokens"] + s["tokens"] == pairs.num_rows * 1024
  assert len(set(pairs.pair_rows)) == pairs.num_pairs
  text = preference.format_summary(s)
  assert "pairs used" in text and "no_shared_prompt" in text and "2,303 pairs" in text


def test_pairs_cut_only_because_paired_are_counted(tmp_path, tokenizer):
  """Each sequence of rows 0 and 1 fits 64 tokens alone; together they do not. Row 0 then loses its
  first exchange, row 1 (one exchange) is skipped; row 2's chosen sequence is too long even alone."""
  filler = "one two three four five six seven eight nine ten"
  rows = [{"chosen": f"{H} {filler}.{A} Sure.{H} Next?{A} {filler}.", "rejected": f"{H} {filler}.{A} Sure.{H} Next?{A} {filler} no."},
          {"chosen": f"{H} {filler} {filler}?{A} {filler}.", "rejected": f"{H} {filler} {filler}?{A} {filler}!"},
          {"chosen": f"{H} {filler} {filler} {filler}.{A} Hello.{H} Go on.{A} " + "word " * 30,
           "rejected": f"{H} {filler} {filler} {filler}.{A} Hello.{H} Go on.{A} No."},
          good(0)]
  path = write_rows(tmp_path / "rows.jsonl", rows)
  cfg = files_cfg(path, max_length=64)
  lengths = {}  # tokens of each whole sequence in a row: [EOT] + prompt + reply + [EOT], less one
  for i, r in enumerate(rows):
    for field in ("chosen", "rejected"):
      prompt, reply = data.prompt_and_response(r[field])
      lengths[i, field] = len(data.prompt_token_ids(tokenizer, prompt)) + len(tokenizer(reply)["input_ids"])
  assert [max(lengths[i, "chosen"], lengths[i, "rejected"]) <= 64 for i in range(4)] == [True, True, False, True]
  assert [lengths[i, "chosen"] + lengths[i, "rejected"] <= 64 for i in range(4)] == [False, False, False, True]
  pairs, s = preference.build(cfg, tokenizer, "train", 2, str(tmp_path / "cache"), log=None)
  assert s["rows_truncated"]["first_rows"] == [0, 2]
  assert s["rows_skipped"] == {"final_exchange_too_long": {"count": 1, "first_rows": [1]}}
  paired = s["cut_because_paired"]
  assert paired["truncated"]["count"] == 1 and paired["truncated"]["first_rows"] == [0]
  assert paired["skipped"] == {"count": 1, "first_rows": [1]}
  assert paired["sequence_alone_too_long"] == 1
  first_exchange = (len(data.prompt_token_ids(tokenizer, f"{H} {filler}.{A} Sure.{H} Next?{A}"))
                    - len(data.prompt_token_ids(tokenizer, f"{H} Next?{A}")))
  assert paired["truncated"]["tokens_cut"] == 2 * first_exchange  # from both segments of row 0
  assert "only because paired" in preference.format_summary(s)


def test_real_pairs_cut_only_because_paired(hh_test_file, tokenizer, tmp_path):
  """On the 2,303 harmless-base test pairs, the pairs whose two whole sequences each fit a row but
  not one row together, counted here from token counts: 60 at 1024 tokens (all truncated, as
  measured with benchmarks/pair_cuts.py); at 512, 371: the 369 truncated only because paired and 2 of
  the 5 skipped only because paired (the other 3 fit alone once SFT cuts them), and 78 pairs have a
  sequence longer than 512 alone."""
  _, _, read, *_ = preference.read_pairs(files_cfg(hh_test_file), "train")
  whole = []  # (chosen tokens, rejected tokens) in a row, less the one input the last target needs
  for p in read:
    prompt = len(data.prompt_token_ids(tokenizer, "".join(data.MARKERS[t.role] + t.text for t in p.prompt) + A))
    whole.append([prompt + len(tokenizer(reply)["input_ids"]) for reply in (p.chosen, p.rejected)])
  whole = np.asarray(whole)
  for max_length in (1024, 512):
    _, s = preference.build(files_cfg(hh_test_file, max_length=max_length), tokenizer, "train", 16,
                            str(tmp_path / "cache"), log=None)
    paired = s["cut_because_paired"]
    alone_fits = (whole <= max_length).all(1)
    want = int((alone_fits & (whole.sum(1) > max_length)).sum())
    assert paired["sequence_alone_too_long"] == int((~alone_fits).sum())
    assert paired["truncated"]["count"] <= want <= paired["truncated"]["count"] + paired["skipped"]["count"]
    if max_length == 1024:
      assert want == paired["truncated"]["count"] == s["rows_truncated"]["count"] == 60
    else:
      assert (paired["truncated"]["count"], paired["skipped"]["count"], want) == (369, 5, 371)
      assert paired["sequence_alone_too_long"] == 78
