"""optim.py's weight decay: on the real GPT-2 parameter tree it reaches the matmul weights only."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from gpt2_lora_jax import config as config_lib
from gpt2_lora_jax import lora, model, optim


def _decayed_leaves(lora_cfg, **optim_settings):
  """Paths that one AdamW step with zero gradients moves, checked against -lr * wd * p."""
  config = model.GPT2Config(vocab_size=64, n_positions=8, n_embd=16, n_layer=2, n_head=2,
                            tie_word_embeddings=False)
  base = jax.tree.map(lambda s, r=np.random.RandomState(0): r.normal(0, 1, s.shape).astype(np.float32),
                      model.param_shapes(config))
  params = lora.add(base, lora_cfg, jax.random.PRNGKey(0)) if lora_cfg.rank else base
  params = jax.tree.map(lambda x: np.asarray(x) + 0.5, params)  # lora_b starts at 0: something to decay
  labels = lora.labels(params, lora_cfg)
  cfg = config_lib.default_config().optim
  cfg.update(dict(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.25, **optim_settings))
  tx = optim.make_optimizer(cfg, total_steps=10, labels=labels)
  updates = jax.device_get(jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0])(params))
  decayed = set()
  for path, u in traverse_util.flatten_dict(updates, sep="/").items():
    p = traverse_util.flatten_dict(params, sep="/")[path]
    if np.any(u != 0):
      np.testing.assert_allclose(u, -0.1 * 0.25 * np.asarray(p), rtol=1e-6)
      decayed.add(path)
  return decayed, set(traverse_util.flatten_dict(params, sep="/"))


def test_weight_decay_skips_biases_layer_norms_and_embeddings():
  decayed, paths = _decayed_leaves(lora.LoraConfig(rank=0))  # full fine-tuning: every leaf trains
  assert decayed == {p for p in paths if p.endswith("/kernel")}, sorted(decayed)
  assert {"lm_head/kernel", "h_1/mlp/c_fc/kernel"} <= decayed
  assert not decayed & {"wte/embedding", "wpe/embedding", "ln_f/scale", "h_0/ln_1/bias", "h_0/attn/c_attn/bias"}
  # LoRA with trainable layer norms: the adapters decay, the layer norms and the frozen base do not.
  decayed, paths = _decayed_leaves(lora.LoraConfig(rank=2, alpha=4, extra_trainable=("ln_.*",)))
  assert decayed == {p for p in paths if p.endswith(("/lora_a", "/lora_b"))}, sorted(decayed)
  # The switch: an empty pattern decays every trainable leaf.
  decayed, paths = _decayed_leaves(lora.LoraConfig(rank=0), no_decay="")
  assert decayed == paths
