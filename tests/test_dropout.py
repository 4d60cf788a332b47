"""LoRA dropout's packed keep-masks (dropout.py): the bits, their rate, their sharding-invariance,
and that a train step with them is a pure function of (state, batch)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import random as jex_random
from jax.sharding import NamedSharding, PartitionSpec as P

from gpt2_lora_jax import dropout, lora, sharding
from gpt2_lora_jax import model as gpt2_model


def reference_values(key, shape):
  """The 16-bit values written from the definition in dropout.py's docstring: word w of the mask's
  row-major word array is jax's threefry_2x32 of the counter (0, w); element j of a row takes
  value j % 4 of word j // 4 (low, high half of the first output word, low, high of the second).
  jax's threefry_2x32(key, count) hashes the pairs (count[i], count[n + i]) of a 2n-long count."""
  words = -(-shape[-1] // 4)
  n = int(np.prod(shape[:-1])) * words
  count = jnp.concatenate([jnp.zeros(n, jnp.uint32), jnp.arange(n, dtype=jnp.uint32)])
  out = np.asarray(jex_random.threefry_2x32(jnp.asarray(key, jnp.uint32), count))
  w1, w2 = out[:n].astype(np.int64), out[n:].astype(np.int64)
  vals = np.stack([w1 & 0xFFFF, w1 >> 16, w2 & 0xFFFF, w2 >> 16], axis=-1).reshape(-1, 4 * words)
  return vals[:, :shape[-1]].reshape(shape)


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 7), (4, 3, 2, 10)])
def test_values_are_the_documented_threefry_words(shape):
  key = jax.random.PRNGKey(1234)
  got = np.asarray(dropout.uniform16(key, shape))
  np.testing.assert_array_equal(got, reference_values(key, shape))
  rate = 0.3
  want = reference_values(key, shape) >= round(rate * 65536)
  np.testing.assert_array_equal(np.asarray(dropout.keep_mask(key, shape, rate)), want)


def test_rate_and_expectation():
  """200k elements at rate 0.05: the dropped share within 4 binomial standard deviations of
  round(0.05 * 2^16) / 2^16, and kept values scaled by exactly 1 / P(keep)."""
  rate, shape = 0.05, (50, 4000)
  p_drop = round(rate * 65536) / 65536
  assert dropout.keep_probability(rate) == 1 - p_drop
  x = jnp.full(shape, 3.0, jnp.float32)
  y = np.asarray(dropout.apply(x, rate, jax.random.PRNGKey(7)))
  n = y.size
  dropped = np.mean(y == 0)
  assert abs(dropped - p_drop) <= 4 * np.sqrt(p_drop * (1 - p_drop) / n)
  np.testing.assert_allclose(np.unique(y[y != 0]), [3.0 / (1 - p_drop)], rtol=1e-7)
  # 'bernoulli' keeps flax's arithmetic: x / (1 - rate) where kept
  yb = np.asarray(dropout.apply(x, rate, jax.random.PRNGKey(7), "bernoulli"))
  np.testing.assert_allclose(np.unique(yb[yb != 0]), [np.float32(3.0) / np.float32(1 - rate)], rtol=1e-7)


def test_different_keys_and_rows_differ():
  a = np.asarray(dropout.uniform16(jax.random.PRNGKey(0), (4, 64)))
  b = np.asarray(dropout.uniform16(jax.random.PRNGKey(1), (4, 64)))
  assert np.mean(a == b) < 0.01
  assert len({tuple(r) for r in a}) == 4


def test_mask_does_not_depend_on_the_sharding():
  devices = jax.devices()
  if len(devices) < 4:
    pytest.skip("needs 4 CPU devices (conftest sets 8)")
  mesh = sharding.make_mesh(devices=devices[:4])
  x = jnp.ones((8, 16, 24), jnp.float32)
  key = jax.random.PRNGKey(3)
  f = jax.jit(lambda x, k: dropout.apply(x, 0.25, k), out_shardings=NamedSharding(mesh, P(sharding.BATCH_AXES)))
  sharded = f(jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH_AXES))), key)
  single = jax.jit(lambda x, k: dropout.apply(x, 0.25, k))(x, key)
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))


def test_bad_key_and_rng_are_refused():
  with pytest.raises(ValueError, match="choose one of"):
    dropout.apply(jnp.ones((2, 4)), 0.1, jax.random.PRNGKey(0), "philox")
  with pytest.raises(ValueError, match="threefry2x32 key"):
    dropout.uniform16(jax.random.key(0, impl="rbg"), (2, 4))
  with pytest.raises(Exception, match="lora_dropout_rng"):
    gpt2_model.GPT2Config(lora_dropout_rng="philox")


@pytest.mark.parametrize("rng", ["packed", "bernoulli"])
def test_model_dropout_is_keyed_and_off_when_deterministic(rng):
  cfg = gpt2_model.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                              lora_dropout_rng=rng)
  lcfg = lora.LoraConfig(rank=4, dropout=0.3)
  params = lora.add(gpt2_model.init_params(cfg, jax.random.PRNGKey(0)), lcfg, jax.random.PRNGKey(1))
  # B != 0 so the adapter path (and its dropout) shows in the logits
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.1 if getattr(p[-1], "key", "") == "lora_b" else v, params)
  m = lora.make_model(cfg, lcfg)
  ids = jnp.arange(16).reshape(2, 8) % 64
  run = lambda seed: m.apply({"params": params}, ids, deterministic=False,
                             rngs={"dropout": jax.random.PRNGKey(seed)})
  plain = m.apply({"params": params}, ids)
  np.testing.assert_array_equal(np.asarray(run(5)), np.asarray(run(5)))
  assert not np.allclose(np.asarray(run(5)), np.asarray(run(6)))
  assert not np.allclose(np.asarray(run(5)), np.asarray(plain))
