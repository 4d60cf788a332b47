"""A LoRA linear as one matmul with the base: x [W | A], then the adapter's rank-r part (lora.fused_matmul).

    linear(x, w, bias, a, b, scale) = x W + bias + scale (x A) B

model.Linear computes the adapter factored, x W and x A as two matmuls that each read x; here x A
rides along as r more output columns of the base matmul, and in the backward d x = [g, s g B^T]
[W | A]^T is one matmul with r more contraction rows instead of g W^T plus a rank-r matmul and an
add. Why: on one H200 the gpt2 step at PEFT's setting spent 4.2 ms of a 45.5 ms profiled step in
XLA's Triton GEMMs, mostly these rank-8 adapter matmuls (benchmarks/results/explore_h200_20261204.md).
Not measured with this yet. Only where the adapter's input is x itself: without dropout, or
deterministic (evaluation, sampling); with dropout the adapter reads a masked x (model.lora_delta).

A jax.custom_vjp with symbolic zeros: a weight gradient is computed only for what is differentiated
(the frozen W of a LoRA step gets none, as XLA drops it from the factored form).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _batch_axes(x):
  return tuple(range(x.ndim - 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _linear(x, w, bias, a, b, scale):
  y, _ = _forward(x, w, bias, a, b, scale)
  return y


def _forward(x, w, bias, a, b, scale):
  """(y, u = x A): x [W | A] as one matmul; y = (x W + bias) + scale (u B), as model.Linear adds."""
  n = w.shape[1]
  xwa = jnp.dot(x, jnp.concatenate([w, a], axis=1))
  u = xwa[..., n:]
  return (xwa[..., :n] + bias) + jnp.dot(u, b) * jnp.asarray(scale, x.dtype), u


def _fwd(x, w, bias, a, b, scale):
  y, u = _forward(x.value, w.value, bias.value, a.value, b.value, scale)
  wanted = tuple(() if p.perturbed else None for p in (x, w, bias, a, b))  # static: () yes, None no
  return y, (x.value, w.value, a.value, b.value, u, wanted)


def _bwd(scale, res, g):
  x, w, a, b, u, wanted = res
  want_x, want_w, want_bias, want_a, want_b = (flag is not None for flag in wanted)
  s = jnp.asarray(scale, g.dtype)
  du = jnp.dot(g, b.T) * s  # (..., r): d / d (x A)
  contract = lambda p, q: jnp.tensordot(p, q, axes=(_batch_axes(p), _batch_axes(q)))  # sum over rows
  dx = jnp.dot(jnp.concatenate([g, du], axis=-1), jnp.concatenate([w, a], axis=1).T) if want_x else None
  dw = contract(x, g).astype(w.dtype) if want_w else None
  dbias = jnp.sum(g, axis=_batch_axes(g)) if want_bias else None
  da = contract(x, du).astype(a.dtype) if want_a else None
  db = (contract(u, g) * s).astype(b.dtype) if want_b else None
  return dx, dw, dbias, da, db


_linear.defvjp(_fwd, _bwd, symbolic_zeros=True)


def linear(x, w, bias, a, b, scale: float):
  """x W + bias + scale (x A) B, every input in one dtype (the model's compute dtype)."""
  return _linear(x, w, bias, a, b, float(scale))
