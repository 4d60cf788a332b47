"""Fixed-shape training rows from variable-length conversations, and the order they are read in.

Packing. Conversations are placed into rows of T = max_length positions by best-fit decreasing bin
packing (each conversation goes into the fullest row it still fits in), which leaves well under 1%
padding on HH-RLHF's length distribution. Each conversation in a row gets its own segment id
(1, 2, ...; 0 marks padding) and positions that restart at 0, so model.GPT2 called with
segment_ids and position_ids computes for every conversation exactly what it would compute for that
conversation alone. Inputs and targets are shifted per conversation before packing, so no target
crosses into the next conversation.

Segments per row. A row holds at most `max_segments` conversations (a full row is closed and
the next conversation starts or joins another row; nothing is dropped). Without the cap,
best-fit decreasing piles the shortest conversations into the last rows: on HH-RLHF's
harmless-base test split (2,308 conversations, 1024 tokens) rows held 6.2 on average and up to 40;
a cap of 32 (the default) gives 376 rows instead of 375 and 0.36% padding instead of 0.09% (16:
385 rows, 2.7%). cuDNN's packed attention sizes its per-row segment table by the cap (attention.py). Every row's
conversations sit at its start and its padding (segment 0) after them, one trailing run, so the
segments plus the padding run tile the row.

Order. The packed rows are read as a stream: epoch 0's permutation, then epoch 1's, and so on; the
global batch of step k is stream[k B : (k + 1) B]. A permutation is an argsort of a counter-based
hash of (seed, epoch, row), so the batch of a step is a pure function of (seed, step) (resuming
needs only the step) and does not depend on numpy's random streams. Every epoch reads every packed
row exactly once; a batch may straddle two epochs, so nothing is dropped at an epoch's end.
Each process builds only its contiguous slice of the global batch, which is what
jax.make_array_from_process_local_data expects for a batch sharded along its first axis.

Shapes: N packed rows, T = max_length, B global batch, P processes, L one conversation's length.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Iterator, Sequence

import numpy as np

PAD_ID = 50256  # GPT-2's end-of-text, also its pad token; padded positions carry loss_mask 0


@dataclasses.dataclass(frozen=True)
class PackedData:
  """All training rows of a split, packed once, stored compactly (uint16/bool) on the host.

  inputs, targets, segment_ids, positions: (N, T) integer arrays; loss_mask: (N, T) bool.
  The conversation_* arrays (C,) say where each conversation sits, for reports and tests:
  source row index, packed row, first position and length L.
  """
  inputs: np.ndarray
  targets: np.ndarray
  loss_mask: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  conversation_rows: np.ndarray
  conversation_packed_row: np.ndarray
  conversation_start: np.ndarray
  conversation_length: np.ndarray

  @property
  def num_rows(self) -> int:
    return self.inputs.shape[0]

  @property
  def max_length(self) -> int:
    return self.inputs.shape[1]

  @property
  def num_tokens(self) -> int:
    """Positions that hold a conversation token (not padding)."""
    return int(self.conversation_length.sum())

  @property
  def num_loss_tokens(self) -> int:
    return int(self.loss_mask.sum())

  @property
  def segments_per_row(self) -> np.ndarray:
    """(N,) conversations in each packed row."""
    return np.bincount(self.conversation_packed_row, minlength=self.num_rows)

  @property
  def padding_fraction(self) -> float:
    total = self.inputs.size
    return (total - self.num_tokens) / total if total else 0.0

  def rows(self, indices: np.ndarray) -> dict:
    """The batch dict for packed rows `indices` (n,): int32 arrays and a float32 loss mask, (n, T).

    An index of -1 gives an empty row (all padding, loss_mask 0), used to fill a last eval batch.
    """
    indices = np.asarray(indices, np.int64)
    empty = indices < 0
    take = np.where(empty, 0, indices)
    batch = {
        "inputs": self.inputs[take].astype(np.int32),
        "targets": self.targets[take].astype(np.int32),
        "loss_mask": self.loss_mask[take].astype(np.float32),
        "segment_ids": self.segment_ids[take].astype(np.int32),
        "positions": self.positions[take].astype(np.int32),
    }
    if empty.any():
      for name, value in batch.items():
        value[empty] = PAD_ID if name in ("inputs", "targets") else 0
    return batch


def best_fit_decreasing(lengths: Sequence[int], capacity: int, max_items: int = 0) -> list[list[int]]:
  """Groups item indices into bins of `capacity`: longest first, each into the fullest bin it fits.

  max_items > 0 closes a bin once it holds that many items. Deterministic (ties broken by
  index). O(n log n) searches plus list moves; ~1 s for 160k items.
  """
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  open_bins: list[tuple[int, int]] = []  # (free space, bin id), kept sorted
  bins: list[list[int]] = []
  for i in order:
    need = lengths[i]
    if need > capacity:
      raise ValueError(f"item {i} has length {need} > capacity {capacity}")
    j = bisect.bisect_left(open_bins, (need, -1))  # the bin with the least free space >= need
    if j == len(open_bins):
      bins.append([i])
      bin_id, free = len(bins) - 1, capacity - need
    else:
      space, bin_id = open_bins.pop(j)
      bins[bin_id].append(i)
      free = space - need
    if free > 0 and not (max_items and len(bins[bin_id]) >= max_items):
      bisect.insort(open_bins, (free, bin_id))
  return bins


def pack(token_ids: Sequence[np.ndarray], loss_masks: Sequence[np.ndarray],
         source_rows: Sequence[int], max_length: int, packing: bool = True,
         max_segments: int = 0, groups: Sequence[Sequence[int]] | None = None) -> PackedData:
  """Packs conversations into fixed-shape rows.

  token_ids[i]: (L_i + 1,) the conversation's ids, so inputs = ids[:-1] and targets = ids[1:];
  loss_masks[i]: (L_i,) bool over its targets; source_rows[i]: the row it came from.
  packing=False puts one conversation per row (in order), for comparison and debugging.
  max_segments > 0: at most that many conversations per row (see the module docstring).
  groups: conversations that must share a row, as consecutive segments in the given order (a
  preference pair's chosen and rejected); the groups are what is bin-packed. Default: each alone.
  """
  if max_segments < 0:
    raise ValueError(f"max_segments={max_segments}: must be >= 0 (0: no cap)")
  lengths = [len(ids) - 1 for ids in token_ids]
  groups = [[i] for i in range(len(lengths))] if groups is None else [list(g) for g in groups]
  group_lengths = [sum(lengths[i] for i in g) for g in groups]
  if packing:
    group_cap = max(1, max_segments // max(map(len, groups), default=1)) if max_segments else 0
    bins = [[i for g in b for i in groups[g]]
            for b in best_fit_decreasing(group_lengths, max_length, group_cap)]
  else:
    bins = groups
  n_rows, n_conv = len(bins), len(lengths)
  most_segments = max((len(b) for b in bins), default=0)
  max_id = max(PAD_ID, max((int(ids.max(initial=0)) for ids in token_ids), default=0))
  id_dtype = np.uint16 if max_id < 2**16 else np.int32  # GPT-2's 50257 ids fit in 16 bits
  index_dtype = np.uint16 if max(max_length, most_segments) < 2**16 else np.int32
  inputs = np.full((n_rows, max_length), PAD_ID, id_dtype)
  targets = np.full((n_rows, max_length), PAD_ID, id_dtype)
  loss_mask = np.zeros((n_rows, max_length), bool)
  segment_ids = np.zeros((n_rows, max_length), index_dtype)
  positions = np.zeros((n_rows, max_length), index_dtype)
  conv_packed_row = np.zeros(n_conv, np.int64)
  conv_start = np.zeros(n_conv, np.int64)
  arange = np.arange(max_length)
  for r, members in enumerate(bins):
    start = 0
    for segment, i in enumerate(members, start=1):
      ids, L = token_ids[i], lengths[i]
      inputs[r, start:start + L] = ids[:-1]
      targets[r, start:start + L] = ids[1:]
      loss_mask[r, start:start + L] = loss_masks[i]
      segment_ids[r, start:start + L] = segment
      positions[r, start:start + L] = arange[:L]
      conv_packed_row[i], conv_start[i] = r, start
      start += L
  return PackedData(inputs, targets, loss_mask, segment_ids, positions,
                    conversation_rows=np.asarray(source_rows, np.int64),
                    conversation_packed_row=conv_packed_row, conversation_start=conv_start,
                    conversation_length=np.asarray(lengths, np.int64))


# --- order of rows -----------------------------------------------------------------------------

def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijection on uint64 that scrambles every bit (arrays wrap mod 2^64)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
  """(N,) the order of packed rows in `epoch`: argsort of hash(seed, epoch, row). Read-only."""
  key = _mix64(_mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64)) + np.uint64(epoch))
  # row -> _mix64(row + key) is a bijection, so no two rows tie and argsort is a permutation.
  perm = np.argsort(_mix64(np.arange(num_rows, dtype=np.uint64) + key), kind="stable")
  perm.setflags(write=False)
  return perm


def batch_row_indices(num_rows: int, seed: int, step: int, global_batch_size: int,
                      process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """(B / P,) packed-row indices of this process's slice of step `step`'s global batch."""
  if num_rows <= 0:
    raise ValueError("there are no packed rows to draw batches from")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} must be positive and divisible by the "
                     f"process count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  local = global_batch_size // process_count
  stream = np.arange(local, dtype=np.int64) + step * global_batch_size + process_index * local
  epochs, offsets = np.divmod(stream, num_rows)
  out = np.empty(local, np.int64)
  for epoch in np.unique(epochs):  # one epoch, or two when the slice straddles an epoch's end
    here = epochs == epoch
    out[here] = epoch_permutation(num_rows, seed, int(epoch))[offsets[here]]
  return out


def batch_for_step(packed: PackedData, seed: int, step: int, global_batch_size: int,
                   process_index: int = 0, process_count: int = 1) -> dict:
  """This process's slice of the global batch of `step`: a pure function of (seed, step).

  Returns {'inputs', 'targets', 'segment_ids', 'positions': int32 (B / P, T),
  'loss_mask': float32 (B / P, T)}; targets[b, t] is the token after inputs[b, t] within the same
  conversation, loss_mask is 1.0 where targets[b, t] is trained on, segment_ids 0 is padding.
  """
  return packed.rows(batch_row_indices(packed.num_rows, seed, step, global_batch_size,
                                       process_index, process_count))


def steps_per_epoch(packed: PackedData | int, global_batch_size: int) -> float:
  """Packed rows / global batch size: steps per pass over the data (a float; see the module doc)."""
  num_rows = packed if isinstance(packed, int) else packed.num_rows
  return num_rows / global_batch_size


def eval_batches(packed: PackedData, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """Every packed row once, in order, in fixed-shape batches; the last one filled with empty rows."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} must be positive and divisible by the "
                     f"process count {process_count}")
  local = global_batch_size // process_count
  for first in range(0, packed.num_rows, global_batch_size):
    indices = np.arange(local) + first + process_index * local
    yield packed.rows(np.where(indices < packed.num_rows, indices, -1))
