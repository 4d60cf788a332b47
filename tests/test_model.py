"""GPT-2 parity with transformers' PyTorch GPT2LMHeadModel, loaded through the project's loader."""
import numpy as np
import pytest
import torch

import jax.numpy as jnp
from conftest import make_hf_gpt2
from gpt2_lora_jax import model as gpt2_model
from gpt2_lora_jax import weights

SIZES = {name: gpt2_model.PRESETS[name] for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
VOCAB = 512  # a small vocabulary keeps the four widths quick; the mapping code is the same


def _hf_logits(hf, ids, attention_mask=None, position_ids=None):
  with torch.no_grad():
    out = hf(torch.tensor(ids), attention_mask=None if attention_mask is None else torch.tensor(attention_mask),
             position_ids=None if position_ids is None else torch.tensor(position_ids))
  return out.logits.numpy()


@pytest.fixture(scope="module", params=sorted(SIZES))
def pair(request, tmp_path_factory):
  """(hf model, project config, project params) for one size's width and heads, 2 layers."""
  size = SIZES[request.param]
  d = str(tmp_path_factory.mktemp(request.param))
  hf = make_hf_gpt2(d, vocab_size=VOCAB, n_embd=size["n_embd"], n_head=size["n_head"], n_layer=2,
                    n_positions=64)
  config, params = weights.load_pretrained(d)
  assert (config.n_embd, config.n_head, config.n_layer) == (size["n_embd"], size["n_head"], 2)
  return hf, config, params


def test_logits_match_transformers(pair):
  hf, config, params = pair
  ids = np.random.RandomState(0).randint(0, VOCAB, (2, 24))
  got = np.asarray(gpt2_model.GPT2(config).apply({"params": params}, jnp.asarray(ids)))
  assert got.shape == (2, 24, VOCAB)
  np.testing.assert_allclose(got, _hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_padding_mask_and_position_ids_match_transformers(pair):
  hf, config, params = pair
  rng = np.random.RandomState(1)
  ids = rng.randint(0, VOCAB, (3, 20))
  mask = np.ones((3, 20), np.int64)
  mask[1, 14:] = 0  # right padding
  mask[2, :5] = 0  # left padding, positions restart at the first real token
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  want = _hf_logits(hf, ids, mask, positions)
  got = np.asarray(gpt2_model.GPT2(config).apply(
      {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
      position_ids=jnp.asarray(positions)))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_segments_isolate_packed_sequences(pair):
  """Two sequences packed in one row with restarting positions give their standalone logits."""
  hf, config, params = pair
  rng = np.random.RandomState(2)
  a, b = rng.randint(0, VOCAB, 9), rng.randint(0, VOCAB, 7)
  packed = np.concatenate([a, b])[None]
  segments = np.array([[1] * 9 + [2] * 7])
  positions = np.array([list(range(9)) + list(range(7))])
  m = gpt2_model.GPT2(config)
  got = np.asarray(m.apply({"params": params}, jnp.asarray(packed), segment_ids=jnp.asarray(segments),
                           position_ids=jnp.asarray(positions)))[0]
  np.testing.assert_allclose(got[:9], _hf_logits(hf, a[None])[0], atol=1e-4, rtol=0)
  np.testing.assert_allclose(got[9:], _hf_logits(hf, b[None])[0], atol=1e-4, rtol=0)


def test_kv_cache_prefill_then_decode_matches_full_forward(pair):
  _, config, params = pair
  ids = np.random.RandomState(3).randint(0, VOCAB, (2, 12))
  m = gpt2_model.GPT2(config)
  full = np.asarray(m.apply({"params": params}, jnp.asarray(ids)))
  cache = gpt2_model.init_kv_cache(config, 2, 16)
  slots = np.zeros((2, 16), np.int32)
  slots[:, :12] = 1
  logits, cache = m.apply({"params": params}, jnp.asarray(ids[:, :8]), attention_mask=jnp.asarray(slots),
                          kv_cache=cache, cache_index=0)
  np.testing.assert_allclose(np.asarray(logits), full[:, :8], atol=1e-4, rtol=0)
  for t in range(8, 12):
    logits, cache = m.apply({"params": params}, jnp.asarray(ids[:, t:t + 1]),
                            attention_mask=jnp.asarray(slots), kv_cache=cache, cache_index=t)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-4, rtol=0)


def test_bf16_compute_stays_close(pair):
  """bf16 compute (the accelerator setting) tracks fp32 logits within bf16 precision."""
  _, config, params = pair
  ids = np.random.RandomState(4).randint(0, VOCAB, (1, 16))
  f32 = np.asarray(gpt2_model.GPT2(config).apply({"params": params}, jnp.asarray(ids)))
  bf16 = gpt2_model.GPT2(config.replace(dtype="bfloat16")).apply({"params": params}, jnp.asarray(ids))
  assert bf16.dtype == jnp.bfloat16
  # Measured on CPU (every parameter random, conftest.randomize_all_params): the largest difference
  # is 0.87% (gpt2, gpt2-large), 0.94% (gpt2-medium) and 1.06% (gpt2-xl) of the largest |logit|
  # (1.97 to 3.19); the bound is ~2.5x that.
  assert np.abs(np.asarray(bf16, np.float32) - f32).max() < 0.025 * np.abs(f32).max()


def test_config_validation():
  with pytest.raises(ValueError, match="not divisible"):
    gpt2_model.GPT2Config(n_embd=65, n_head=4)
  with pytest.raises(ValueError, match="unknown GPT-2 size"):
    gpt2_model.GPT2Config.preset("gpt3")
  with pytest.raises(ValueError, match="activation_function"):
    gpt2_model.GPT2Config.from_hf_dict({"activation_function": "relu"})
  assert gpt2_model.GPT2Config.preset("gpt2-xl").n_embd == 1600


def test_remat_gives_the_same_gradients():
  import jax
  config = gpt2_model.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)
  params = gpt2_model.init_params(config, jax.random.PRNGKey(0))
  ids = jnp.asarray(np.random.RandomState(5).randint(0, VOCAB, (2, 8)))

  def grads(cfg):
    loss = lambda p: gpt2_model.GPT2(cfg).apply({"params": p}, ids).astype(jnp.float32).mean()
    return jax.grad(loss)(params)
  plain, remat = grads(config), grads(config.replace(remat="full"))
  for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_init_rule_is_how_init_params_draws_each_leaf():
  """weights.init_rule (what the benchmark's fast init draws from, weights.draw_params) against flax's
  own init of every leaf, the untied head's kernel included: zeros and ones exactly, normal leaves
  with their sample standard deviation within 5 standard errors (sd of a sample sd of n normal
  values: std / sqrt(2 n)) and a mean within 5 std / sqrt(n)."""
  import jax
  from flax import traverse_util
  config = gpt2_model.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                 tie_word_embeddings=False)
  flat = traverse_util.flatten_dict(gpt2_model.init_params(config, jax.random.PRNGKey(0)))
  assert ("lm_head", "kernel") in flat and ("wpe", "embedding") in flat
  for path, value in flat.items():
    x = np.asarray(value, np.float64)
    kind, std = weights.init_rule(path)
    if kind in ("zeros", "ones"):
      assert np.all(x == (0.0 if kind == "zeros" else 1.0)), path
      continue
    assert kind == "normal", path
    n = x.size
    assert abs(x.std() / std - 1) < 5 / np.sqrt(2 * n), (path, x.std(), std)
    assert abs(x.mean()) < 5 * std / np.sqrt(n), (path, x.mean())
