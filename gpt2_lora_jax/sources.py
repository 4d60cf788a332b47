"""The readers of HH-RLHF rows: local files, the hub (datasets.load_dataset), and a TFDS dataset.

Every reader returns one (text, bad reason) pair per row of its input, in reading order: (text,
None) for a usable row, (None, reason) for a malformed one (reasons: data.BAD_REASONS), so data.py
counts a bad row instead of failing its whole input. read_file and read_hub read the rows as they
are published; read_rows reads a dataset staged once by tfds_source.py (whose rows were read with
read_file / read_hub, so it returns exactly their pairs for the same inputs); input_for checks a
staged dataset before any work and hands data.py its reader.

The TFDS side needs the 'tfds' extra (pip install -e '.[tfds]': tensorflow-datasets, array_record,
importlib_resources; gcsfs for gs://) and is imported only when used. A remote data_dir (gs://, or
any fsspec URL) is copied once to a local cache directory and read there (local_copy).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, Optional

from gpt2_lora_jax import hub
from gpt2_lora_jax.errors import MissingPackageError, UserError, describe_exception
from gpt2_lora_jax.heldout import SUBSETS

SUBSET_CHOICES = SUBSETS + ("all",)  # 'all' = the hub dataset's default: the four together
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
# The TFDS dataset: <data_dir>/NAME/DATASET_VERSION/, both text fields of every row.
NAME = "hh_rlhf_rows"
DATASET_VERSION = "1.0.0"
FIELDS = ("chosen", "rejected")  # the text fields of an HH-RLHF row
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "gpt2_lora_jax", "tfds")
INSTALL_HINT = "install the tfds extra: pip install -e '.[tfds]'"


# --- local files and the hub --------------------------------------------------------------------

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
      raise UserError(f"{path}: expected a JSON array of rows or JSON lines, found a "
                       f"{type(obj).__name__}")
    return [_field_of(row, field) for row in obj]
  if path.endswith(".parquet"):
    import datasets
    table = datasets.load_dataset("parquet", data_files=path, split="train")
    if field not in table.column_names:
      return [(None, "missing_field")] * len(table)
    return [_field_of({field: text}, field) for text in table[field]]
  raise UserError(f"data file {path!r} has an unknown type: use one of {', '.join(FILE_SUFFIXES)}")


def read_hub(hub_id: str, subset: str, split_name: str, field: str):
  """Rows of the hub dataset through datasets.load_dataset; subsets are data_dirs of the repo."""
  import datasets
  try:
    table = datasets.load_dataset(hub_id, data_dir=None if subset == "all" else subset, split=split_name)
  except Exception as e:  # offline, firewalled, unknown id or split: one message that says what to do
    raise hub.HubUnreachableError(
        f"could not load {hub_id!r} (subset {subset!r}, split {split_name!r}) with "
        f"datasets.load_dataset ({describe_exception(e)}). The Hugging Face hub is "
        "unreachable from here or refused the request. Train from local copies of the rows instead: "
        "--config.data.source=files --config.data.train_files=path/train.jsonl.gz "
        "--config.data.eval_files=path/test.jsonl.gz (.jsonl, .jsonl.gz, .json or .parquet rows "
        f"with a {field!r} field).") from e
  if field not in table.column_names:
    raise UserError(f"{hub_id!r} has no field {field!r} (data.field); its fields: {table.column_names}")
  return [_field_of({field: text}, field) for text in table[field]]


# --- a TFDS dataset staged by tfds_source.py -----------------------------------------------------

def import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise MissingPackageError(f"data.source='tfds' needs tensorflow-datasets ({e}); {INSTALL_HINT}") from e
  return tfds


def dataset_dir(data_dir: str) -> str:
  return os.path.join(data_dir, NAME, DATASET_VERSION)


def is_remote(path: str) -> bool:
  return "://" in path and not path.startswith("file://")


def filesystem(data_dir: str):
  """(fsspec filesystem, path) of data_dir's dataset directory: local, gs:// or any fsspec URL."""
  import fsspec
  url = dataset_dir(data_dir.rstrip("/"))
  try:
    return fsspec.core.url_to_fs(url)
  except (ImportError, ValueError) as e:  # gs:// without gcsfs, an unknown protocol
    raise MissingPackageError(f"cannot open {url}: {e}; for gs:// {INSTALL_HINT} (it brings gcsfs)") from e


def local_copy(data_dir: str, cache_dir: Optional[str] = None) -> str:
  """A local data_dir holding a copy of the prepared dataset of a remote one (gs://, fsspec URLs).

  The copy is keyed by the URL and refreshed when the remote dataset_info.json or metadata.json
  differs (the dataset was prepared again); it is written to a temporary directory and renamed into place, so
  an interrupted copy is never read.
  """
  fs, remote_path = filesystem(data_dir)
  if not fs.exists(remote_path + "/dataset_info.json"):
    raise FileNotFoundError(f"no prepared dataset at {dataset_dir(data_dir)}: stage it once with "
                            f"python -m gpt2_lora_jax.tfds_source --data_dir={data_dir} --files=...")
  # What identifies a prepared dataset: its split sizes and its inputs' fingerprints.
  stamp_files = ("dataset_info.json", "metadata.json")
  remote_stamp = b"".join(fs.cat_file(f"{remote_path}/{name}") for name in stamp_files
                          if fs.exists(f"{remote_path}/{name}"))
  key = hashlib.sha256(data_dir.rstrip("/").encode()).hexdigest()[:16]
  root = os.path.join(cache_dir or DEFAULT_CACHE, key)
  local = dataset_dir(root)
  info_file = os.path.join(local, "dataset_info.json")

  def copy_is_current() -> bool:
    if not os.path.exists(info_file):
      return False
    stamp = b""
    for name in stamp_files:
      if os.path.exists(os.path.join(local, name)):
        with open(os.path.join(local, name), "rb") as f:
          stamp += f.read()
    return stamp == remote_stamp

  if copy_is_current():
    return root
  os.makedirs(os.path.dirname(local), exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".copy-", dir=os.path.dirname(local))
  try:
    for name in fs.ls(remote_path, detail=False):
      fs.get_file(name, os.path.join(staging, os.path.basename(name.rstrip("/"))))
    # Several processes of a host (or of hosts sharing a home directory) may copy at once: the
    # first rename wins and the others keep its copy; an outdated copy is moved aside first.
    if not copy_is_current():
      if os.path.exists(local):
        os.rename(local, f"{local}.stale-{os.getpid()}")
      os.rename(staging, local)
  except OSError:
    if not copy_is_current():
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    for name in os.listdir(os.path.dirname(local)):
      if name.startswith(os.path.basename(local) + ".stale-"):
        shutil.rmtree(os.path.join(os.path.dirname(local), name), ignore_errors=True)
  return root


def _reader(data_dir: str, cache_dir: Optional[str] = None):
  """The builder for reading data_dir (a remote one through its local copy), checked to exist."""
  local = local_copy(data_dir, cache_dir) if is_remote(data_dir) else data_dir.removeprefix("file://")
  if not os.path.isfile(os.path.join(dataset_dir(local), "dataset_info.json")):
    raise FileNotFoundError(f"no prepared dataset at {dataset_dir(data_dir)} (data.tfds_dir="
                            f"{data_dir!r}): stage it once with python -m gpt2_lora_jax.tfds_source "
                            f"--data_dir={data_dir} --files=train=rows.jsonl.gz --files=test=...")
  # The dataset's own files say how to read it (features, splits, array_record): no builder class.
  return import_tfds().builder_from_directory(dataset_dir(local))


def _check_split_and_field(builder, data_dir: str, split: str, field: str):
  if field not in FIELDS:
    raise UserError(f"data.field={field!r}: a tfds dataset stores only {FIELDS}")
  splits = sorted(builder.info.splits.keys())
  if split not in splits:
    raise UserError(f"the tfds dataset at {data_dir} has no split {split!r} (data.train_split / "
                     f"data.eval_split); it has {splits}")


def read_rows(data_dir: str, split: str, field: str,
              cache_dir: Optional[str] = None) -> list[tuple[Optional[str], Optional[str]]]:
  """(text, bad reason) for each row of `split`, as read_file / read_hub return them for the inputs."""
  builder = _reader(data_dir, cache_dir)
  _check_split_and_field(builder, data_dir, split, field)
  source = builder.as_data_source(split=split)
  examples = source.__getitems__(list(range(len(source))))  # one batched read, in row order
  rows = []
  for i, example in enumerate(examples):
    assert int(example["row"]) == i, f"row {i} of {data_dir} split {split} is stored as {example['row']}"
    reason = example[field + "_bad"].decode("utf-8")
    rows.append((None, reason) if reason else (example[field].decode("utf-8"), None))
  return rows


def input_for(data_dir: str, split: str, field: str,
              cache_dir: Optional[str] = None) -> tuple[str, Callable[[], list]]:
  """(name, read) for data.py's inputs; checks the dataset, split and field now, before any work."""
  if not data_dir:
    raise UserError("data.source='tfds' needs data.tfds_dir: --config.data.tfds_dir=gs://bucket/tfds "
                     "(a directory prepared by python -m gpt2_lora_jax.tfds_source)")
  _check_split_and_field(_reader(data_dir, cache_dir), data_dir, split, field)
  return (f"tfds {dataset_dir(data_dir)} (split {split})",
          lambda: read_rows(data_dir, split, field, cache_dir))
