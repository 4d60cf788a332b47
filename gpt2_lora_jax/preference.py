"""HH-RLHF preference pairs -> (prompt, chosen reply, rejected reply) -> packed fixed-shape rows.

    pairs, summary = preference.build(config.data, tokenizer, "train", batch_size=16)
    batch = preference.batch_for_step(pairs, seed=0, step=0, global_batch_size=16)
    batch["reply_index"]  # (16, T): which reply of its row a target token belongs to, -1 if none
    batch["pair_mask"]    # (16, pairs_per_row): 1 where the row holds that pair

A row {"chosen": text, "rejected": text} is one pair. Both texts are parsed and tokenised exactly as
SFT does (conversation.py: same markers, turns tokenised separately, end-of-text before the dialogue
and after the reply); the prompt is every turn before the final "\\n\\nAssistant:" and must be the
same in both texts. Per pair, the prompt's turns and both replies are tokenised in one cached
datasets.map call (data.tokenize_conversations), so the prompt is tokenised once.

Counted, never dropped silently (data.max_bad_fraction holds against all malformed reasons):
- unreadable rows and texts that are not conversations (data.BAD_REASONS, for either text);
- no_shared_prompt: the two texts differ before their final reply (5 of the 2,312 real
  harmless-base test rows: one text has an extra or a different turn);
- empty_reply: a final reply that is empty after stripping whitespace (4 of those rows have an
  empty chosen reply; SFT skips the same 4 rows as empty_final_reply; a pair cannot prefer
  "nothing" without teaching the policy to answer nothing, so they are malformed here);
- chosen_equals_rejected: the same final reply twice (no preference to learn);
- final_exchange_too_long (a skip, not malformed): the last Human turn and both replies, each in its
  own segment, do not fit in data.max_length.
Too long otherwise: whole turns are cut from the left of the prompt (conversation.cut_points, as SFT
cuts) until both segments together fit in one row; the same turns are cut from both.

Cut only because paired. A pair's two segments share one row, so a pair can lose prompt turns (or be
skipped) although each of its sequences fits a row alone. The summary counts them
(cut_because_paired: truncated, with the tokens cut, and skipped) beside the pairs with a sequence
longer than a row on its own. On the 2,303 harmless-base test pairs (benchmarks/pair_cuts.py): at
1024 tokens 60 pairs are truncated, all 60 only because paired (29,434 tokens cut), none skipped; at
512, 441 truncated (369 only because paired), 8 skipped (5 only because paired), 78 with a sequence
longer than 512 alone. Letting those pairs span two rows instead would train on 3.9% more tokens in
774 rows instead of 745 at 1024 (1,521 instead of 1,209 at 512, padding 7.0% instead of 1.3%), with
119 rows (720 at 512) holding half a pair; the loss and its in-step reference (dpo.py) read a pair
inside one row (reply_index, pair_mask (B, J)) and the batch order draws rows independently, so
spanning would change both. Pairs stay in one row, and these cuts are counted and reported.

Layout. A pair is two segments of one packed row, chosen then rejected, each [EOT] + prompt + reply +
[EOT] with its own positions and attention inside the segment (model.GPT2 with segment_ids): each
reply's log-probability is what the model gives (prompt, reply) alone. Pairs are bin-packed as
units (packing.pack with groups), so a batch always holds both halves of each of its pairs.
reply_index[b, t] = 2 j + (0 chosen | 1 rejected) for the j-th pair of row b on the target tokens of
that reply (its content and the end-of-text after it; loss_mask 'final'), -1 elsewhere. The pair_*
arrays map (packed row, j) back to the source row.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Callable, Optional

import ml_collections
import numpy as np

from gpt2_lora_jax import data
from gpt2_lora_jax.errors import UserError
from gpt2_lora_jax.conversation import (ASSISTANT, ROLE_CODE, MalformedConversation, assemble_conversation,
                                        cut_points, first_kept_turn, marker_ids, parse_conversation)
from gpt2_lora_jax.packing import PackedData, batch_row_indices, pack

CHOSEN, REJECTED = "chosen", "rejected"
PAIR_REASONS = ("no_shared_prompt", "empty_reply", "chosen_equals_rejected")
BAD_REASONS = data.BAD_REASONS + PAIR_REASONS  # malformed: held against data.max_bad_fraction
SKIP_REASONS = ("final_exchange_too_long",)


@dataclasses.dataclass(frozen=True)
class PreferenceData:
  """Packed pairs of a split. N packed rows, T = max_length, P pairs, J = pairs_per_row.

  packed: the rows (PackedData; its conversation_* arrays list the 2 P segments, chosen and
  rejected of pair p at 2 p and 2 p + 1). reply_index (N, T) int16: see the module doc.
  pair_rows, pair_packed_row, pair_slot (P,): source row, packed row and j of each pair.
  pair_reply_tokens (P, 2): target tokens of the chosen and the rejected reply (end-of-text included).
  """
  packed: PackedData
  reply_index: np.ndarray
  pair_rows: np.ndarray
  pair_packed_row: np.ndarray
  pair_slot: np.ndarray
  pair_reply_tokens: np.ndarray
  pairs_per_row: int

  @property
  def num_rows(self) -> int:
    return self.packed.num_rows

  @property
  def num_pairs(self) -> int:
    return len(self.pair_rows)

  def pair_mask(self) -> np.ndarray:
    """(N, J) bool: where a packed row holds a pair."""
    mask = np.zeros((self.num_rows, self.pairs_per_row), bool)
    mask[self.pair_packed_row, self.pair_slot] = True
    return mask

  def rows(self, indices: np.ndarray) -> dict:
    """The batch for packed rows `indices` (-1: an empty row): packed.rows plus reply_index (n, T)
    int32 and pair_mask (n, J) float32."""
    indices = np.asarray(indices, np.int64)
    empty = indices < 0
    take = np.where(empty, 0, indices)
    batch = self.packed.rows(indices)
    batch["reply_index"] = np.where(empty[:, None], -1, self.reply_index[take]).astype(np.int32)
    batch["pair_mask"] = np.where(empty[:, None], False, self.pair_mask()[take]).astype(np.float32)
    return batch


def batch_for_step(pairs: PreferenceData, seed: int, step: int, global_batch_size: int,
                   process_index: int = 0, process_count: int = 1) -> dict:
  """This process's slice of step `step`'s global batch: the same order rule as SFT (packing.py)."""
  return pairs.rows(batch_row_indices(pairs.num_rows, seed, step, global_batch_size, process_index,
                                      process_count))


def eval_batches(pairs: PreferenceData, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1):
  """Every packed row once, in order, in fixed-shape batches; the last one filled with empty rows."""
  local = global_batch_size // process_count
  for first in range(0, pairs.num_rows, global_batch_size):
    indices = np.arange(local) + first + process_index * local
    yield pairs.rows(np.where(indices < pairs.num_rows, indices, -1))


# --- reading pairs -------------------------------------------------------------------------------

class Pair(collections.namedtuple("Pair", "row prompt chosen rejected")):
  """prompt: the turns before the final reply (conversation.Turn); chosen, rejected: reply texts."""


def _field_config(data_cfg, field: str):
  cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  cfg.field = field
  return cfg


def pair_of(chosen_text: str, rejected_text: str) -> tuple[Optional[tuple], Optional[str]]:
  """((prompt turns, chosen reply, rejected reply), None) or (None, reason) for two texts."""
  try:
    chosen, rejected = parse_conversation(chosen_text), parse_conversation(rejected_text)
  except MalformedConversation as e:
    return None, e.reason
  if chosen[:-1] != rejected[:-1]:
    return None, "no_shared_prompt"
  if not chosen[-1].text.strip() or not rejected[-1].text.strip():
    return None, "empty_reply"
  if chosen[-1].text == rejected[-1].text:
    return None, "chosen_equals_rejected"
  return (chosen[:-1], chosen[-1].text, rejected[-1].text), None


def read_pairs(data_cfg, split: str):
  """(input names, rows taken, [Pair], {reason: [row indices]}, {row: subset}, subset counts) of
  `split`; rows counted from 0 in the split, an eval split's held-out sample only (data.read_inputs:
  the rows SFT's held-out loss and the prompts are taken from).

  Raises data.BadDataError when more than data.max_bad_fraction of an input's rows (all of them,
  taken or not) are malformed.
  """
  chosen_inputs, subsets, taken = data.read_inputs(_field_config(data_cfg, CHOSEN), split)
  rejected_inputs, _, _ = data.read_inputs(_field_config(data_cfg, REJECTED), split)
  is_taken = np.zeros(len(subsets), bool)
  is_taken[taken] = True
  skipped, pairs, first = collections.defaultdict(list), [], 0
  for (name, chosen_rows), (_, rejected_rows) in zip(chosen_inputs, rejected_inputs):
    assert len(chosen_rows) == len(rejected_rows), name  # one input read twice, a field each time
    bad = collections.defaultdict(list)  # over every row of the input, taken or not
    for i, ((c_text, c_reason), (r_text, r_reason)) in enumerate(zip(chosen_rows, rejected_rows), start=first):
      reason = c_reason or r_reason
      if reason is None:
        parts, reason = pair_of(c_text, r_text)
        if parts is not None and is_taken[i]:
          pairs.append(Pair(i, *parts))
      if reason is not None:
        bad[reason].append(i)
    data.check_bad_fraction(name, bad, len(chosen_rows), data_cfg, "preference rows",
                            f"each needs {CHOSEN!r} and {REJECTED!r} texts that share the dialogue before "
                            "their final, different, non-empty replies.")
    for reason, ix in bad.items():
      skipped[reason].extend(i for i in ix if is_taken[i])
    first += len(chosen_rows)
  return ([name for name, _ in chosen_inputs], len(taken), pairs, skipped,
          {int(i): subsets[i] for i in taken}, data.subset_counts(subsets, taken))


# --- one pair -> two segments --------------------------------------------------------------------

def assemble_pair(roles: np.ndarray, turn_lengths: np.ndarray, content_ids: np.ndarray, markers: dict,
                  max_length: int):
  """Segments of one tokenised pair: turns = prompt turns + [chosen reply, rejected reply].

  Returns (chosen (ids, mask), rejected (ids, mask), first kept prompt turn) with the two segments'
  lengths summing to at most max_length, cutting the same whole turns from the left of both
  (conversation.cut_points); None when even the final exchange does not fit.
  """
  roles, turn_lengths = np.asarray(roles), np.asarray(turn_lengths)
  n = len(roles) - 2
  prompt_tokens = int(turn_lengths[:n].sum())
  chosen_end = prompt_tokens + int(turn_lengths[n])
  reply_role = np.asarray([ROLE_CODE[ASSISTANT]], roles.dtype)
  seg_roles = np.concatenate([roles[:n], reply_role])
  seg_ids = {CHOSEN: content_ids[:chosen_end],
             REJECTED: np.concatenate([content_ids[:prompt_tokens], content_ids[chosen_end:]])}
  seg_lengths = {CHOSEN: turn_lengths[:n + 1], REJECTED: np.concatenate([turn_lengths[:n], turn_lengths[n + 1:]])}
  for first in cut_points(seg_roles):
    skip = int(turn_lengths[:first].sum())
    out = [assemble_conversation(seg_roles[first:], seg_lengths[k][first:], seg_ids[k][skip:], markers,
                                 "final", max_length) for k in (CHOSEN, REJECTED)]
    if any(o is None or o[2] != 0 for o in out):
      continue  # one segment alone is longer than a row: cut more
    (c_ids, c_mask, _), (r_ids, r_mask, _) = out
    if len(c_ids) - 1 + len(r_ids) - 1 <= max_length:
      return (c_ids, c_mask), (r_ids, r_mask), first
  return None


def alone_cuts(roles: np.ndarray, turn_lengths: np.ndarray, markers: dict, max_length: int) -> tuple:
  """(first kept prompt turn of the chosen segment alone, of the rejected alone): where SFT would cut
  each sequence on its own (conversation.first_kept_turn with the row's leading end-of-text; None
  when even its final exchange does not fit). Shapes as assemble_pair's."""
  roles, turn_lengths = np.asarray(roles), np.asarray(turn_lengths)
  n = len(roles) - 2
  seg_roles = np.concatenate([roles[:n], [ROLE_CODE[ASSISTANT]]]).tolist()
  with_markers = [len(markers[r]) + int(c) for r, c in zip(seg_roles, turn_lengths[:n + 1])]
  cuts = []
  for reply in (n, n + 1):
    tokens = with_markers[:n] + [len(markers[seg_roles[n]]) + int(turn_lengths[reply])]
    cuts.append(first_kept_turn(seg_roles, tokens, max_length - 1))  # as assemble_conversation
  return tuple(cuts)


# --- the whole split -------------------------------------------------------------------------------

def build(data_cfg, tokenizer, split: str = "train", batch_size: int = 16,
          cache_dir: Optional[str] = None, *, summary_path: Optional[str] = None,
          log: Optional[Callable[[str], None]] = print) -> tuple[PreferenceData, dict]:
  """Rows of `split` -> packed preference pairs, and the summary (the same fields as data.build's,
  in pairs, plus pairs and pairs_per_row). Deterministic: every process builds the same data."""
  import datasets
  names, rows_read, pairs, skipped, row_subsets, subset_counts = read_pairs(data_cfg, split)
  if not pairs:
    raise UserError(f"no usable preference pairs in {names}: "
                     f"{dict((r, len(ix)) for r, ix in skipped.items())}")
  cache_dir = (cache_dir or data_cfg.cache_dir
               or os.path.join(datasets.config.HF_DATASETS_CACHE, "gpt2_lora_jax"))
  assistant = ROLE_CODE[ASSISTANT]
  tokenized, cache_file, from_cache = data.tokenize_conversations(
      [p.row for p in pairs], [[ROLE_CODE[t.role] for t in p.prompt] + [assistant, assistant] for p in pairs],
      [[t.text for t in p.prompt] + [p.chosen, p.rejected] for p in pairs], tokenizer, cache_dir,
      desc=f"tokenising {split} preference pairs")
  table = tokenized.data.table
  row_index = table.column("row").to_numpy()
  role_codes, role_offsets = data._list_column(table, "roles")
  content_ids, id_offsets = data._list_column(table, "ids")
  turn_lengths, _ = data._list_column(table, "turn_lengths")

  markers = marker_ids(tokenizer)
  segments, masks, used, truncated, tokens_cut = [], [], [], [], 0
  # Cut only because the two segments share a row (each alone would keep more): module docstring.
  paired_cuts, paired_skips, alone_too_long, paired_tokens_cut = [], [], [], 0
  for c, row in enumerate(row_index):
    turn_slice = slice(role_offsets[c], role_offsets[c + 1])
    alone = alone_cuts(role_codes[turn_slice], turn_lengths[turn_slice], markers, data_cfg.max_length)
    if any(a != 0 for a in alone):  # one sequence alone is longer than a row
      alone_too_long.append(int(row))
    assembled = assemble_pair(role_codes[turn_slice], turn_lengths[turn_slice],
                              content_ids[id_offsets[c]:id_offsets[c + 1]], markers, data_cfg.max_length)
    if assembled is None:
      skipped["final_exchange_too_long"].append(int(row))
      if None not in alone:
        paired_skips.append(int(row))
      continue
    (c_ids, c_mask), (r_ids, r_mask), first = assembled
    if first > 0:  # the same prompt turns were cut from both segments
      truncated.append(int(row))
      roles_cut = role_codes[turn_slice][:first]
      turn_tokens = int(sum(len(markers[r]) for r in roles_cut) + turn_lengths[turn_slice][:first].sum())
      tokens_cut += 2 * turn_tokens
      if alone == (0, 0):
        paired_cuts.append(int(row))
        paired_tokens_cut += 2 * turn_tokens
    segments += [c_ids, r_ids]
    masks += [c_mask, r_mask]
    used.append(int(row))
  if not used:
    raise UserError(f"no preference pair of {names} fits data.max_length={data_cfg.max_length}")
  P = len(used)
  cap = data_cfg.max_segments_per_row
  if cap == 1:
    raise UserError("data.max_segments_per_row=1: a preference pair needs 2 segments of one row; "
                     "set it to 0 (no cap) or an even number >= 2")
  packed = pack(segments, masks, np.repeat(used, 2), data_cfg.max_length, data_cfg.packing, cap,
                groups=[[2 * p, 2 * p + 1] for p in range(P)])
  per_row = packed.segments_per_row

  # j of each pair in its row: pairs of a row ordered by where their chosen segment starts.
  pair_packed_row = packed.conversation_packed_row[0::2]
  order = np.lexsort((packed.conversation_start[0::2], pair_packed_row))
  pair_slot = np.zeros(P, np.int64)
  row_sorted = pair_packed_row[order]
  first_of_row = np.searchsorted(row_sorted, row_sorted, side="left")
  pair_slot[order] = np.arange(P) - first_of_row
  pairs_per_row = int(pair_slot.max()) + 1
  reply_index = np.full(packed.inputs.shape, -1, np.int16)
  reply_tokens = np.zeros((P, 2), np.int64)
  for k in range(2 * P):
    r, start, L = packed.conversation_packed_row[k], packed.conversation_start[k], packed.conversation_length[k]
    mask = packed.loss_mask[r, start:start + L]
    reply_index[r, start:start + L][mask] = 2 * pair_slot[k // 2] + k % 2
    reply_tokens[k // 2, k % 2] = mask.sum()
  pref = PreferenceData(packed, reply_index, np.asarray(used, np.int64), pair_packed_row, pair_slot,
                        reply_tokens, pairs_per_row)

  assert rows_read == P + sum(len(ix) for ix in skipped.values())  # nothing lost silently
  summary = {
      "split": split, "inputs": names, "field": f"{CHOSEN} / {REJECTED}", "loss_mask": "final reply",
      "max_length": data_cfg.max_length, "packing": bool(data_cfg.packing),
      "rows_read": rows_read, "rows_used": P,
      "subsets": data.subset_summary(subset_counts, [row_subsets[r] for r in used]),
      "rows_truncated": {"count": len(truncated), "first_rows": truncated[:data.FIRST_ROWS_SHOWN]},
      "rows_bad": sum(len(ix) for reason, ix in skipped.items() if reason in BAD_REASONS),
      "rows_skipped": {reason: {"count": len(ix), "first_rows": sorted(ix)[:data.FIRST_ROWS_SHOWN]}
                       for reason, ix in sorted(skipped.items()) if ix},
      # Pairs cut although each sequence fits a row alone, and pairs skipped although each sequence
      # fits alone (cut as SFT cuts it); beside them the pairs with a sequence too long on its own.
      "cut_because_paired": {
          "truncated": {"count": len(paired_cuts), "first_rows": paired_cuts[:data.FIRST_ROWS_SHOWN],
                        "tokens_cut": paired_tokens_cut},
          "skipped": {"count": len(paired_skips), "first_rows": paired_skips[:data.FIRST_ROWS_SHOWN]},
          "sequence_alone_too_long": len(alone_too_long)},
      "tokens": packed.num_tokens, "loss_tokens": packed.num_loss_tokens,
      "tokens_cut_by_truncation": tokens_cut,
      "padding_tokens": packed.inputs.size - packed.num_tokens,
      "padding_fraction": packed.padding_fraction,
      "conversations": 2 * P, "pairs": P, "pairs_per_row": pairs_per_row,
      "packed_rows": packed.num_rows,
      "segments_per_row": {"cap": cap, "mean": float(per_row.mean()) if per_row.size else 0.0,
                           "max": int(per_row.max(initial=0)),
                           "rows_at_cap": int((per_row >= cap - 1).sum()) if cap else 0}, "examples_per_epoch": packed.num_rows,
      "batch_size": batch_size, "steps_per_epoch": data.steps_per_epoch(packed, batch_size),
      "token_cache": {"file": cache_file, "from_cache": from_cache},
  }
  if log is not None:
    log(format_summary(summary))
  if summary_path:
    data.write_summary(summary, summary_path)
  return pref, summary


def format_summary(s: dict) -> str:
  """data.format_summary's text, with pairs in place of conversations."""
  text = data.format_summary(s).replace(f"({s['conversations']:,} conversations)",
                                        f"({s['pairs']:,} pairs = {s['conversations']:,} segments, "
                                        f"at most {s['pairs_per_row']} pairs a row)")
  text = text.replace("rows used ", "pairs used")
  paired = s.get("cut_because_paired")
  if paired:
    lines = text.split("\n")
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith("rows truncated")) + 1
    lines.insert(at, f"    only because paired {paired['truncated']['count']:>6,}  (each sequence fits a row alone; "
                 f"{paired['truncated']['tokens_cut']:,} tokens cut; {paired['sequence_alone_too_long']:,} "
                 "pairs have a sequence longer than a row alone)")
    at = next((i for i, line in enumerate(lines) if line.lstrip().startswith("final_exchange_too_long")), None)
    if at is not None:
      lines.insert(at + 1, f"      only because paired {paired['skipped']['count']:>6,}  (each sequence fits alone, "
                   "cut as SFT cuts it)")
    text = "\n".join(lines)
  return text
