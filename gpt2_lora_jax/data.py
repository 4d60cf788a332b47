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

How a text becomes tokens, and why:
- A text is a sequence of turns, each a marker "\\n\\nHuman:" or "\\n\\nAssistant:" followed by its
  content. Only these markers split turns: a "Human:" inside a reply (real rows have
  "Assistant: Human: ...") stays part of the reply; two turns of one role in a row stay two turns.
- A reply's tokens are its content after "Assistant:", the leading " " included: sampling prompts
  end at "Assistant:", so the model must produce the space, and GPT-2's BPE fuses it with the first
  word (" Sure" is one token); moving it into the prompt would end prompts on a lone " " token.
- The "\\n\\n" before the next turn belongs to that turn's marker: "\\n\\nHuman:" is one unit (and
  the stop string at sampling), so the tokens under the loss decode to exactly the reply texts.
- Markers and contents are tokenised separately and concatenated, so token boundaries fall on turn
  boundaries and a loss mask is a union of whole turns.
- Each conversation is framed by end-of-text (50256) on both sides, as GPT-2's pretraining
  documents were. The leading one gives the first real token a target (so mask 'all' trains on
  every token of the text); the trailing one follows the final reply, is trained on in every mask
  mode, and teaches the model to stop. `prompt_token_ids` builds sampling prompts the same way.
- Leading whitespace of a text and trailing whitespace of its final reply are dropped; a row whose
  final reply is then empty is skipped (it would teach the model to answer nothing).
- Too long for max_length: whole turns are cut from the left so that the kept part starts at a
  Human turn and keeps the final exchange; a row whose final exchange alone does not fit is skipped.
Every skipped or truncated row is counted in the summary with its reason and first row indices.
Rows are indexed 0, 1, ... in reading order over all inputs of the split (files in the given order).
"""
from __future__ import annotations

import collections
import gzip
import hashlib
import json
import os
import re
from typing import Callable, NamedTuple, Optional

import numpy as np

from gpt2_lora_jax import hub
from gpt2_lora_jax.packing import (PackedData, batch_for_step, batch_row_indices, eval_batches,  # noqa: F401 (re-exported)
                                   pack, steps_per_epoch)
from gpt2_lora_jax.tokenizer import EOT, EOT_ID

HUMAN, ASSISTANT = "Human", "Assistant"
MARKERS = {HUMAN: "\n\nHuman:", ASSISTANT: "\n\nAssistant:"}
_MARKER_RE = re.compile(r"\n\n(Human|Assistant):")
_ROLE_CODE = {HUMAN: 0, ASSISTANT: 1}  # how roles are stored in the token cache
SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
SUBSET_CHOICES = SUBSETS + ("all",)  # 'all' = the hub dataset's default: the four together
SOURCES = ("hub", "files")
LOSS_MASKS = ("all", "assistant", "final")
SPLITS = ("train", "eval")
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
# Malformed rows; their share of an input is held against data.max_bad_fraction.
BAD_REASONS = ("invalid_json", "missing_field", "field_not_string", "not_utf8",
               "text_before_first_turn", "no_human_turn", "no_assistant_turn", "ends_with_human_turn")
# Well-formed rows that cannot be trained on.
SKIP_REASONS = ("empty_final_reply", "final_exchange_too_long")
FIRST_ROWS_SHOWN = 5
CACHE_VERSION = 1  # bump when parsing or the cached columns change


class Turn(NamedTuple):
  role: str  # 'Human' or 'Assistant'
  text: str  # what follows the marker "\n\n{role}:", its leading space included


class MalformedConversation(ValueError):
  """A text that is not an HH-RLHF conversation; `reason` is one of BAD_REASONS."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


class BadDataError(ValueError):
  """More malformed rows in an input than data.max_bad_fraction allows."""


# --- one conversation ----------------------------------------------------------------------------

def parse_conversation(text: str) -> list[Turn]:
  """Turns of an HH-RLHF text "\\n\\nHuman: ...\\n\\nAssistant: ...", the last one an Assistant reply.

  Leading whitespace of the text and trailing whitespace of the final reply are dropped; the final
  reply may be empty. Raises MalformedConversation with a reason from BAD_REASONS.
  """
  parts = _MARKER_RE.split("\n\n" + text.lstrip())  # ['', role, content, role, content, ...]
  roles = parts[1::2]
  if HUMAN not in roles:
    raise MalformedConversation("no_human_turn", f"no '\\n\\nHuman:' turn in {text[:80]!r}")
  if ASSISTANT not in roles:
    raise MalformedConversation("no_assistant_turn", f"no '\\n\\nAssistant:' turn in {text[:80]!r}")
  if parts[0]:
    raise MalformedConversation("text_before_first_turn", f"text before the first turn: {parts[0][:80]!r}")
  if roles[-1] != ASSISTANT:
    raise MalformedConversation("ends_with_human_turn", f"ends with a Human turn: {parts[-1][:80]!r}")
  turns = [Turn(role, content) for role, content in zip(roles, parts[2::2])]
  turns[-1] = Turn(ASSISTANT, turns[-1].text.rstrip())
  return turns


def prompt_and_response(text: str) -> tuple[str, str]:
  """(everything up to and including the final "\\n\\nAssistant:", the final reply).

  prompt + response is the text without leading whitespace or the final reply's trailing whitespace.
  """
  turns = parse_conversation(text)
  prompt = "".join(MARKERS[t.role] + t.text for t in turns[:-1]) + MARKERS[ASSISTANT]
  return prompt, turns[-1].text


def _marker_ids(tokenizer) -> dict[int, np.ndarray]:
  """Token ids of each role's marker, keyed by role code."""
  ids = tokenizer([MARKERS[HUMAN], MARKERS[ASSISTANT]], add_special_tokens=False,
                  return_attention_mask=False)["input_ids"]
  return {_ROLE_CODE[HUMAN]: np.asarray(ids[0], np.int32), _ROLE_CODE[ASSISTANT]: np.asarray(ids[1], np.int32)}


def prompt_token_ids(tokenizer, text: str) -> list[int]:
  """Ids the model reads before the final reply, tokenised as in training: [EOT] + turns + marker.

  `text` may be a whole conversation or a prompt from prompt_and_response (ending in "Assistant:").
  """
  turns = parse_conversation(text)[:-1]
  markers = _marker_ids(tokenizer)
  contents = tokenizer([t.text for t in turns] or [""], add_special_tokens=False,
                       return_attention_mask=False, verbose=False)["input_ids"]
  ids = [EOT_ID]
  for turn, content in zip(turns, contents):
    ids += markers[_ROLE_CODE[turn.role]].tolist() + list(content)
  return ids + markers[_ROLE_CODE[ASSISTANT]].tolist()


def assemble_conversation(roles: np.ndarray, turn_lengths: np.ndarray, content_ids: np.ndarray,
                          marker_ids: dict[int, np.ndarray], loss_mask: str, max_length: int):
  """Token ids and loss mask of one tokenised conversation, cut from the left to fit max_length.

  roles (n,) role codes; turn_lengths (n,) content tokens per turn; content_ids (sum of lengths,)
  the contents' tokens back to back. Returns (ids (L + 1,), mask (L,) bool over ids[1:], first kept
  turn) with L <= max_length, or None when the final exchange alone does not fit.
  """
  # Per-turn bookkeeping in Python ints: a conversation has ~10 turns, too few for numpy to pay off.
  roles, turn_lengths = np.asarray(roles).tolist(), np.asarray(turn_lengths).tolist()
  n = len(roles)
  human, assistant = _ROLE_CODE[HUMAN], _ROLE_CODE[ASSISTANT]
  marker_lengths = [len(marker_ids[r]) for r in roles]
  tokens_from = [0] * (n + 1)  # tokens of turns i..n-1
  for i in reversed(range(n)):
    tokens_from[i] = tokens_from[i + 1] + marker_lengths[i] + turn_lengths[i]
  last_human = max(i for i in range(n) if roles[i] == human)
  # Cut points: the start, or any Human turn up to the final exchange's, so a kept part opens
  # like every real conversation (and every sampling prompt) does.
  cut_points = [0] + [i for i in range(1, last_human + 1) if roles[i] == human]
  first = next((i for i in cut_points if 1 + tokens_from[i] <= max_length), None)  # + leading EOT
  if first is None:
    return None
  pieces = [np.asarray([EOT_ID], np.int32)]
  piece_trained, piece_lengths = [], []  # over ids[1:]: marker, content, ..., final end-of-text
  start = sum(turn_lengths[:first])
  for i in range(first, n):
    pieces += [marker_ids[roles[i]], content_ids[start:start + turn_lengths[i]]]
    start += turn_lengths[i]
    is_reply = roles[i] == assistant
    train_content = (loss_mask == "all" or (loss_mask == "assistant" and is_reply)
                     or (is_reply and i == n - 1))
    piece_trained += [loss_mask == "all", train_content]
    piece_lengths += [marker_lengths[i], turn_lengths[i]]
  pieces.append(np.asarray([EOT_ID], np.int32))
  piece_trained.append(True)  # the end-of-text after the final reply: learn to stop
  piece_lengths.append(1)
  mask = np.repeat(np.asarray(piece_trained), piece_lengths)
  return np.concatenate(pieces).astype(np.int32), mask, first


# --- reading rows --------------------------------------------------------------------------------

def _field_of(obj, field: str) -> tuple[Optional[str], Optional[str]]:
  """(text, None) or (None, reason) for one decoded row."""
  if not isinstance(obj, dict) or obj.get(field) is None:
    return None, "missing_field"
  text = obj[field]
  if not isinstance(text, str):
    return None, "field_not_string"
  try:
    text.encode("utf-8")  # lone surrogates from JSON escapes cannot reach the Rust tokenizer
  except UnicodeEncodeError:
    return None, "not_utf8"
  return text, None


def _json_lines(lines, field: str) -> list[tuple[Optional[str], Optional[str]]]:
  rows = []
  for line in lines:
    if not line.strip():  # blank lines (a trailing newline) are not rows
      continue
    try:
      obj = json.loads(line)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
      rows.append((None, "invalid_json"))
      continue
    rows.append(_field_of(obj, field))
  return rows


def read_file(path: str, field: str) -> list[tuple[Optional[str], Optional[str]]]:
  """Rows of a .jsonl(.gz), .json(.gz) (an array or JSON lines) or .parquet file: (text, bad reason).

  JSON lines are decoded one by one here (datasets' json loader stops at the first bad line), so a
  bad line becomes a counted row instead of a failed load.
  """
  opener = gzip.open if path.endswith(".gz") else open
  if path.endswith((".jsonl", ".jsonl.gz")):
    with opener(path, "rb") as f:
      return _json_lines(f, field)
  if path.endswith((".json", ".json.gz")):
    with opener(path, "rb") as f:
      content = f.read()
    try:
      obj = json.loads(content)
    except ValueError:  # not one JSON document: read it as JSON lines
      return _json_lines(content.splitlines(), field)
    if not isinstance(obj, list):
      raise ValueError(f"{path}: expected a JSON array of rows or JSON lines, found a "
                       f"{type(obj).__name__}")
    return [_field_of(row, field) for row in obj]
  if path.endswith(".parquet"):
    import datasets
    table = datasets.load_dataset("parquet", data_files=path, split="train")
    if field not in table.column_names:
      return [(None, "missing_field")] * len(table)
    return [_field_of({field: text}, field) for text in table[field]]
  raise ValueError(f"data file {path!r} has an unknown type: use one of {', '.join(FILE_SUFFIXES)}")


def read_hub(hub_id: str, subset: str, split_name: str, field: str):
  """Rows of the hub dataset through datasets.load_dataset; subsets are data_dirs of the repo."""
  import datasets
  try:
    table = datasets.load_dataset(hub_id, data_dir=None if subset == "all" else subset, split=split_name)
  except Exception as e:  # offline, firewalled, unknown id or split: one message that says what to do
    first_line = str(e).splitlines()[0] if str(e) else ""
    raise hub.HubUnreachableError(
        f"could not load {hub_id!r} (subset {subset!r}, split {split_name!r}) with "
        f"datasets.load_dataset ({type(e).__name__}: {first_line}). The Hugging Face hub is "
        "unreachable from here or refused the request. Train from local copies of the rows instead: "
        "--config.data.source=files --config.data.train_files=path/train.jsonl.gz "
        "--config.data.eval_files=path/test.jsonl.gz (.jsonl, .jsonl.gz, .json or .parquet rows "
        f"with a {field!r} field).") from e
  if field not in table.column_names:
    raise ValueError(f"{hub_id!r} has no field {field!r} (data.field); its fields: {table.column_names}")
  return [_field_of({field: text}, field) for text in table[field]]


def _inputs(data_cfg, split: str) -> list[tuple[str, Callable[[], list]]]:
  """(name, read) for each input of `split`; checks the config first so errors come before work."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r}: choose one of {SPLITS}")
  if data_cfg.loss_mask not in LOSS_MASKS:
    raise ValueError(f"data.loss_mask={data_cfg.loss_mask!r}: choose one of {LOSS_MASKS}")
  if data_cfg.max_length < 2:
    raise ValueError(f"data.max_length={data_cfg.max_length} must be at least 2")
  field = data_cfg.field
  if data_cfg.source == "hub":
    if data_cfg.subset not in SUBSET_CHOICES:
      raise ValueError(f"unknown HH-RLHF subset {data_cfg.subset!r} (data.subset): choose one of "
                       f"{', '.join(SUBSET_CHOICES)}")
    split_name = data_cfg.train_split if split == "train" else data_cfg.eval_split
    name = f"{data_cfg.hub_id} (subset {data_cfg.subset}, split {split_name})"
    return [(name, lambda: read_hub(data_cfg.hub_id, data_cfg.subset, split_name, field))]
  if data_cfg.source == "files":
    flag = "data.train_files" if split == "train" else "data.eval_files"
    files = data_cfg.train_files if split == "train" else data_cfg.eval_files
    files = (files,) if isinstance(files, str) else tuple(files)
    if not files:
      raise ValueError(f"data.source='files' needs {flag}: --config.{flag}=path/rows.jsonl.gz")
    for path in files:
      if not path.endswith(FILE_SUFFIXES):
        raise ValueError(f"data file {path!r} ({flag}) has an unknown type: use one of "
                         f"{', '.join(FILE_SUFFIXES)}")
      if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} ({flag}) does not exist")
    return [(path, lambda path=path: read_file(path, field)) for path in files]
  raise ValueError(f"data.source={data_cfg.source!r} is not supported here: choose one of {SOURCES}")


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
          log: Optional[Callable[[str], None]] = print) -> tuple[PackedData, dict]:
  """Rows of `split` ('train' or 'eval') -> packed fixed-shape rows, and the summary of what happened.

  data_cfg: the config's `data` section. batch_size: the global batch size (for steps per epoch).
  cache_dir: where tokenised rows are cached (default data_cfg.cache_dir, else the datasets cache).
  The summary is logged as text (log=None to keep quiet) and, with summary_path, written as JSON.
  Deterministic: every process of a multi-host run builds the same PackedData.
  """
  import datasets
  inputs = _inputs(data_cfg, split)
  cap = data_cfg.max_eval_rows if split == "eval" else 0
  skipped = collections.defaultdict(list)  # reason -> row indices
  rows, roles, turns = [], [], []
  rows_read = 0
  for name, read in inputs:
    if cap and rows_read >= cap:
      break
    input_rows = read()[:cap - rows_read] if cap else read()
    bad = collections.defaultdict(list)
    for i, (text, reason) in enumerate(input_rows, start=rows_read):
      if reason is None:
        try:
          conversation = parse_conversation(text)
        except MalformedConversation as e:
          reason = e.reason
      if reason is not None:
        bad[reason].append(i)
      elif not conversation[-1].text.strip():
        skipped["empty_final_reply"].append(i)
      else:
        rows.append(i)
        roles.append([_ROLE_CODE[t.role] for t in conversation])
        turns.append([t.text for t in conversation])
    n_bad = sum(len(v) for v in bad.values())
    if n_bad > data_cfg.max_bad_fraction * len(input_rows):
      raise BadDataError(
          f"{name}: {n_bad} of {len(input_rows)} rows are malformed, more than data.max_bad_fraction="
          f"{data_cfg.max_bad_fraction}: " + "; ".join(
              f"{reason}: {len(ix)} (rows {ix[:FIRST_ROWS_SHOWN]})" for reason, ix in sorted(bad.items()))
          + f". Rows are counted from 0 in reading order; data.field is {data_cfg.field!r}.")
    for reason, ix in bad.items():
      skipped[reason].extend(ix)
    rows_read += len(input_rows)
  names = [name for name, _ in inputs]
  if not rows:
    raise ValueError(f"no usable rows in {names}: {dict((r, len(ix)) for r, ix in skipped.items())}")

  cache_dir = (cache_dir or data_cfg.cache_dir
               or os.path.join(datasets.config.HF_DATASETS_CACHE, "gpt2_lora_jax"))
  tokenized, cache_file, from_cache = tokenize_conversations(
      rows, roles, turns, tokenizer, cache_dir, desc=f"tokenising {split} conversations")
  table = tokenized.data.table
  row_index = table.column("row").to_numpy()
  role_codes, role_offsets = _list_column(table, "roles")
  content_ids, id_offsets = _list_column(table, "ids")
  turn_lengths, _ = _list_column(table, "turn_lengths")

  markers = _marker_ids(tokenizer)
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
  packed = pack(token_ids, loss_masks, used, data_cfg.max_length, data_cfg.packing)

  assert rows_read == len(used) + sum(len(ix) for ix in skipped.values())  # nothing lost silently
  summary = {
      "split": split,
      "inputs": names,
      "field": data_cfg.field,
      "loss_mask": data_cfg.loss_mask,
      "max_length": data_cfg.max_length,
      "packing": bool(data_cfg.packing),
      "rows_read": rows_read,
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
      "examples_per_epoch": packed.num_rows,
      "batch_size": batch_size,
      "steps_per_epoch": steps_per_epoch(packed, batch_size),
      "token_cache": {"file": cache_file, "from_cache": from_cache},
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
           f"  rows used         {s['rows_used']:>10,}",
           f"  rows truncated    {s['rows_truncated']['count']:>10,}"
           + (f"  (cut from the left; rows {rows_list(s['rows_truncated']['first_rows'])})"
              if s["rows_truncated"]["count"] else ""),
           f"  rows skipped      {sum(v['count'] for v in s['rows_skipped'].values()):>10,}"
           f"  ({s['rows_bad']:,} malformed)"]
  for reason, v in s["rows_skipped"].items():
    lines.append(f"    {reason:<24}{v['count']:>8,}  rows {rows_list(v['first_rows'])}")
  loss_share = s["loss_tokens"] / max(s["tokens"], 1)
  lines += [f"  tokens            {s['tokens']:>10,}  ({s['loss_tokens']:,} under the loss, "
            f"{loss_share:.1%}; {s['tokens_cut_by_truncation']:,} cut by truncation)",
            f"  packed rows       {s['packed_rows']:>10,}  x {s['max_length']} "
            f"({s['conversations']:,} conversations), padding {s['padding_fraction']:.2%}",
            f"  epoch             {s['examples_per_epoch']:>10,}  rows = {s['steps_per_epoch']:,.2f} "
            f"steps at batch size {s['batch_size']}",
            f"  token cache       {'read' if s['token_cache']['from_cache'] else 'written'} "
            f"{s['token_cache']['file']}"]
  return "\n".join(lines)
