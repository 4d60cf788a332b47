"""Where training metrics go: metrics.jsonl, TensorBoard event files, a progress bar, loss plots.

Only process 0 writes. Every record is one JSON line {"step": k, "split": "train"|"eval", ...},
so any stage (the report, a notebook) can read the curve back without TensorBoard.

The workdir may be a bucket (gs://...): files there go through etils.epath (installed with Orbax).
A bucket object cannot be appended to, so for a bucket workdir the writer keeps the records in
memory and rewrites metrics.jsonl at each checkpoint, plot and exit (`flush`); records after the
last checkpoint are the ones a resumed run drops anyway (`truncate_after`).
"""
from __future__ import annotations

import io
import json
import os
import sys
import time

import numpy as np

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


def is_remote(path: str) -> bool:
  """A bucket or other URL (gs://, s3://): plain open() and os calls do not reach it."""
  return "://" in str(path)


def _epath(path: str):
  from etils import epath
  return epath.Path(path)


def write_text(path: str, text: str):
  """Writes a whole file; a reader never sees half of it (rename locally, one object on a bucket)."""
  if is_remote(path):
    target = _epath(path)
    target.parent.mkdir(parents=True, exist_ok=True)  # a no-op on buckets, which have no directories
    target.write_text(text)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


class MetricsWriter:
  def __init__(self, workdir: str, total_steps: int, start_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self.workdir = workdir
    self._bar = None
    self._tb = None
    self._buffered = None  # for a bucket workdir: every record, rewritten by flush()
    if not enabled:
      return
    truncate_after(self.path, start_step)  # a resumed run rewrites what followed its checkpoint
    if is_remote(self.path):
      self._buffered = read(self.path)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # TensorBoard files are a convenience; metrics.jsonl always exists
      self._tb = None
    except Exception as e:  # e.g. a bucket tensorboardX cannot reach: say so, keep training
      if not is_remote(workdir):
        raise
      print(f"no TensorBoard files in {workdir}: {e}", file=sys.stderr, flush=True)
      self._tb = None
    self.total_steps = total_steps
    self._first_logged = None  # (time, step) of the first progress line: the ETA's rate excludes compiling
    if sys.stderr.isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def write(self, step: int, split: str, values: dict, progress: bool = False):
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: float(v) for k, v in values.items()}}
    if self._buffered is not None:
      self._buffered.append(record)
    else:
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
    elif progress:  # no terminal (nohup, SLURM, a pipe): one plain line per log_every steps
      print(self.progress_line(int(step), values, time.monotonic()), file=sys.stderr, flush=True)

  def progress_line(self, step: int, values: dict, now: float) -> str:
    """'step 20/100 (20%) | loss 2.3456 | 5,120 tokens/s | ETA 1m04s'; the ETA extrapolates the
    rate between the first progress line and this one (so compiling does not count)."""
    parts = [f"step {step}/{self.total_steps} ({100 * step // max(self.total_steps, 1)}%)",
             f"loss {values.get('loss', float('nan')):.4f}"]
    if "tokens_per_s" in values:
      parts.append(f"{values['tokens_per_s']:,.0f} tokens/s")
    if self._first_logged is None:
      self._first_logged = (now, step)
    elif step > self._first_logged[1]:
      t0, s0 = self._first_logged
      eta = (now - t0) / (step - s0) * (self.total_steps - step)
      parts.append(f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
    return " | ".join(parts)

  def flush(self):
    """Brings a bucket's metrics.jsonl up to date (local files are appended to as records come)."""
    if self.enabled and self._buffered is not None:
      write_text(self.path, "".join(json.dumps(r) + "\n" for r in self._buffered))

  def close(self):
    self.flush()
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
    if self._bar is not None:
      self._bar.close()


def read(path: str) -> list[dict]:
  if is_remote(path):
    text = _epath(path).read_text() if _epath(path).exists() else ""
  elif os.path.exists(path):
    with open(path) as f:
      text = f.read()
  else:
    return []
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def truncate_after(path: str, step: int):
  """Drops records past `step` (logged by a run that was stopped before it could checkpoint them)."""
  records = read(path)
  kept = [r for r in records if r["step"] <= step]
  if len(kept) != len(records):
    write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


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


def plot_loss(workdir: str, window: int, out_name: str = LOSS_PLOT,
              title: str = "Training loss") -> str | None:
  """<workdir>/loss.png from <workdir>/metrics.jsonl (see plot_loss_records)."""
  return plot_loss_records(read(os.path.join(workdir, METRICS_FILE)), os.path.join(workdir, out_name),
                           window, title)


def plot_loss_records(records: list[dict], path: str, window: int,
                      title: str = "Training loss") -> str | None:
  """Training loss per logged step and averaged per `window` steps, held-out loss on the same axes."""
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
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  if is_remote(path):
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    target = _epath(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(png.getvalue())
  else:
    fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
