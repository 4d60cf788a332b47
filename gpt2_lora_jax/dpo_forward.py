"""DPO's forward: per-reply log-probs of a packed preference batch, and the policy's and the reference's
from one compiled loop body with a backward pass for the policy only.

    stats = reply_stats(model, params, batch, num_replies)              # {'logps', 'tokens', 'logit_sums'}
    policy, reference = policy_and_reference(model, trainable, reference_adapters, base, batch, R)

Why one loop body. DPO must start exactly at its reference: at the first step the policy's adapters equal
the reference's and the two per-reply log-probs must be bitwise equal (loss log 2, margin 0). Two
forwards traced apart can differ in the last bits: XLA fuses and orders each program's reductions by
what surrounds it, and a forward whose activations feed a backward pass is surrounded differently
from one that is not. So both run as the two iterations of one loop (lax.scan over the stacked
adapter trees [reference, policy]): the same compiled body on the same rows, grouped the same way.

Why a custom VJP. Differentiating that loop as a whole (jax.lax.map inside the loss, the design this
replaced) runs the loop's backward for both iterations, the reference's included (its result
discarded): twice the forward and backward work of a reference-free step. Here the loop body is
jax.vjp of the forward: each iteration computes its stats and its backward's residuals, the residuals
are the loop's carry, and the policy, the last iteration, leaves its own there (the reference's are
overwritten, so one set of residuals is alive, not two). The backward rule calls that saved pullback
once: the reference costs one forward, no backward and no residual memory after its iteration.
Residuals that are the base weights or the batch themselves (the same arrays) ride as the loop's
unchanged inputs, not as copies in the carry. The head (loss.token_logps) forms each token's gradient
slope in the forward; the reference's iteration skips that matmul (a conditional on the iteration's
flag), the log-probs themselves are computed by the same code in both iterations.

Without differentiation (held-out evaluation) the same two iterations run the plain forward.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from gpt2_lora_jax import lora
from gpt2_lora_jax import loss as loss_lib


def reply_stats(model, params, batch, num_replies: int, chunk: int = loss_lib.DEFAULT_CHUNK,
                backward=True) -> dict:
  """Per reply of each row, without dropout: {'logps': (B, R) log-probability summed over its own
  target tokens, 'tokens': (B, R) those tokens, 'logit_sums': (B, R) sum over them of the mean logit
  over the vocabulary (TRL's logits/chosen, before dividing by the tokens)}.

  batch: a preference batch (inputs, targets, positions, segment_ids, reply_index (B, T) with -1 off
  replies). R = num_replies = 2 J. The head is the supervised loss's (loss.token_logps: fp32
  accumulated logits, `chunk` positions at a time, never the whole batch's logits). The mean logit
  is linear in the hidden state: h . mean_v(W_v) (+ s (h A) . mean_v(B_v) with a head adapter).
  backward: whether a gradient of this forward will be taken (loss.token_logps; may be traced).
  """
  h_BTD = model.apply({"params": params}, batch["inputs"], position_ids=batch["positions"],
                      segment_ids=batch["segment_ids"], deterministic=True, return_hidden=True)
  cfg = model.config
  head = loss_lib.head_from_params(params, cfg.tie_word_embeddings)
  spec = loss_lib.HeadSpec(vocab_size=cfg.vocab_size, tied=cfg.tie_word_embeddings, dtype=cfg.dtype,
                           lora_scale=float(model.lora_scale or 0.0), deterministic=True, chunk=chunk)
  logp_BT = loss_lib.token_logps(h_BTD, head, batch["targets"], spec, None, backward)
  h32_BTD = jax.lax.stop_gradient(h_BTD).astype(jnp.float32)
  w = jax.lax.stop_gradient(head["w"]).astype(jnp.float32)
  mean_logit_BT = h32_BTD @ (w.mean(0) if cfg.tie_word_embeddings else w.mean(1))
  if "lora_a" in head:
    a, b = (jax.lax.stop_gradient(head[k]).astype(jnp.float32) for k in ("lora_a", "lora_b"))
    mean_logit_BT = mean_logit_BT + spec.lora_scale * (h32_BTD @ a) @ b.mean(1)
  onehot_BTR = (batch["reply_index"][..., None] == jnp.arange(num_replies)).astype(jnp.float32)
  return {"logps": jnp.einsum("bt,btr->br", logp_BT, onehot_BTR),
          "tokens": jnp.sum(onehot_BTR, axis=1),
          "logit_sums": jnp.einsum("bt,btr->br", mean_logit_BT, onehot_BTR)}


def reply_logps(model, params, batch, num_replies: int, chunk: int = loss_lib.DEFAULT_CHUNK):
  """(B, R) log-probability of each reply of each row (reply_stats' 'logps')."""
  return reply_stats(model, params, batch, num_replies, chunk)["logps"]


def policy_and_reference(model, trainable, reference, base, batch, num_replies: int) -> tuple[dict, dict]:
  """(reply_stats of trainable + base, reply_stats of reference + base): one loop body for both,
  differentiable in `trainable` only (the reference's stats are constants; see the module doc)."""
  reference = jax.tree.map(lambda p, r: jax.lax.stop_gradient(r).astype(p.dtype), trainable, reference)
  policy, ref = _policy_and_reference(model, num_replies, trainable, reference, base, batch)
  return policy, jax.tree.map(jax.lax.stop_gradient, ref)


def _stacked(reference, trainable):
  """The loop's inputs: [reference, policy] (the policy last: its residuals stay in the carry), and
  whether each iteration's backward runs (the head then skips the reference's, loss.token_logps)."""
  return jax.tree.map(lambda r, p: jnp.stack([r, p]), reference, trainable), jnp.array([False, True])


def _policy_and_reference_primal(model, num_replies, trainable, reference, base, batch):
  stats = jax.lax.map(lambda xs: reply_stats(model, lora.combine(xs[0], base), batch, num_replies),
                      _stacked(reference, trainable))
  return jax.tree.map(lambda x: x[1], stats), jax.tree.map(lambda x: x[0], stats)


_policy_and_reference = jax.custom_vjp(_policy_and_reference_primal, nondiff_argnums=(0, 1))


def _with_pullback(model, num_replies, invariant, adapters, backward, found: dict):
  """One loop iteration: (stats, the residual leaves of its pullback that are not `invariant` leaves).

  found['meta'] gets (the pullback's tree structure, for each of its leaves the index of the invariant
  leaf it is, or None where it is one of the returned leaves)."""
  base, batch = invariant
  stats, pullback = jax.vjp(lambda t: reply_stats(model, lora.combine(t, base), batch, num_replies,
                                                  backward=backward), adapters)
  leaves, treedef = jax.tree.flatten(pullback)
  position = {id(x): i for i, x in enumerate(jax.tree.leaves(invariant))}
  where = tuple(position.get(id(x)) for x in leaves)
  found["meta"] = (treedef, where)
  return stats, [x for x, w in zip(leaves, where) if w is None]


def _fwd(model, num_replies, trainable, reference, base, batch):
  invariant = (base, batch)
  probe = {}
  residual_shapes = jax.eval_shape(
      lambda inv, t: _with_pullback(model, num_replies, inv, t, True, probe)[1], invariant, trainable)
  found = {}

  def body(carry, xs):
    inv, _ = carry
    stats, residuals = _with_pullback(model, num_replies, inv, *xs, found)
    return (inv, residuals), stats

  init = (invariant, [jnp.zeros(s.shape, s.dtype) for s in residual_shapes])
  (_, residuals), stats = jax.lax.scan(body, init, _stacked(reference, trainable))
  treedef, where = found["meta"]
  invariant_leaves, carried = jax.tree.leaves(invariant), iter(residuals)
  pullback = jax.tree.unflatten(treedef, [next(carried) if w is None else invariant_leaves[w] for w in where])
  return (jax.tree.map(lambda x: x[1], stats), jax.tree.map(lambda x: x[0], stats)), pullback


def _bwd(model, num_replies, pullback, cotangents):
  del model, num_replies
  policy_ct, _ = cotangents  # the reference's stats are constants of the loss
  (trainable_ct,) = pullback(policy_ct)
  return trainable_ct, None, None, None


_policy_and_reference.defvjp(_fwd, _bwd)
