"""LoRA-aware FLOP count per trained token, and the chips' peak rates for MFU.

For every matmul weight W of shape (in, out) a token costs
  forward         2 * in * out
  backward        2 * in * out   (gradient w.r.t. the activations: always needed below a trainable leaf)
                + 2 * in * out   (gradient w.r.t. W: only when W trains)
Adapters A (in, r), B (r, out) train, so they cost 3 x 2 r (in + out).
Attention scores and the weighted sum cost 4 * T * D per token and layer forward (counted over the
full T x T square, as PaLM's MFU convention does, although causal masking skips half), and
3x that for forward + backward. Embedding lookups are free; the tied head is a (D, V) matmul.
MFU = flops_per_token * tokens_per_second / (peak FLOP/s of all devices).
"""
from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util

# bf16 dense peak per chip (vendor specs), by a substring of jax's device_kind.
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12,
    "V100": 125e12, "P100": 21e12, "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12,
    "TPU v5e": 197e12, "TPU v4": 275e12, "TPU v3": 123e12,
}


def peak_flops(device=None):
  """bf16 peak FLOP/s of one device, or None when unknown (CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in PEAK_BF16_FLOPS.items():
    if name.lower() in kind.lower():
      return peak
  return None


def train_flops_per_token(params, labels, n_layer: int, n_embd: int, seq_len: int) -> dict:
  """FLOPs per token of one train step (forward + backward), by the rules in the module docstring.

  params: the full tree (base + adapters); labels: the same tree of 'trainable' / 'frozen'.
  """
  flat = traverse_util.flatten_dict(params)
  flat_labels = traverse_util.flatten_dict(labels)
  forward = backward = 0.0
  for path, leaf in flat.items():
    name = path[-1]
    if name == "embedding" and path[0] == "wte":
      in_out = float(np.prod(np.shape(leaf)))  # used as the tied head (D x V); lookup is free
      tied = ("lm_head", "kernel") not in flat
      if not tied:
        continue
    elif name in ("kernel", "lora_a", "lora_b"):
      in_out = float(np.prod(np.shape(leaf)))
    else:
      continue  # biases, layer norms, position embeddings: no matmul
    forward += 2 * in_out
    backward += 2 * in_out + (2 * in_out if flat_labels[path] == "trainable" else 0.0)
  attention_forward = 4.0 * n_layer * seq_len * n_embd
  forward += attention_forward
  backward += 2 * attention_forward
  return {"forward": forward, "backward": backward, "total": forward + backward}
