"""HH-RLHF rows -> turns -> token ids + loss masks -> packed fixed-shape rows (see packing.py).

    from gpt2_lora_jax import config, data, tokenizer
    data_cfg = config.default_config().data
    data_cfg.source = "files"
    data_cfg.train_files = ("../shared/data/hh-rlhf/harmless-base/test.jsonl.gz",)
    packed, summary = data.build(data_cfg, tokenizer.load("offline"), "train", batch_size=16,
                                 cache_dir="/tmp/hh-cache")
    batch = data.batch_for_step(packed, seed=0, step=0, global_batch_size=16)
    batch["inputs"].shape  # (16, 1024); also 'targets', 'loss_mask', 'segment_ids', 'positions'
    data.prompt_and_response("\\n\\nHuman: Hi\\n\\nAssistant: Hello!")
    # -> ("\\n\\nHuman: Hi\\n\\nAssistant:", " Hello!")

The rows are read by sources.py (local files, the hub, a staged TFDS dataset); how one text
becomes token ids and a loss mask (and why) is in conversation.py; packing and the order of batches
are in packing.py. Their public names are re-exported here, so callers need
only `data`. Every skipped or truncated row is counted in the summary with its reason and first
row indices; rows are indexed 0, 1, ... in reading order over all inputs of the split (files in the
given order). Every row knows its subset (read_inputs); an eval split is read as its held-out
sample (data.max_eval_rows rows stratified over the subsets, heldout.py), and the summary counts
each subset's rows in the split, read and used.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
from typing import Callable, NamedTuple, Optional

import numpy as np

from gpt2_lora_jax import sources
from gpt2_lora_jax.errors import UserError
from gpt2_lora_jax.conversation import (  # noqa: F401 (re-exported)
    ASSISTANT, HUMAN, LOSS_MASKS, MALFORMED_REASONS, MARKERS, ROLE_CODE, MalformedConversation, Turn,
    assemble_conversation, first_kept_turn, fit_prompt_token_ids, marker_ids, parse_conversation,
    prompt_and_response, prompt_token_ids)
from gpt2_lora_jax.heldout import (  # noqa: F401 (re-exported)
    SUBSETS, stratified_sample, subset_counts, subset_of_path, subset_summary)
from gpt2_lora_jax.packing import (  # noqa: F401 (re-exported)
    PackedData, batch_for_step, batch_row_indices, eval_batches, pack, steps_per_epoch)

SOURCES = ("hub", "files", "tfds", "demo")
SPLITS = ("train", "eval")
# Malformed rows; their share of an input is held against data.max_bad_fraction.
BAD_REASONS = ("invalid_json", "missing_field", "field_not_string", "not_utf8") + MALFORMED_REASONS
# Well-formed rows that cannot be trained on.
SKIP_REASONS = ("empty_final_reply", "final_exchange_too_long", "reward_filter")
FIRST_ROWS_SHOWN = 5
CACHE_VERSION = 1  # bump when parsing or the cached columns change


class BadDataError(UserError):
  """More malformed rows in an input than data.max_bad_fraction allows."""


def _constant(label: str) -> Callable[[int], list]:
  return lambda n: [label] * n


def _inputs(data_cfg, split: str, with_subsets: bool = False) -> list[tuple]:
  """(name, read) for each input of `split`; checks the config first so errors come before work.

  with_subsets: (name, read, subsets) where subsets(n) lists the subset of each of the input's n
  rows: the hub subset it was loaded from (subset 'all' is read as its four subsets, each with
  datasets.load_dataset(hub_id, data_dir=subset)), a file's subset_of_path, a demo row's task
  (demo/data.py's task_of), and for tfds the whole staged split as one subset.
  """
  inputs = _inputs_with_subsets(data_cfg, split)
  return inputs if with_subsets else [(name, read) for name, read, _ in inputs]


def _inputs_with_subsets(data_cfg, split: str) -> list[tuple[str, Callable[[], list], Callable[[int], list]]]:
  if split not in SPLITS:
    raise ValueError(f"split {split!r}: choose one of {SPLITS}")
  if data_cfg.loss_mask not in LOSS_MASKS:
    raise UserError(f"data.loss_mask={data_cfg.loss_mask!r}: choose one of {LOSS_MASKS}")
  if data_cfg.max_length < 2:
    raise UserError(f"data.max_length={data_cfg.max_length} must be at least 2")
  field = data_cfg.field
  if data_cfg.source == "hub":
    if data_cfg.subset not in sources.SUBSET_CHOICES:
      raise UserError(f"unknown HH-RLHF subset {data_cfg.subset!r} (data.subset): choose one of "
                       f"{', '.join(sources.SUBSET_CHOICES)}")
    split_name = data_cfg.train_split if split == "train" else data_cfg.eval_split
    subsets = SUBSETS if data_cfg.subset == "all" else (data_cfg.subset,)
    return [(f"{data_cfg.hub_id} (subset {subset}, split {split_name})",
             lambda subset=subset: sources.read_hub(data_cfg.hub_id, subset, split_name, field), _constant(subset))
            for subset in subsets]
  if data_cfg.source == "files":
    flag = "data.train_files" if split == "train" else "data.eval_files"
    files = data_cfg.train_files if split == "train" else data_cfg.eval_files
    # A comma-separated string works too: --config.data.train_files=a.jsonl.gz,b.jsonl arrives as
    # the one-element tuple ('a.jsonl.gz,b.jsonl',).
    files = tuple(p.strip() for f in ((files,) if isinstance(files, str) else files)
                  for p in str(f).split(",") if p.strip())
    if not files:
      raise UserError(f"data.source='files' needs {flag}: --config.{flag}=path/rows.jsonl.gz")
    for path in files:
      if not path.endswith(sources.FILE_SUFFIXES):
        raise UserError(f"data file {path!r} ({flag}) has an unknown type: use one of "
                         f"{', '.join(sources.FILE_SUFFIXES)}")
      if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} ({flag}) does not exist")
    return [(path, lambda path=path: sources.read_file(path, field), _constant(subset_of_path(path))) for path in files]
  if data_cfg.source == "tfds":  # rows staged once by tfds_source.py, for pods (the 'tfds' extra)
    split_name = data_cfg.train_split if split == "train" else data_cfg.eval_split
    name, read = sources.input_for(getattr(data_cfg, "tfds_dir", ""), split_name, field)
    return [(name, read, _constant(f"tfds split {split_name}"))]
  if data_cfg.source == "demo":  # conversations written for the offline demo (demo/data.py)
    from gpt2_lora_jax.demo import data as demo_data
    demo_split = "train" if split == "train" else "test"
    wrong = data_cfg.get("demo_wrong_share", 0.0) if split == "train" else 0.0  # test rows stay right
    read = lambda: [(row[field], None) for row in demo_data.rows(demo_split, data_cfg.demo_rows, wrong_share=wrong)]
    tasks = lambda n: [row["subset"] for row in demo_data.rows(demo_split, data_cfg.demo_rows)][:n]
    return [(f"demo conversations ({demo_split})", read, tasks)]
  raise UserError(f"data.source={data_cfg.source!r} is not supported here: choose one of {SOURCES}")


class SplitRows(NamedTuple):
  names: list[str]  # the inputs read, in order
  rows_read: int  # rows of the split taken (all, or the held-out sample of an eval split)
  conversations: list[tuple[int, str, list[Turn]]]  # (row index, text, turns) of well-formed rows
  skipped: dict[str, list[int]]  # reason -> row indices of the malformed rows
  subsets: dict[int, str]  # row index -> its subset, for every row taken
  subset_counts: dict[str, dict]  # subset -> {'rows_in_split', 'rows_read'}


def read_inputs(data_cfg, split: str):
  """(inputs [(name, rows)], subsets of all rows in reading order, indices of the rows taken).

  An eval split is sampled: data.max_eval_rows rows (0: all), stratified_sample over the subsets
  with data.eval_seed, so held-out loss, preference accuracy and prompts see the same rows.
  """
  inputs, subsets = [], []
  for name, read, subsets_of in _inputs(data_cfg, split, with_subsets=True):
    rows = read()
    inputs.append((name, rows))
    subsets += subsets_of(len(rows))
  n = data_cfg.max_eval_rows if split == "eval" else 0
  return inputs, subsets, stratified_sample(subsets, n, data_cfg.get("eval_seed", 0))


def check_bad_fraction(name: str, bad: dict, n_rows: int, data_cfg, kind: str, advice: str):
  """BadDataError when more than data.max_bad_fraction of an input's n_rows rows are malformed."""
  n_bad = sum(len(ix) for ix in bad.values())
  if n_bad > data_cfg.max_bad_fraction * n_rows:
    raise BadDataError(
        f"{name}: {n_bad} of {n_rows} {kind} are malformed, more than data.max_bad_fraction="
        f"{data_cfg.max_bad_fraction}: " + "; ".join(
            f"{reason}: {len(ix)} (rows {ix[:FIRST_ROWS_SHOWN]})" for reason, ix in sorted(bad.items()))
        + f". Rows are counted from 0 in reading order; {advice}")


def read_split(data_cfg, split: str) -> SplitRows:
  """Reads and parses the rows of `split` ('train' or 'eval'; an eval split's held-out sample only,
  read_inputs). Raises BadDataError when more than data.max_bad_fraction of an input's rows are
  malformed (all its rows: a small sample would make one bad row a large share).
  """
  inputs, subsets, taken = read_inputs(data_cfg, split)
  is_taken = np.zeros(len(subsets), bool)
  is_taken[taken] = True
  skipped = collections.defaultdict(list)
  conversations = []
  first = 0
  for name, input_rows in inputs:
    bad = collections.defaultdict(list)  # over every row of the input, taken or not
    for i, (text, reason) in enumerate(input_rows, start=first):
      if reason is None:
        try:
          turns = parse_conversation(text)
          if is_taken[i]:
            conversations.append((i, text, turns))
        except MalformedConversation as e:
          reason = e.reason
      if reason is not None:
        bad[reason].append(i)
    check_bad_fraction(name, bad, len(input_rows), data_cfg, "rows", f"data.field is {data_cfg.field!r}.")
    for reason, ix in bad.items():
      skipped[reason].extend(i for i in ix if is_taken[i])
    first += len(input_rows)
  return SplitRows([name for name, _ in inputs], len(taken), conversations, skipped,
                   {int(i): subsets[i] for i in taken}, subset_counts(subsets, taken))


def read_texts(data_cfg, split: str) -> list[str]:
  """Texts of the well-formed rows of `split`, in reading order (an eval split: its held-out sample)."""
  return [text for _, text, _ in read_split(data_cfg, split).conversations]


def read_heldout(data_cfg) -> tuple[list[tuple[int, str, str]], dict]:
  """([(row index, text, subset)] of the well-formed rows of the held-out sample, subset counts)."""
  rows = read_split(data_cfg, "eval")
  return [(i, text, rows.subsets[i]) for i, text, _ in rows.conversations], rows.subset_counts


# --- tokenising, cached ----------------------------------------------------------------------------

def _tokenize_batch(batch: dict, tokenizer) -> dict:
  """datasets.map function: every turn of a batch of conversations in one fast-tokenizer call."""
  flat = [text for turns in batch["turns"] for text in turns]
  encoded = tokenizer(flat, add_special_tokens=False, return_attention_mask=False,
                      verbose=False)["input_ids"] if flat else []
  ids, turn_lengths, k = [], [], 0
  for turns in batch["turns"]:
    row = encoded[k:k + len(turns)]
    k += len(turns)
    ids.append([t for turn in row for t in turn])
    turn_lengths.append([len(turn) for turn in row])
  return {"ids": ids, "turn_lengths": turn_lengths}


def _cache_key(rows: list[int], roles: list[list[int]], turns: list[list[str]], tokenizer) -> str:
  """sha256 of what tokenising depends on: the parsed turns, their row indices and the tokenizer."""
  h = hashlib.sha256(f"gpt2_lora_jax.data v{CACHE_VERSION}\n".encode())
  backend = getattr(tokenizer, "backend_tokenizer", None)  # vocabulary, merges, pre-tokenizer
  h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
  for row, row_roles, row_turns in zip(rows, roles, turns):
    h.update(f"\x1e{row}:{row_roles}".encode())
    for text in row_turns:
      h.update(b"\x1f" + text.encode("utf-8"))
  return h.hexdigest()


def tokenize_conversations(rows, roles, turns, tokenizer, cache_dir: str, desc: str):
  """Tokenises every turn with datasets.map (batched, with a progress bar) into an Arrow cache file.

  A second call with the same turns and tokenizer reads that file instead of tokenising.
  Returns (datasets.Dataset with columns row, roles, ids, turn_lengths; cache file; from_cache).
  """
  import datasets
  key = _cache_key(rows, roles, turns, tokenizer)
  os.makedirs(cache_dir, exist_ok=True)
  cache_file = os.path.join(cache_dir, f"hh-tokens-{key[:24]}.arrow")
  if os.path.exists(cache_file):
    return datasets.Dataset.from_file(cache_file), cache_file, True
  table = datasets.Dataset.from_dict(
      {"row": rows, "roles": roles, "turns": turns},
      features=datasets.Features({"row": datasets.Value("int64"),
                                  "roles": datasets.List(datasets.Value("int8")),
                                  "turns": datasets.List(datasets.Value("string"))}))
  tokenized = table.map(
      _tokenize_batch, fn_kwargs={"tokenizer": tokenizer}, batched=True, batch_size=1000,
      remove_columns=["turns"], cache_file_name=cache_file, new_fingerprint=key[:32], desc=desc,
      features=datasets.Features({"row": datasets.Value("int64"),
                                  "roles": datasets.List(datasets.Value("int8")),
                                  "ids": datasets.List(datasets.Value("int32")),
                                  "turn_lengths": datasets.List(datasets.Value("int32"))}))
  return tokenized, cache_file, False


def _list_column(table, name: str) -> tuple[np.ndarray, np.ndarray]:
  """(values, offsets) of an Arrow list column: row i is values[offsets[i]:offsets[i + 1]]."""
  column = table.column(name).combine_chunks()
  offsets = column.offsets.to_numpy()
  return column.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]


# --- the whole split -------------------------------------------------------------------------------

def build(data_cfg, tokenizer, split: str = "train", batch_size: int = 16,
          cache_dir: Optional[str] = None, *, summary_path: Optional[str] = None,
          log: Optional[Callable[[str], None]] = print, reward_scorer=None) -> tuple[PackedData, dict]:
  """Rows of `split` ('train' or 'eval') -> packed fixed-shape rows, and the summary of what happened.

  data_cfg: the config's `data` section. batch_size: the global batch size (for steps per epoch).
  cache_dir: where tokenised rows are cached (default data_cfg.cache_dir, else the datasets cache).
  reward_scorer: what scores training rows when data.reward_filter is on (reward_filter.Scorer).
  The summary is logged as text (log=None to keep quiet) and, with summary_path, written as JSON.
  Deterministic: every process of a multi-host run builds the same PackedData.
  """
  import datasets
  from gpt2_lora_jax import reward_filter
  split_rows = read_split(data_cfg, split)
  skipped = split_rows.skipped
  usable = []
  for row, _, conversation in split_rows.conversations:
    if not conversation[-1].text.strip():
      skipped["empty_final_reply"].append(row)
    else:
      usable.append((row, conversation))
  names, rows_read = split_rows.names, split_rows.rows_read
  if not usable:
    raise UserError(f"no usable rows in {names}: {dict((r, len(ix)) for r, ix in skipped.items())}")
  cache_dir = (cache_dir or data_cfg.cache_dir
               or os.path.join(datasets.config.HF_DATASETS_CACHE, "gpt2_lora_jax"))
  filtered = None  # data.reward_filter's counts (training rows only; held-out rows are never filtered)
  if split == "train" and reward_filter.active(data_cfg):
    keep, skipped[reward_filter.REASON], filtered = reward_filter.apply(
        data_cfg.reward_filter, usable, reward_scorer, cache_dir, log)
    usable = [(row, conversation) for row, conversation in usable if row in keep]
  rows = [row for row, _ in usable]
  roles = [[ROLE_CODE[t.role] for t in conversation] for _, conversation in usable]
  turns = [[t.text for t in conversation] for _, conversation in usable]

  tokenized, cache_file, from_cache = tokenize_conversations(
      rows, roles, turns, tokenizer, cache_dir, desc=f"tokenising {split} conversations")
  table = tokenized.data.table
  row_index = table.column("row").to_numpy()
  role_codes, role_offsets = _list_column(table, "roles")
  content_ids, id_offsets = _list_column(table, "ids")
  turn_lengths, _ = _list_column(table, "turn_lengths")

  markers = marker_ids(tokenizer)
  token_ids, loss_masks, used, truncated, tokens_cut = [], [], [], [], 0
  for c, row in enumerate(row_index):
    turn_slice = slice(role_offsets[c], role_offsets[c + 1])
    lengths = turn_lengths[turn_slice]
    assembled = assemble_conversation(role_codes[turn_slice], lengths,
                                      content_ids[id_offsets[c]:id_offsets[c + 1]], markers,
                                      data_cfg.loss_mask, data_cfg.max_length)
    if assembled is None:
      skipped["final_exchange_too_long"].append(int(row))
      continue
    ids, mask, first_turn = assembled
    if first_turn > 0:
      truncated.append(int(row))
      tokens_cut += int(sum(len(markers[r]) for r in role_codes[turn_slice][:first_turn])
                        + lengths[:first_turn].sum())
    token_ids.append(ids)
    loss_masks.append(mask)
    used.append(int(row))
  cap = data_cfg.max_segments_per_row
  packed = pack(token_ids, loss_masks, used, data_cfg.max_length, data_cfg.packing, cap)
  per_row = packed.segments_per_row

  assert rows_read == len(used) + sum(len(ix) for ix in skipped.values())  # nothing lost silently
  summary = {
      "split": split,
      "inputs": names,
      "field": data_cfg.field,
      "loss_mask": data_cfg.loss_mask,
      "max_length": data_cfg.max_length,
      "packing": bool(data_cfg.packing),
      "rows_read": rows_read,
      "subsets": subset_summary(split_rows.subset_counts, [split_rows.subsets[r] for r in used]),
      "rows_used": len(used),
      "rows_truncated": {"count": len(truncated), "first_rows": truncated[:FIRST_ROWS_SHOWN]},
      "rows_bad": sum(len(ix) for reason, ix in skipped.items() if reason in BAD_REASONS),
      "rows_skipped": {reason: {"count": len(ix), "first_rows": sorted(ix)[:FIRST_ROWS_SHOWN]}
                       for reason, ix in sorted(skipped.items()) if ix},
      "tokens": packed.num_tokens,
      "loss_tokens": packed.num_loss_tokens,
      "tokens_cut_by_truncation": tokens_cut,
      "padding_tokens": packed.inputs.size - packed.num_tokens,
      "padding_fraction": packed.padding_fraction,
      "conversations": len(used),
      "packed_rows": packed.num_rows,
      # A row at the cap was closed with room left; the conversations that did not join it went
      # to other rows (none is dropped).
      "segments_per_row": {"cap": cap, "mean": float(per_row.mean()) if per_row.size else 0.0,
                           "max": int(per_row.max(initial=0)),
                           "rows_at_cap": int((per_row == cap).sum()) if cap else 0},
      "examples_per_epoch": packed.num_rows,
      "batch_size": batch_size,
      "steps_per_epoch": steps_per_epoch(packed, batch_size),
      "token_cache": {"file": cache_file, "from_cache": from_cache},
      **({"reward_filter": filtered} if filtered else {}),
  }
  if log is not None:
    log(format_summary(summary))
  if summary_path:
    write_summary(summary, summary_path)
  return packed, summary


def write_summary(summary: dict, path: str) -> None:
  """The summary as JSON (written to a temporary file first, so a reader never sees half of it)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=2)
  os.replace(path + ".tmp", path)


def format_summary(s: dict) -> str:
  """The summary as the text a person reads before training."""
  def rows_list(ix):
    return ", ".join(map(str, ix)) + (", ..." if len(ix) == FIRST_ROWS_SHOWN else "")
  lines = [f"data ({s['split']}): {', '.join(s['inputs'])}",
           f"  field {s['field']!r}, loss mask {s['loss_mask']!r}, max_length {s['max_length']}, "
           f"packing {'on' if s['packing'] else 'off'}",
           f"  rows read         {s['rows_read']:>10,}",
           *([f"  subsets           " + "; ".join(
               f"{name} {c['rows_used']:,} used of {c['rows_read']:,} read"
               + (f" of {c['rows_in_split']:,}" if c["rows_in_split"] != c["rows_read"] else "")
               for name, c in s["subsets"].items())] if s.get("subsets") else []),
           f"  rows used         {s['rows_used']:>10,}",
           f"  rows truncated    {s['rows_truncated']['count']:>10,}"
           + (f"  (cut from the left; rows {rows_list(s['rows_truncated']['first_rows'])})"
              if s["rows_truncated"]["count"] else ""),
           f"  rows skipped      {sum(v['count'] for v in s['rows_skipped'].values()):>10,}"
           f"  ({s['rows_bad']:,} malformed)"]
  for reason, v in s["rows_skipped"].items():
    lines.append(f"    {reason:<24}{v['count']:>8,}  rows {rows_list(v['first_rows'])}")
  if f := s.get("reward_filter"):
    lines.append(f"  reward filter     {f['kept']:>10,}  kept of {f['scored']:,} scored (reward >= "
                 f"{f['threshold']:.4f}; {f['dropped_below_top_fraction']:,} below the top "
                 f"{f['keep_fraction']:g}, {f['dropped_below_min_reward']:,} below min_reward)")
  loss_share = s["loss_tokens"] / max(s["tokens"], 1)
  lines += [f"  tokens            {s['tokens']:>10,}  ({s['loss_tokens']:,} under the loss, "
            f"{loss_share:.1%}; {s['tokens_cut_by_truncation']:,} cut by truncation)",
            f"  packed rows       {s['packed_rows']:>10,}  x {s['max_length']} "
            f"({s['conversations']:,} conversations), padding {s['padding_fraction']:.2%}",
            f"  segments per row  {s['segments_per_row']['mean']:>10.2f}  mean, max "
            f"{s['segments_per_row']['max']} (cap {s['segments_per_row']['cap'] or 'none'}; "
            f"{s['segments_per_row']['rows_at_cap']:,} rows at the cap)",
            f"  epoch             {s['examples_per_epoch']:>10,}  rows = {s['steps_per_epoch']:,.2f} "
            f"steps at batch size {s['batch_size']}",
            f"  token cache       {'read' if s['token_cache']['from_cache'] else 'written'} "
            f"{s['token_cache']['file']}"]
  return "\n".join(lines)
