r"""What pairing chosen and rejected in one row costs on real rows, and what letting a pair span two
rows would cost instead (preference.py, "Cut only because paired").

  python benchmarks/pair_cuts.py ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz --max_length 1024 512

For each max_length: the pairs as preference.build packs them (both segments of a pair in one row),
and the same pairs with each pair that is cut or skipped only because it is paired kept whole, its
two segments packed as separate units (assembled alone, as SFT assembles a sequence), which is what
spanning two rows would train on. Printed per max_length: pairs cut / skipped only because paired,
prompt tokens those cuts remove, packed rows and padding of both layouts, and how many packed rows
would hold a lone segment of a spanning pair (each such row must then be drawn into the same batch
as its partner).
"""
import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt2_lora_jax import config as config_lib, conversation, packing, preference  # noqa: E402
from gpt2_lora_jax import tokenizer as tokenizer_lib  # noqa: E402


def measure(path: str, max_length: int, tokenizer, cache_dir: str) -> dict:
  cfg = config_lib.default_config().data
  cfg.update(dict(source="files", train_files=(path,), max_length=max_length))
  pairs, summary = preference.build(cfg, tokenizer, "train", 16, cache_dir, log=None)
  paired = summary["cut_because_paired"]
  # Rebuild the segments: the same pairs, with those cut or skipped only because paired assembled
  # alone (whole), each segment its own packing unit.
  _, _, read, *_ = preference.read_pairs(cfg, "train")
  by_row = {p.row: p for p in read}
  rescued = set(paired_rows(pairs, summary, by_row, tokenizer, max_length))
  markers = conversation.marker_ids(tokenizer)
  segments, masks, rows, groups = [], [], [], []
  for row in sorted(set(int(r) for r in pairs.pair_rows) | rescued):
    p = by_row[row]
    if row in rescued:
      for reply in (p.chosen, p.rejected):
        turns = list(p.prompt) + [conversation.Turn(conversation.ASSISTANT, reply)]
        ids, mask = assemble_alone(turns, tokenizer, markers, max_length)
        groups.append([len(segments)])
        segments.append(ids), masks.append(mask), rows.append(row)
    else:
      k = int(np.flatnonzero(pairs.pair_rows == row)[0])
      group = []
      for side in (0, 1):
        c = 2 * k + side
        r, s, L = (pairs.packed.conversation_packed_row[c], pairs.packed.conversation_start[c],
                   pairs.packed.conversation_length[c])
        ids = np.concatenate([pairs.packed.inputs[r, s:s + L], pairs.packed.targets[r, s + L - 1:s + L]])
        group.append(len(segments))
        segments.append(ids.astype(np.int32)), masks.append(pairs.packed.loss_mask[r, s:s + L]), rows.append(row)
      groups.append(group)
  spanning = packing.pack(segments, masks, rows, max_length, True, cfg.max_segments_per_row, groups=groups)
  lone = [g[0] for g in groups if len(g) == 1]
  lone_rows = len(set(spanning.conversation_packed_row[lone].tolist()))
  return {"max_length": max_length, "pairs": summary["pairs"], "truncated_total": summary["rows_truncated"]["count"],
          "skipped_too_long": summary["rows_skipped"].get("final_exchange_too_long", {}).get("count", 0),
          **paired, "pair_rows": pairs.num_rows, "pair_padding": pairs.packed.padding_fraction,
          "spanning_pairs": len(rescued), "spanning_rows": spanning.num_rows,
          "spanning_padding": spanning.padding_fraction, "spanning_tokens": spanning.num_tokens,
          "pair_tokens": pairs.packed.num_tokens, "rows_holding_half_a_pair": lone_rows}


def paired_rows(pairs, summary, by_row, tokenizer, max_length):
  """Rows of the pairs cut or skipped only because paired (all of them, not the first few)."""
  markers = conversation.marker_ids(tokenizer)
  out = []
  for row, p in by_row.items():
    turns = list(p.prompt)
    roles = [conversation.ROLE_CODE[t.role] for t in turns] + [conversation.ROLE_CODE[conversation.ASSISTANT]] * 2
    lengths = [len(tokenizer(t.text, add_special_tokens=False)["input_ids"]) for t in turns]
    lengths += [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in (p.chosen, p.rejected)]
    ids = [i for t in turns for i in tokenizer(t.text, add_special_tokens=False)["input_ids"]]
    ids += [i for r in (p.chosen, p.rejected) for i in tokenizer(r, add_special_tokens=False)["input_ids"]]
    alone = preference.alone_cuts(np.asarray(roles), np.asarray(lengths), markers, max_length)
    assembled = preference.assemble_pair(np.asarray(roles), np.asarray(lengths), np.asarray(ids, np.int32),
                                         markers, max_length)
    if (assembled is None and None not in alone) or (assembled is not None and assembled[2] > 0 and alone == (0, 0)):
      out.append(row)
  counted = summary["cut_because_paired"]
  assert len(out) == counted["truncated"]["count"] + counted["skipped"]["count"], (len(out), counted)
  return out


def assemble_alone(turns, tokenizer, markers, max_length):
  roles = [conversation.ROLE_CODE[t.role] for t in turns]
  contents = [tokenizer(t.text, add_special_tokens=False)["input_ids"] for t in turns]
  ids, mask, first = conversation.assemble_conversation(
      np.asarray(roles), np.asarray([len(c) for c in contents]), np.asarray([i for c in contents for i in c], np.int32),
      markers, "final", max_length)
  return ids, mask


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("path")
  parser.add_argument("--max_length", type=int, nargs="+", default=[1024, 512])
  args = parser.parse_args()
  tokenizer = tokenizer_lib.load("offline")
  with tempfile.TemporaryDirectory() as cache_dir:
    for L in args.max_length:
      m = measure(args.path, L, tokenizer, cache_dir)
      t, k = m["truncated"], m["skipped"]
      print(f"max_length {L}: {m['pairs']:,} pairs packed; {m['truncated_total']} truncated, "
            f"{t['count']} of them only because paired ({t['tokens_cut']:,} prompt tokens cut); "
            f"{m['skipped_too_long']} skipped as too long, {k['count']} only because paired; "
            f"{m['sequence_alone_too_long']} pairs have a sequence longer than a row alone")
      print(f"  pairs in one row: {m['pair_rows']:,} rows, {m['pair_tokens']:,} tokens, padding "
            f"{m['pair_padding']:.2%}")
      print(f"  {m['spanning_pairs']} pairs spanning two rows instead: {m['spanning_rows']:,} rows, "
            f"{m['spanning_tokens']:,} tokens, padding {m['spanning_padding']:.2%}; "
            f"{m['rows_holding_half_a_pair']} rows hold half a pair")

if __name__ == "__main__":
  main()
