"""The held-out sample: which rows of an eval split held-out loss, preference accuracy and the
evaluation's prompts use, stratified over the subsets the rows come from (data.read_inputs says
how rows know their subset).

    data.stratified_sample(["a"] * 30 + ["b"] * 10, 8, seed=0)  # 6 rows of a, 2 of b, sorted
"""
from __future__ import annotations

import os

import numpy as np

SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")


def subset_of_path(path: str) -> str:
  """The HH-RLHF subset a rows file belongs to: a subset name that is a directory of its path or
  starts its file name (harmless-base/test.jsonl.gz, helpful-base-test.jsonl); else the path itself."""
  parts = os.path.normpath(path).split(os.sep)
  for part in reversed(parts):
    for subset in SUBSETS:
      if part == subset or part.startswith(subset + "-") or part.startswith(subset + "_"):
        return subset
  return path


def stratified_sample(subsets, n: int, seed: int) -> np.ndarray:
  """Sorted indices of a seeded sample of n of the rows whose subsets are `subsets` (one label a
  row), stratified: each subset gets its share of n in proportion to its rows (largest remainders,
  ties to the subset seen first), drawn without replacement with a generator seeded by (seed, the
  subset's place in that order). n <= 0 or n >= len(subsets): every row."""
  subsets = list(subsets)
  if n <= 0 or n >= len(subsets):
    return np.arange(len(subsets))
  order = list(dict.fromkeys(subsets))  # subsets in order of first appearance
  members = {s: [] for s in order}
  for i, s in enumerate(subsets):
    members[s].append(i)
  quotas = {s: n * len(members[s]) / len(subsets) for s in order}
  counts = {s: int(q) for s, q in quotas.items()}
  by_remainder = sorted(order, key=lambda s: (-(quotas[s] - counts[s]), order.index(s)))
  for s in by_remainder[:n - sum(counts.values())]:
    counts[s] += 1
  picked = []
  for k, s in enumerate(order):
    rng = np.random.default_rng([seed, k])
    picked.extend(np.asarray(members[s])[rng.choice(len(members[s]), size=counts[s], replace=False)])
  return np.sort(np.asarray(picked, np.int64))


def subset_counts(subsets: list, taken: np.ndarray) -> dict:
  """subset -> {'rows_in_split', 'rows_read'}: rows of the split and rows taken, per subset."""
  out = {}
  for s in subsets:
    out.setdefault(s, {"rows_in_split": 0, "rows_read": 0})["rows_in_split"] += 1
  for i in taken:
    out[subsets[i]]["rows_read"] += 1
  return out


def subset_summary(counts: dict, used_subsets: list) -> dict:
  """subset -> {'rows_in_split', 'rows_read', 'rows_used'} for a build's summary."""
  out = {s: dict(c, rows_used=0) for s, c in counts.items()}
  for s in used_subsets:
    out[s]["rows_used"] += 1
  return out
