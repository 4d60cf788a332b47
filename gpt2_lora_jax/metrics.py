"""Where training metrics go: metrics.jsonl, TensorBoard event files, a progress bar, loss plots.

Only process 0 writes. Every record is one JSON line {"step": k, "split": "train"|"eval", ...},
so any stage (the report, a notebook) can read the curve back without TensorBoard.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


class MetricsWriter:
  def __init__(self, workdir: str, total_steps: int, start_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self.workdir = workdir
    self._bar = None
    self._tb = None
    if not enabled:
      return
    truncate_after(self.path, start_step)  # a resumed run rewrites what followed its checkpoint
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # TensorBoard files are a convenience; metrics.jsonl always exists
      self._tb = None
    if sys.stderr.isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def write(self, step: int, split: str, values: dict, progress: bool = False):
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: float(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
    if self._bar is not None and progress:
      self._bar.n = int(step)
      self._bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                            tok_s=f"{values.get('tokens_per_s', 0):.0f}", refresh=False)
      self._bar.refresh()

  def close(self):
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
    if self._bar is not None:
      self._bar.close()


def read(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_after(path: str, step: int):
  """Drops records past `step` (logged by a run that was stopped before it could checkpoint them)."""
  records = read(path)
  kept = [r for r in records if r["step"] <= step]
  if len(kept) != len(records):
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)


def window_means(steps, values, window: int):
  """Mean of each consecutive block of `window` steps (the original study's per-1000-step curve)."""
  steps, values = np.asarray(steps), np.asarray(values, np.float64)
  if len(steps) == 0:
    return steps, values
  blocks = (steps - 1) // window
  centers, means = [], []
  for b in np.unique(blocks):
    sel = blocks == b
    centers.append(steps[sel].mean())
    means.append(values[sel].mean())
  return np.asarray(centers), np.asarray(means)


def plot_loss(workdir: str, window: int, out_name: str = LOSS_PLOT) -> str | None:
  """Training loss per logged step and averaged per `window` steps, held-out loss on the same axes."""
  records = read(os.path.join(workdir, METRICS_FILE))
  train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
  held_out = [(r["step"], r["loss"]) for r in records if r["split"] == "eval"]
  if not train:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 4.5))
  steps, losses = zip(*train)
  ax.plot(steps, losses, lw=0.6, alpha=0.4, label="train loss (logged steps)")
  centers, means = window_means(steps, losses, window)
  ax.plot(centers, means, lw=2, marker="o" if len(centers) < 30 else None,
          label=f"train loss, mean per {window} steps")
  if held_out:
    s, l = zip(*held_out)
    ax.plot(s, l, lw=2, marker="s", color="tab:red", label="held-out loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats per loss token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = os.path.join(workdir, out_name)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
