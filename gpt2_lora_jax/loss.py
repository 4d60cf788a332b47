"""GPT-2's head and the next-token cross-entropy, fused: logits chunk by chunk, gradients in the forward.

    head_nll_sum(h_BTD, head, targets_BT, mask_BT, spec, key) -> sum over mask of -log p(target)

`head` holds the head's weights: 'w' (the tied embedding (V, D), or an untied kernel (D, V)) and,
when the head carries an adapter, 'lora_a' (D, r) and 'lora_b' (r, V). Logits are h W (+ s (h A) B)
for `spec.chunk` positions at a time, accumulated in fp32 (preferred_element_type, never bf16
rounded then upcast); the vocabulary is padded to a multiple of `spec.vocab_multiple` (50257 ->
50304, so the head matmul has an aligned side) and the padded columns are masked out of the softmax.

A jax.custom_vjp: when a gradient is wanted, the forward pass computes each chunk's logits once and
turns them at once into what the backward needs: d loss / d h for every position, and the weight
gradients of the head leaves that are differentiated (an adapter, an untied or fully trained head).
The backward only scales those by the incoming cotangent. Nothing is recomputed and the (B, T, V)
logits never exist: the largest vocabulary-sized buffer is one chunk's (B, C, V).

Which weight gradients are computed is decided from what JAX differentiates (symbolic zeros): the
frozen tied embedding of a LoRA run is a constant of the step, so no (V, D) weight-gradient matmul
is traced for it at all.

A T that the chunk does not divide is split into ceil(T / chunk) equal chunks, padded by fewer
positions than there are chunks (masked out): never one whole-batch chunk.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from gpt2_lora_jax import dropout as dropout_lib

# Positions per logits chunk (at most): one chunk's fp32 logits are B x 256 x 50304 x 4 bytes
# (206 MB at B = 4), the whole batch's would be T / 256 times that.
DEFAULT_CHUNK = 256
# cuBLAS and XLA's GEMM emitters prefer matrix sides that are multiples of 64/128; 50257 is odd.
VOCAB_MULTIPLE = 128
# Salt that separates the head adapter's dropout stream from the blocks' (which flax derives).
_DROPOUT_SALT = 0x4EAD


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """What does not change within a run: shapes, dtypes and the adapter's scale and dropout."""
  vocab_size: int
  tied: bool = True  # 'w' is the embedding (V, D); else an untied kernel (D, V)
  dtype: str = "float32"  # dtype of the matmul inputs (the model's compute dtype)
  lora_scale: float = 0.0  # s of the head adapter (unused when the head has none)
  lora_dropout: float = 0.0  # dropout on the head adapter's input (training only)
  lora_dropout_rng: str = "packed"  # its random bits (dropout.py)
  deterministic: bool = True
  chunk: int = DEFAULT_CHUNK
  vocab_multiple: int = VOCAB_MULTIPLE

  @property
  def padded_vocab(self) -> int:
    m = max(1, self.vocab_multiple)
    return -(-self.vocab_size // m) * m


def chunking(T: int, chunk: int) -> tuple:
  """(number of chunks n, chunk length C) with n * C >= T and n * C - T < n: equal chunks <= chunk."""
  n = max(1, math.ceil(T / max(1, chunk)))
  return n, math.ceil(T / n)


def head_from_params(params: dict, tied: bool) -> dict:
  """The head's leaves out of a GPT-2 parameter tree (model.py's layout)."""
  head = {"w": params["wte"]["embedding"] if tied else params["lm_head"]["kernel"]}
  for leaf in ("lora_a", "lora_b"):
    if leaf in params.get("lm_head", {}):
      head[leaf] = params["lm_head"][leaf]
  return head


def _prepared(spec: HeadSpec, head: dict) -> dict:
  """The head's matrix in the compute dtype, vocabulary padded with zero columns, adapter appended.

  'w': (Vp, D [+ r]) tied or (D [+ r], Vp) untied. With an adapter, B (r, V) rides along as r
  extra rows of the contraction side, so [h, s (x A)] @ [W; B] gives h W + s (x A) B in one
  matmul: one fp32 (B, C, Vp) product per chunk, not two. Built once per step, outside the chunks.
  """
  dt = jnp.dtype(spec.dtype)
  extra = spec.padded_vocab - spec.vocab_size
  w = head["w"].astype(dt)
  w = jnp.pad(w, ((0, extra), (0, 0)) if spec.tied else ((0, 0), (0, extra)))
  out = {"w": w}
  if "lora_a" in head:
    b = jnp.pad(head["lora_b"].astype(dt), ((0, 0), (0, extra)))  # (r, Vp)
    out["w"] = jnp.concatenate([w, b.T], axis=1) if spec.tied else jnp.concatenate([w, b], axis=0)
    out["lora_a"] = head["lora_a"].astype(dt)
  return out


def _keep(spec: HeadSpec, key, index, shape):
  """Dropout keep-mask scaled by 1 / (1 - p) for one chunk, or None."""
  if spec.deterministic or spec.lora_dropout <= 0.0:
    return None
  keep = dropout_lib.mask(jax.random.fold_in(key, index), shape, spec.lora_dropout, spec.lora_dropout_rng)
  p = dropout_lib.keep_probability(spec.lora_dropout, spec.lora_dropout_rng)
  return keep.astype(spec.dtype) / jnp.asarray(p, spec.dtype)


def _chunk_logits(spec: HeadSpec, prep: dict, h_BCD, keep_BCD):
  """(logits (B, C, Vp) fp32, padded columns at -inf; the matmul's input [h, s x A] (B, C, D [+ r]);
  the adapter input x = dropout(h) or None)."""
  dt = jnp.dtype(spec.dtype)
  h_in = h_BCD.astype(dt)
  x = None
  if "lora_a" in prep:
    x = h_in if keep_BCD is None else h_in * keep_BCD
    u = jnp.einsum("bcd,dr->bcr", x, prep["lora_a"], preferred_element_type=jnp.float32)
    h_in = jnp.concatenate([h_in, (spec.lora_scale * u).astype(dt)], axis=-1)
  eq = "bcd,vd->bcv" if spec.tied else "bcd,dv->bcv"
  logits = jnp.einsum(eq, h_in, prep["w"], preferred_element_type=jnp.float32)
  if spec.padded_vocab != spec.vocab_size:
    valid = jnp.arange(spec.padded_vocab) < spec.vocab_size
    logits = jnp.where(valid, logits, -jnp.inf)
  return logits, h_in, x


def _nll(logits_BCV, targets_BC):
  lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
  target_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
  return lse_BC, lse_BC - target_BC


def _by_chunk(spec: HeadSpec, h_BTD, targets_BT, mask_BT):
  """(n, B, C, ...) views of the inputs; padded positions have mask 0 (the batch axis stays 2nd)."""
  B, T = targets_BT.shape
  n, C = chunking(T, spec.chunk)
  pad = n * C - T

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape((B, n, C) + x.shape[2:]), 0, 1)
  return n, C, split(h_BTD), split(targets_BT), split(mask_BT.astype(jnp.float32))


def _loss_only(spec: HeadSpec, h_BTD, head, targets_BT, mask_BT, key):
  n, _, h, t, m = _by_chunk(spec, h_BTD, targets_BT, mask_BT)
  prep = _prepared(spec, head)

  def body(total, xs):
    h_BCD, t_BC, m_BC, i = xs
    logits, _, _ = _chunk_logits(spec, prep, h_BCD, _keep(spec, key, i, h_BCD.shape))
    return total + jnp.sum(_nll(logits, t_BC)[1] * m_BC), None
  return jax.lax.scan(body, jnp.float32(0), (h, t, m, jnp.arange(n)))[0]


def _loss_and_grads(spec: HeadSpec, h_BTD, head, targets_BT, mask_BT, key, want: dict):
  """(loss, d loss / d h (B, T, D), fp32 weight gradients of the leaves `want` marks), one pass."""
  B, T, D = h_BTD.shape
  n, C, h, t, m = _by_chunk(spec, h_BTD, targets_BT, mask_BT)
  V, Vp = spec.vocab_size, spec.padded_vocab
  dt = jnp.dtype(spec.dtype)
  prep = _prepared(spec, head)
  f32 = jnp.float32
  shapes = {"w": (Vp, D) if spec.tied else (D, Vp)}
  if "lora_a" in head:
    shapes.update(lora_a=head["lora_a"].shape, lora_b=(head["lora_b"].shape[0], Vp))
  acc0 = {k: jnp.zeros(shape, f32) for k, shape in shapes.items() if want.get(k)}

  def body(carry, xs):
    total, acc = carry
    h_BCD, t_BC, m_BC, i = xs
    keep = _keep(spec, key, i, h_BCD.shape)
    logits, h_in, x = _chunk_logits(spec, prep, h_BCD, keep)
    lse_BC, nll_BC = _nll(logits, t_BC)
    # d nll / d logits = softmax - onehot(target), zero on masked positions and padded columns;
    # rounded to the compute dtype for its matmuls, as autodiff of a bf16 head would.
    onehot = jnp.arange(Vp) == t_BC[..., None]
    d_lo = ((jnp.exp(logits - lse_BC[..., None]) - onehot) * m_BC[..., None]).astype(dt)
    # d / d [h, s x A]: one matmul back through [W; B].
    d_in = jnp.einsum("bcv,vd->bcd" if spec.tied else "bcv,dv->bcd", d_lo, prep["w"],
                      preferred_element_type=f32)
    dh = d_in[..., :D]
    acc = dict(acc)
    if "w" in acc:  # only for a differentiated head weight: never for the frozen tied embedding
      hc = h_in[..., :D]
      acc["w"] = acc["w"] + (jnp.einsum("bcv,bcd->vd", d_lo, hc, preferred_element_type=f32) if spec.tied
                             else jnp.einsum("bcd,bcv->dv", hc, d_lo, preferred_element_type=f32))
    if x is not None:
      du = spec.lora_scale * d_in[..., D:]  # d / d (x A), (B, C, r)
      dx = jnp.einsum("bcr,dr->bcd", du.astype(dt), prep["lora_a"], preferred_element_type=f32)
      dh = dh + (dx if keep is None else dx * keep.astype(f32))
      if "lora_a" in acc:
        acc["lora_a"] = acc["lora_a"] + jnp.einsum("bcd,bcr->dr", x.astype(f32), du)
      if "lora_b" in acc:  # h_in[..., D:] = s x A
        acc["lora_b"] = acc["lora_b"] + jnp.einsum("bcr,bcv->rv", h_in[..., D:], d_lo,
                                                   preferred_element_type=f32)
    return (total + jnp.sum(nll_BC * m_BC), acc), dh.astype(h_BTD.dtype)

  (total, acc), dh = jax.lax.scan(body, (jnp.float32(0), acc0), (h, t, m, jnp.arange(n)))
  dh_BTD = jnp.swapaxes(dh, 0, 1).reshape(B, n * C, D)[:, :T]
  grads = {}
  for k, g in acc.items():  # drop the padded vocabulary columns again
    if k == "w":
      g = g[:V] if spec.tied else g[:, :V]
    elif k == "lora_b":
      g = g[:, :V]
    grads[k] = g.astype(head[k].dtype)
  return total, dh_BTD, grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_nll_sum(spec, h_BTD, head, targets_BT, mask_BT, key):
  return _loss_only(spec, h_BTD, head, targets_BT, mask_BT, key)


def _fwd(spec, h_BTD, head, targets_BT, mask_BT, key):
  want = {k: p.perturbed for k, p in head.items()}
  values = lambda tree: jax.tree.map(lambda p: p.value, tree)
  total, dh, grads = _loss_and_grads(spec, h_BTD.value, values(head), targets_BT.value,
                                     mask_BT.value, key.value, want)
  # Every head key, None where that leaf is not differentiated (a constant of the step).
  return total, (dh if h_BTD.perturbed else None, {k: grads.get(k) for k in head})


def _bwd(spec, res, g):
  dh, grads = res
  g = jnp.asarray(g, jnp.float32)
  head_ct = {k: None if v is None else (v * g).astype(v.dtype) for k, v in grads.items()}
  return (None if dh is None else (dh.astype(jnp.float32) * g).astype(dh.dtype), head_ct,
          None, None, None)


_head_nll_sum.defvjp(_fwd, _bwd, symbolic_zeros=True)


def head_nll_sum(h_BTD, head: dict, targets_BT, mask_BT, spec: HeadSpec, key=None):
  """Sum over mask_BT of -log softmax(head(h))[target]; differentiable in h and the head leaves.

  h_BTD: final hidden states (after ln_f); targets_BT: int next tokens; mask_BT: 1 where the token
  counts; key: PRNG key for the head adapter's dropout (training only).
  """
  head = {k: v for k, v in head.items() if k in ("w", "lora_a", "lora_b")}
  if ("lora_a" in head) != ("lora_b" in head):
    raise ValueError(f"the head holds {sorted(head)}: lora_a and lora_b come as a pair")
  key = jax.random.PRNGKey(0) if key is None else jax.random.fold_in(key, _DROPOUT_SALT)
  return _head_nll_sum(spec, h_BTD, head, targets_BT, mask_BT, key)


def token_logps(h_BTD, head: dict, targets_BT, spec: HeadSpec, key=None, backward=True):
  """(B, T) fp32 log softmax(head(h))[target] at every position: the same chunked, fp32-accumulated
  head as head_nll_sum, for sums over arbitrary token sets (DPO's per-reply log-probs).

  Gradient. With a head that has no adapter and no dropout, a jax.custom_vjp: a position's output is
  a scalar, so its gradient w.r.t. h_t is the cotangent times d logp_t / d h_t = (onehot - softmax) W,
  which the forward pass forms chunk by chunk from the logits it already holds (one more matmul, as
  head_nll_sum's); the backward only scales it. `backward` (a bool, or a traced bool) says whether
  that gradient will be wanted: where False the matmul is skipped (DPO's reference runs the policy's
  forward code with backward False, dpo_forward.py). A head leaf that is differentiated (a fully
  trained tied embedding) gets its weight gradient from plain autodiff of the checkpointed chunks. With
  a head adapter or dropout, each chunk runs under jax.checkpoint and the backward recomputes its
  logits. Either way the (B, T, V) logits never exist.
  """
  head = {k: v for k, v in head.items() if k in ("w", "lora_a", "lora_b")}
  if "lora_a" not in head and (spec.deterministic or spec.lora_dropout <= 0.0):
    return _token_logps(spec, h_BTD, head, targets_BT, jnp.asarray(backward, bool))
  return _checkpointed_logps(spec, h_BTD, head, targets_BT, key)


def _checkpointed_logps(spec: HeadSpec, h_BTD, head, targets_BT, key):
  key = jax.random.PRNGKey(0) if key is None else jax.random.fold_in(key, _DROPOUT_SALT)
  B, T = targets_BT.shape
  n, C, h, t, _ = _by_chunk(spec, h_BTD, targets_BT, jnp.ones_like(targets_BT))

  @jax.checkpoint
  def chunk_logps(head, h_BCD, t_BC, i):
    logits, _, _ = _chunk_logits(spec, _prepared(spec, head), h_BCD, _keep(spec, key, i, h_BCD.shape))
    return -_nll(logits, t_BC)[1]

  out = jax.lax.map(lambda xs: chunk_logps(head, *xs), (h, t, jnp.arange(n)))  # (n, B, C)
  return jnp.swapaxes(out, 0, 1).reshape(B, n * C)[:, :T]


def _logps_and_slopes(spec: HeadSpec, h_BTD, head, targets_BT, backward):
  """((B, T) log-probs, (B, T, D) d logp_t / d h_t in h's dtype). backward: None (no slopes: None
  comes back) or a bool array (the slopes where True, zeros where False: their matmul skipped)."""
  B, T, D = h_BTD.shape
  n, C, h, t, _ = _by_chunk(spec, h_BTD, targets_BT, jnp.ones_like(targets_BT))
  prep = _prepared(spec, head)
  dt = jnp.dtype(spec.dtype)

  def body(xs):
    h_BCD, t_BC = xs
    logits, _, _ = _chunk_logits(spec, prep, h_BCD, None)
    lse_BC, nll_BC = _nll(logits, t_BC)
    if backward is None:
      return -nll_BC, None

    def slope():  # (onehot - softmax) W, the softmax rounded to the compute dtype for its matmul
      onehot = jnp.arange(spec.padded_vocab) == t_BC[..., None]
      d_lo = (onehot - jnp.exp(logits - lse_BC[..., None])).astype(dt)
      return jnp.einsum("bcv,vd->bcd" if spec.tied else "bcv,dv->bcd", d_lo, prep["w"],
                        preferred_element_type=jnp.float32).astype(h_BTD.dtype)
    return -nll_BC, jax.lax.cond(backward, slope, lambda: jnp.zeros(h_BCD.shape, h_BTD.dtype))

  logp, slopes = jax.lax.map(body, (h, t))
  unchunk = lambda x: jnp.swapaxes(x, 0, 1).reshape((B, n * C) + x.shape[3:])[:, :T]
  return unchunk(logp), None if slopes is None else unchunk(slopes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _token_logps(spec, h_BTD, head, targets_BT, backward):
  return _logps_and_slopes(spec, h_BTD, head, targets_BT, None)[0]


def _logps_fwd(spec, h_BTD, head, targets_BT, backward):
  values = {k: p.value for k, p in head.items()}
  if any(p.perturbed for p in head.values()):  # a trained head weight: its gradient needs the logits
    logp, pullback = jax.vjp(lambda h, w: _checkpointed_logps(spec, h, w, targets_BT.value, None),
                             h_BTD.value, values)
    return logp, (pullback, None)
  logp, slopes = _logps_and_slopes(spec, h_BTD.value, values, targets_BT.value,
                                   backward.value if h_BTD.perturbed else None)
  return logp, (None, slopes)


def _logps_bwd(spec, res, g):
  pullback, slopes = res
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None, None, None
  if pullback is not None:
    dh, dhead = pullback(g)
    return dh, dhead, None, None
  if slopes is None:
    return None, None, None, None
  return (g.astype(jnp.float32)[..., None] * slopes.astype(jnp.float32)).astype(slopes.dtype), None, None, None


_token_logps.defvjp(_logps_fwd, _logps_bwd, symbolic_zeros=True)
