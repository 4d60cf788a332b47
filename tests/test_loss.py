"""The fused head + cross-entropy (loss.py) against optax on full logits, and its footprint in the step."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2_lora_jax import loss as loss_lib

B, T, D, V, R = 2, 40, 16, 300, 4  # V pads to 384; T = 40 with chunk 16 -> 3 chunks of 14 (+2 padded)
SCALE = 1.5


def _inputs(dtype, tied, seed=0):
  rng = np.random.RandomState(seed)
  h = jnp.asarray(rng.randn(B, T, D), dtype)
  w = jnp.asarray(rng.randn(V, D) if tied else rng.randn(D, V), dtype) * 0.3
  head = {"w": w, "lora_a": jnp.asarray(rng.randn(D, R) * 0.3, jnp.float32),
          "lora_b": jnp.asarray(rng.randn(R, V) * 0.3, jnp.float32)}
  targets = jnp.asarray(rng.randint(0, V, (B, T)), jnp.int32)
  mask = jnp.asarray(rng.rand(B, T) < 0.7, jnp.float32)  # ~30% masked positions
  return h, head, targets, mask


def _reference(h, head, targets, mask, tied, dtype):
  """optax on the full (B, T, V) logits, from the same inputs rounded to the compute dtype."""
  f32 = lambda x: x.astype(dtype).astype(jnp.float32)
  w = f32(head["w"])
  logits = h.astype(jnp.float32) @ (w.T if tied else w)
  logits = logits + SCALE * (h.astype(jnp.float32) @ f32(head["lora_a"])) @ head["lora_b"]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(nll * mask)


@pytest.mark.parametrize("dtype,tied", [("float32", True), ("bfloat16", True), ("float32", False)])
def test_fused_loss_equals_optax_in_value_and_gradient(dtype, tied):
  h, head, targets, mask = _inputs(dtype, tied)
  spec = loss_lib.HeadSpec(vocab_size=V, tied=tied, dtype=dtype, lora_scale=SCALE, chunk=16)
  assert spec.padded_vocab == 384 and loss_lib.chunking(T, 16) == (3, 14)
  fused = lambda h, head: loss_lib.head_nll_sum(h, head, targets, mask, spec)
  ref = lambda h, head: _reference(h, head, targets, mask, tied, dtype)
  # Gradients w.r.t. h and every head leaf (the weight trains: an untied or fully trained head).
  got, (gh, ghead) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h, head)
  want, (wh, whead) = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(h.astype(jnp.float32), head)
  # fp32: float rounding only. bf16: the logits' gradient is rounded to bf16 before its matmuls
  # (as autodiff of a bf16 head does), ~2^-8 relative.
  tol = 2e-6 if dtype == "float32" else 1e-2
  np.testing.assert_allclose(got, want, rtol=tol)
  assert gh.dtype == h.dtype
  for name, g, w in [("h", gh, wh)] + [(k, ghead[k], whead[k]) for k in ("w", "lora_a", "lora_b")]:
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    err = np.max(np.abs(g - w)) / np.max(np.abs(w))
    assert err < tol, (name, err)
  # Masked positions get no gradient at all.
  assert np.all(np.asarray(gh, np.float32)[np.asarray(mask) == 0] == 0)
  # Without gradients (evaluation) the value is the same.
  np.testing.assert_allclose(jax.jit(fused)(h, head), got, rtol=1e-6)


def test_frozen_tied_head_gets_no_weight_gradient_matmul():
  """With the embedding a constant (frozen), no (V, D)-shaped matmul exists; trained, it does."""
  h, head, targets, mask = _inputs("float32", True)
  spec = loss_lib.HeadSpec(vocab_size=V, tied=True, lora_scale=SCALE, chunk=16)
  w = head.pop("w")
  frozen_w = lambda h, lo: loss_lib.head_nll_sum(h, {**lo, "w": w}, targets, mask, spec)
  trained_w = lambda h, lo, w: loss_lib.head_nll_sum(h, {**lo, "w": w}, targets, mask, spec)

  def weight_grad_dots(f, *args):
    text = str(jax.make_jaxpr(jax.grad(f, argnums=tuple(range(len(args)))))(*args))
    return re.findall(r"f32\[384,16\] = dot_general", text)
  assert weight_grad_dots(frozen_w, h, head) == []
  assert len(weight_grad_dots(trained_w, h, head, w)) == 1


def test_head_adapter_dropout_gradients_match_autodiff():
  """Dropout on the head adapter's input: the fused gradients equal autodiff of the same forward."""
  h, head, targets, mask = _inputs("float32", True)
  spec = loss_lib.HeadSpec(vocab_size=V, tied=True, lora_scale=SCALE, lora_dropout=0.5,
                           deterministic=False, chunk=16)
  key = jax.random.PRNGKey(3)
  fused = lambda h, lo: loss_lib.head_nll_sum(h, {**lo, "w": head["w"]}, targets, mask, spec, key)
  # Plain autodiff through the loss-only forward (the path evaluation runs), same key and masks.
  salted = jax.random.fold_in(key, loss_lib._DROPOUT_SALT)
  plain = lambda h, lo: loss_lib._loss_only(spec, h, {**lo, "w": head["w"]}, targets, mask, salted)
  lo = {k: head[k] for k in ("lora_a", "lora_b")}
  got, got_g = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h, lo)
  want, want_g = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))(h, lo)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  no_dropout = loss_lib.head_nll_sum(h, head, targets, mask, spec.__class__(
      vocab_size=V, tied=True, lora_scale=SCALE, chunk=16))
  assert abs(float(got) - float(no_dropout)) > 1e-3  # dropout really acts


def test_train_step_holds_no_whole_batch_fp32_logits():
  """Compiled gpt2-vocabulary train step at T = 600 (not a multiple of 256): 3 chunks of 200."""
  from gpt2_lora_jax import lora, model as gpt2_model, optim, train
  import types
  Bs, Ts = 2, 600
  config = gpt2_model.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=Ts, dtype="bfloat16",
                                 param_dtype="bfloat16")
  lora_cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("c_attn", "lm_head"))
  params = jax.eval_shape(lambda: lora.add(gpt2_model.init_params(config, jax.random.PRNGKey(0)), lora_cfg,
                                           jax.random.PRNGKey(1)))
  labels = lora.labels(params, lora_cfg)
  ocfg = types.SimpleNamespace(lr=1e-4, schedule="constant", warmup_steps=0, min_lr_ratio=0.0, b1=0.9,
                               b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0)
  tx, schedule = optim.make_optimizer(ocfg, 10, labels), optim.make_schedule(ocfg, 10)
  trainable, frozen = lora.split(params, labels)
  state = {"trainable": trainable, "opt_state": jax.eval_shape(tx.init, params),
           "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  row = lambda dt: jax.ShapeDtypeStruct((Bs, Ts), dt)
  batch = {"inputs": row(jnp.int32), "targets": row(jnp.int32), "positions": row(jnp.int32),
           "segment_ids": row(jnp.int32), "loss_mask": row(jnp.float32)}
  step = train.make_train_step(lora.make_model(config, lora_cfg), tx, labels, 1, schedule)
  compiled = jax.jit(step).lower(state, frozen, batch).compile()
  text = compiled.as_text()
  whole = re.findall(rf"f32\[{Bs},{Ts},(?:50257|50304)\]", text)
  chunked = re.findall(rf"f32\[{Bs},200,50304\]", text)
  assert not whole and chunked, (len(whole), len(chunked))
  whole_logits_bytes = Bs * Ts * 50304 * 4
  assert compiled.memory_analysis().temp_size_in_bytes < whole_logits_bytes


@pytest.mark.parametrize("dtype,tied", [("float32", True), ("bfloat16", True), ("float32", False)])
def test_token_logps_equal_log_softmax_in_value_and_gradient(dtype, tied):
  """token_logps (DPO's per-token log-probs) against jax.nn.log_softmax of the full fp32 logits, the
  gradient w.r.t. h formed in the forward pass (no head adapter), and w.r.t. a trained head weight."""
  h, head, targets, _ = _inputs(dtype, tied)
  w = head["w"]
  spec = loss_lib.HeadSpec(vocab_size=V, tied=tied, dtype=dtype, chunk=16)
  weights = jnp.asarray(np.random.RandomState(1).randn(B, T), jnp.float32)  # a cotangent per position

  def reference(h, w):
    f32 = lambda x: x.astype(dtype).astype(jnp.float32)
    logits = h.astype(jnp.float32) @ (f32(w).T if tied else f32(w))
    return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]

  got = jax.jit(lambda h: loss_lib.token_logps(h, {"w": w}, targets, spec))(h)
  np.testing.assert_allclose(got, reference(h, w), rtol=2e-6 if dtype == "float32" else 1e-2)
  scalar = lambda f: (lambda *args: jnp.sum(f(*args) * weights))
  frozen_w = jax.jit(jax.grad(scalar(lambda h: loss_lib.token_logps(h, {"w": w}, targets, spec))))(h)
  trained = jax.jit(jax.grad(scalar(lambda h, w: loss_lib.token_logps(h, {"w": w}, targets, spec)), (0, 1)))(h, w)
  want = jax.grad(scalar(reference), (0, 1))(h.astype(jnp.float32), w)
  tol = 2e-6 if dtype == "float32" else 1e-2  # bf16: the softmax rounded to bf16 for its matmul
  for got_g, want_g in [(frozen_w, want[0]), (trained[0], want[0]), (trained[1], want[1])]:
    got_g, want_g = np.asarray(got_g, np.float32), np.asarray(want_g, np.float32)
    assert np.max(np.abs(got_g - want_g)) / np.max(np.abs(want_g)) < tol
  assert frozen_w.dtype == h.dtype


def test_token_logps_forms_the_h_gradient_in_the_forward():
  """With a frozen head, the backward holds no logits matmul: per chunk one for the logits and one for
  the slope (onehot - softmax) W, both in the forward; autodiff of the checkpointed chunks (the path
  this replaced for a frozen head) recomputes the logits in the backward."""
  h, head, targets, _ = _inputs("float32", True)
  spec = loss_lib.HeadSpec(vocab_size=V, tied=True, chunk=16)
  w = head["w"]

  def vocab_dots(f):
    text = str(jax.make_jaxpr(jax.grad(lambda h: jnp.sum(f(h))))(h))
    return len(re.findall(r"f32\[\d+,14,384\] = dot_general|f32\[\d+,14,16\] = dot_general", text))

  fused = lambda h: loss_lib.token_logps(h, {"w": w}, targets, spec)
  recompute = lambda h: loss_lib._checkpointed_logps(spec, h, {"w": w}, targets, None)
  assert vocab_dots(fused) == 2  # the logits, the slope
  assert vocab_dots(recompute) == 3  # the logits, again in the backward, and d h
