"""fused_lora.py (lora.fused_matmul): x [W | A] as one matmul, against the factored formula written
here and against the model without it."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY
from gpt2_lora_jax import fused_lora, lora, train
from gpt2_lora_jax import model as gpt2_model


def factored(x, w, bias, a, b, s):
  return (x @ w + bias) + ((x @ a) @ b) * s


def draws(dtype, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(3, 7, 16), (16, 24), (24,), (16, 4), (4, 24), (3, 7, 24)]
  return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_value_and_every_gradient_match_the_factored_formula(dtype, tol):
  x, w, bias, a, b, g = draws(dtype)
  s = 2.0
  got = fused_lora.linear(x, w, bias, a, b, s)
  want = factored(*(t.astype(jnp.float32) for t in (x, w, bias, a, b)), s)
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=tol, atol=tol)
  loss = lambda f: (lambda *t: jnp.sum(f(*t, s).astype(jnp.float32) * g.astype(jnp.float32)))
  grads = jax.grad(loss(fused_lora.linear), argnums=(0, 1, 2, 3, 4))(x, w, bias, a, b)
  ref = jax.grad(loss(factored), argnums=(0, 1, 2, 3, 4))(*(t.astype(jnp.float32) for t in (x, w, bias, a, b)))
  for name, p, q in zip(("x", "w", "bias", "a", "b"), grads, ref):
    assert p.dtype == dtype, name
    scale = 1 + float(jnp.max(jnp.abs(q)))
    assert float(jnp.max(jnp.abs(p.astype(jnp.float32) - q))) <= tol * scale, name


def test_a_frozen_weight_gets_no_gradient_matmul():
  """Differentiating in A and B only: the backward holds the three rank-r matmuls (d(xA), dA, dB)
  and no (in, out) weight-gradient matmul and no d x matmul."""
  x, w, bias, a, b, g = draws(jnp.float32)
  jaxpr = jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(fused_lora.linear(x, w, bias, a, b, 2.0) * g),
                                  argnums=(0, 1)))(a, b)
  dots = re.findall(r"f32\[([\d,]+)\] = dot_general", str(jaxpr))
  # forward: x [W | A] (3,7,28) and u B (3,7,24); backward: g B^T (3,7,4), x^T du (16,4), u^T g (4,24)
  assert sorted(dots) == sorted(["3,7,28", "3,7,24", "3,7,4", "16,4", "4,24"])


def tiny_model(fused: bool, dropout: float):
  cfg = gpt2_model.GPT2Config(**TINY, vocab_size=96, lora_fused_matmul=fused)
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=dropout)
  return cfg, lcfg, lora.make_model(cfg, lcfg)


def batch():
  rng = np.random.default_rng(5)
  seg = np.ones((2, 32), np.int32)
  seg[0, 20:] = 2
  return {"inputs": jnp.asarray(rng.integers(0, 96, (2, 32)), jnp.int32),
          "targets": jnp.asarray(rng.integers(0, 96, (2, 32)), jnp.int32),
          "positions": jnp.asarray(np.tile(np.arange(32), (2, 1)), jnp.int32),
          "segment_ids": jnp.asarray(seg), "loss_mask": jnp.ones((2, 32), jnp.float32)}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_model_trains_the_same_with_and_without_it(dropout):
  """The loss and the adapters' gradients with lora.fused_matmul equal the factored model's, every
  parameter random (B too); with dropout the training forward keeps the factored path (bitwise)."""
  cfg, lcfg, plain = tiny_model(False, dropout)
  _, _, fused = tiny_model(True, dropout)
  params = lora.add(gpt2_model.init_params(cfg, jax.random.PRNGKey(0)), lcfg, jax.random.PRNGKey(1))
  leaves, tree = jax.tree.flatten(params)  # every parameter random, the adapters' B included
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  params = jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
  labels = lora.labels(params, lcfg)
  trainable, frozen = lora.split(params, labels)

  def loss_and_grads(model):
    f = lambda t: train.token_loss_sums(model, lora.combine(t, frozen), batch(), jax.random.PRNGKey(9),
                                        deterministic=False)[0]
    return jax.value_and_grad(f)(trainable)
  (l0, g0), (l1, g1) = loss_and_grads(plain), loss_and_grads(fused)
  if dropout:
    assert float(l0) == float(l1)
    jax.tree.map(lambda p, q: np.testing.assert_array_equal(np.asarray(p), np.asarray(q)), g0, g1)
    return
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  jax.tree.map(lambda p, q: np.testing.assert_allclose(np.asarray(q), np.asarray(p), rtol=1e-4,
                                                       atol=1e-6 * (1 + float(jnp.max(jnp.abs(p))))), g0, g1)
  # evaluation (deterministic) goes through it with dropout too: same logits
  ids = batch()["inputs"]
  np.testing.assert_allclose(np.asarray(fused.apply({"params": params}, ids)),
                             np.asarray(plain.apply({"params": params}, ids)), rtol=1e-5, atol=1e-5)


def test_the_step_holds_two_fewer_matmuls_per_adapted_linear():
  """Lowered train-step gradient: per adapted linear the factored form has 8 matmuls (x W, x A,
  u B; g W^T, g B^T, du A^T, x^T du, u^T g), the fused one 6 (x [W | A], u B; g B^T,
  [g, du] [W | A]^T, x^T du, u^T g). Block 0's c_attn reads ln_1 of the frozen embeddings: no d x is
  wanted there, so both forms skip it (6 against 5: one fewer)."""
  cfg, lcfg, plain = tiny_model(False, 0.0)
  _, _, fused = tiny_model(True, 0.0)
  params = lora.add(gpt2_model.init_params(cfg, jax.random.PRNGKey(0)), lcfg, jax.random.PRNGKey(1))
  trainable, frozen = lora.split(params, lora.labels(params, lcfg))

  def count(model):
    f = lambda t: train.token_loss_sums(model, lora.combine(t, frozen), batch(), jax.random.PRNGKey(0),
                                        deterministic=False)[0]
    return jax.jit(jax.grad(f)).lower(trainable).as_text().count("stablehlo.dot_general")
  linears = 4 * cfg.n_layer  # c_attn, attn c_proj, c_fc, mlp c_proj per block
  assert count(plain) - count(fused) == 2 * linears - 1


@pytest.mark.parametrize("devices", [1, 8])
def test_the_fused_step_lowers_for_cuda(simulated_gpu, monkeypatch, devices):
  """PEFT's setting (no dropout) with lora.fused_matmul, as a GPU runs it (test_gpu_lowering's
  program and checks): cuDNN's packed-layout calls, no forced dot algorithm, no fp32 [B, T, V]."""
  import test_gpu_lowering as lowering
  if len(jax.devices()) < devices:
    pytest.skip(f"needs {devices} CPU devices")
  simulated_gpu()
  monkeypatch.setattr(lowering, "LORA", lora.LoraConfig(rank=8, alpha=16.0, dropout=0.0,
                                                        targets=("c_attn", "c_proj", "c_fc")))
  config = lowering.gpt2_config("auto", scan=False, remat="none", lora_fused_matmul=True)
  step, args, _ = lowering.train_program(config, 1, devices)
  lowering.assert_holds(lowering.cuda(step, *args), "cudnn_packed", training=True, T=lowering.T, devices=devices)
