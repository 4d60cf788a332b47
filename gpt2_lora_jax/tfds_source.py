r"""HH-RLHF rows staged once as a TensorFlow Datasets (array_record) dataset, for pods.

Stage once, on any machine that has the rows (local files, or the hub where it is reachable):

    python -m gpt2_lora_jax.tfds_source --data_dir=gs://my-bucket/tfds \
        --files=train=hh/train.jsonl.gz --files=test=hh/test.jsonl.gz
    python -m gpt2_lora_jax.tfds_source --data_dir=/data/tfds --hub=Anthropic/hh-rlhf --subset=all

then train from it on every host, without anyone downloading from the hub:

    python -m gpt2_lora_jax.main --config=configs/gpt2_hh.py --workdir=gs://my-bucket/runs/x \
        --config.data.source=tfds --config.data.tfds_dir=gs://my-bucket/tfds

Why: on a TPU pod every worker builds the same data (data.build is deterministic), and a hundred
workers each calling the hub, or each needing a copy of the jsonl files, is slow and fragile.
A directory on a bucket (or a gcsfuse mount, or NFS) is the one place they all read.

What is stored. One row per input row, in reading order (files in the given order), with both
text fields: 'chosen' and 'rejected' (the text, '' when unusable), 'chosen_bad' and
'rejected_bad' (sources.read_file's bad-row reason, '' when usable), 'row' (its index in the
split) and 'source' (the file or hub id it came from). The rows are read with sources.read_file /
sources.read_hub, so a bad row is kept as a counted bad row with the same reason, and
sources.read_rows(...) returns exactly the (text, reason) list that those readers return for the
same inputs; data.build then packs identical batches from either source.

TFDS is used without TensorFlow: a GeneratorBasedBuilder with file_format='array_record' writes
the dataset (this module: the builder, prepare() and the command line), and sources.py reads it
by random access with as_data_source(). A remote data_dir (gs://, or any fsspec URL) is copied
once to a local cache directory and read there; array_record files are read through local paths,
and a few hundred MB of text per host is cheap next to a checkpoint.
Needs the 'tfds' extra: pip install -e '.[tfds]' (tensorflow-datasets, array_record,
importlib_resources; gcsfs for gs://).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import sys
import tempfile
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

from gpt2_lora_jax import sources
from gpt2_lora_jax.sources import DATASET_VERSION, FIELDS, FILE_SUFFIXES, SUBSET_CHOICES


class HubRows(NamedTuple):
  """One split of a hub dataset as an input of prepare(), read with sources.read_hub."""
  hub_id: str
  subset: str
  split: str

  def __str__(self):
    return f"{self.hub_id} (subset {self.subset}, split {self.split})"


Input = Union[str, HubRows]  # a local rows file (.jsonl, .jsonl.gz, .json, .parquet) or hub rows


def _read_input(source: Input, field: str) -> list[tuple[Optional[str], Optional[str]]]:
  if isinstance(source, HubRows):
    return sources.read_hub(source.hub_id, source.subset, source.split, field)
  return sources.read_file(source, field)


def _fingerprint(source: Input) -> str:
  """sha256 of a file's bytes (what a re-run must match to reuse a prepared dataset); hub: its id."""
  if isinstance(source, HubRows):
    return str(source)
  h = hashlib.sha256()
  with open(source, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


@functools.cache
def builder_class():
  """The GeneratorBasedBuilder class, defined on first use so this module imports without tfds."""
  tfds = sources.import_tfds()

  class HhRlhfRows(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """HH-RLHF rows (both text fields and their bad-row reasons), in reading order."""
    # Its name, from the class name, is sources.NAME: the datasets live in <data_dir>/hh_rlhf_rows/.
    # skip_registration: the class is private to this module (no tfds.builder('hh_rlhf_rows')),
    # so running this file as __main__ beside an import of it cannot register the name twice.
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Rows of local jsonl/json/parquet files or the hub, both fields."}

    def __init__(self, *, inputs: Optional[dict[str, Sequence[Input]]] = None, **kwargs):
      self._inputs = inputs  # split -> inputs; None when only reading
      super().__init__(**kwargs)

    def _info(self):
      text = tfds.features.Text()
      features = {"row": tfds.features.Scalar(dtype=np.int64), "source": text}
      for field in FIELDS:
        features[field] = text
        features[field + "_bad"] = text
      # The inputs and their sha256 go into metadata.json, so a person (and prepare(), before
      # reusing a dataset) can see what a staged dataset was made from.
      metadata = tfds.core.MetadataDict()
      if self._inputs is not None:
        metadata["inputs"] = describe_inputs(self._inputs)
      return tfds.core.DatasetInfo(
          builder=self, description=__doc__.partition("\n")[0],
          features=tfds.features.FeaturesDict(features),
          disable_shuffling=True,  # keep reading order: row i of the split is row i of the files
          metadata=metadata)

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing is downloaded: the inputs are local files or the hub's own cache
      if not self._inputs:
        raise ValueError("no inputs to prepare: pass inputs={'train': [...], 'test': [...]}")
      return {split: self._generate_examples(sources) for split, sources in self._inputs.items()}

    def _generate_examples(self, sources):
      row = 0
      for source in sources:
        per_field = {field: _read_input(source, field) for field in FIELDS}
        lengths = {field: len(rows) for field, rows in per_field.items()}
        if len(set(lengths.values())) != 1:  # both readers skip exactly the blank lines
          raise ValueError(f"{source}: the fields have different row counts {lengths}")
        for i in range(lengths[FIELDS[0]]):
          example = {"row": row, "source": str(source)}
          for field in FIELDS:
            text, reason = per_field[field][i]
            example[field] = "" if text is None else text
            example[field + "_bad"] = reason or ""
          yield row, example
          row += 1

  return HhRlhfRows


def describe_inputs(inputs: dict[str, Sequence[Input]]) -> dict:
  """split -> [{'input', 'fingerprint'}]: what a dataset was made from (stored in metadata.json)."""
  return {split: [{"input": str(s), "fingerprint": _fingerprint(s)} for s in sources]
          for split, sources in inputs.items()}


def _check_inputs(inputs: dict[str, Sequence[Input]]):
  if not inputs:
    raise ValueError("no splits to prepare: give at least one split with its inputs")
  for split, sources in inputs.items():
    if not re.fullmatch(r"\w+", split):
      raise ValueError(f"split name {split!r} must be letters, digits and '_' (e.g. train, test)")
    if not sources:
      raise ValueError(f"split {split!r} has no inputs")
    for source in sources:
      if isinstance(source, HubRows):
        continue
      if not source.endswith(FILE_SUFFIXES):
        raise ValueError(f"rows file {source!r} (split {split}) has an unknown type: use one of "
                         f"{', '.join(FILE_SUFFIXES)}")
      if not os.path.isfile(source):
        raise FileNotFoundError(f"rows file {source!r} (split {split}) does not exist")


def stored_inputs(data_dir: str) -> Optional[dict]:
  """What the dataset under data_dir was made from (describe_inputs), or None if none is there."""
  fs, path = sources.filesystem(data_dir)
  if not fs.exists(path + "/dataset_info.json"):
    return None
  if not fs.exists(path + "/metadata.json"):
    return {}
  return json.loads(fs.cat_file(path + "/metadata.json")).get("inputs", {})


def _prepare_local(inputs: dict[str, list[Input]], data_dir: str) -> str:
  builder = builder_class()(inputs=inputs, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return str(builder.data_dir)


def prepare(inputs: dict[str, Sequence[Input]], data_dir: str, *, overwrite: bool = False) -> str:
  """Writes the dataset of `inputs` (split -> files or HubRows) under data_dir; returns its dir.

  A dataset already there that was made from the same inputs (same bytes, wherever they are now) is
  reused; one made from other inputs is an error unless overwrite=True, so a run never trains on
  rows nobody meant. A remote data_dir (gs://...) gets a dataset prepared in a local temporary
  directory and uploaded, dataset_info.json last: readers look for that file, so they never see a
  half-uploaded dataset.
  """
  _check_inputs(inputs)
  inputs = {split: list(sources) for split, sources in inputs.items()}
  wanted = describe_inputs(inputs)
  stored = stored_inputs(data_dir)
  fs, path = sources.filesystem(data_dir)
  if stored is not None:
    def fingerprints(described):
      return {split: [s["fingerprint"] for s in sources] for split, sources in described.items()}
    if fingerprints(stored) == fingerprints(wanted) and not overwrite:
      return sources.dataset_dir(data_dir)
    if not overwrite:
      raise ValueError(f"{sources.dataset_dir(data_dir)} already holds a dataset made from other inputs "
                       f"({json.dumps(stored)}); pass overwrite=True (--overwrite) to replace it, "
                       "or choose another data_dir")
    fs.rm(path, recursive=True)
  if not sources.is_remote(data_dir):
    return _prepare_local(inputs, data_dir.removeprefix("file://"))
  with tempfile.TemporaryDirectory(prefix="tfds-stage-") as local_root:
    local = _prepare_local(inputs, local_root)
    fs.makedirs(path, exist_ok=True)
    names = sorted(os.listdir(local), key=lambda name: name == "dataset_info.json")  # it goes last
    for name in names:
      fs.put_file(os.path.join(local, name), f"{path}/{name}")
  return sources.dataset_dir(data_dir)


# --- command line ----------------------------------------------------------------------------------

def _parse_files(values: Sequence[str]) -> dict[str, list[str]]:
  inputs: dict[str, list[str]] = {}
  for value in values:
    split, sep, paths = value.partition("=")
    if not sep or not paths:
      raise ValueError(f"--files={value!r}: write SPLIT=PATH[,PATH...], e.g. --files=train=train.jsonl.gz")
    inputs.setdefault(split, []).extend(p for p in paths.split(",") if p)
  return inputs


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gpt2_lora_jax.tfds_source",
                                   description="Stage HH-RLHF rows once as a TFDS dataset.")
  parser.add_argument("--data_dir", required=True, help="where to write it: a local dir or gs://bucket/path")
  parser.add_argument("--files", action="append", default=[],
                      help="SPLIT=PATH[,PATH...] (repeatable): rows files of one split, in order")
  parser.add_argument("--hub", default="", help="a hub dataset id (e.g. Anthropic/hh-rlhf) instead of --files")
  parser.add_argument("--subset", default="all", help=f"with --hub: one of {', '.join(SUBSET_CHOICES)}")
  parser.add_argument("--splits", default="train,test", help="with --hub: the hub splits to stage")
  parser.add_argument("--overwrite", action="store_true", help="replace a dataset made from other inputs")
  args = parser.parse_args(argv)
  try:
    if bool(args.files) == bool(args.hub):
      raise ValueError("give either --files=SPLIT=PATH[,PATH...] or --hub=ID")
    if args.hub:
      inputs = {split: [HubRows(args.hub, args.subset, split)] for split in args.splits.split(",") if split}
    else:
      inputs = _parse_files(args.files)
    out_dir = prepare(inputs, args.data_dir, overwrite=args.overwrite)
    builder = builder_class()(data_dir=args.data_dir, file_format="array_record")
    counts = {split: info.num_examples for split, info in builder.info.splits.items()}
  except (ValueError, OSError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
  print(f"staged {counts} rows at {out_dir}; train from it with --config.data.source=tfds "
        f"--config.data.tfds_dir={args.data_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
