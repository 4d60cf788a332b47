"""model.scan_layers: scanned and unrolled GPT-2 agree; per-layer formats (HF, PEFT) survive stacking."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from gpt2_lora_jax import checkpoint, lora, sample, sharding, stacking, train, weights
from gpt2_lora_jax import model as gpt2_model

VOCAB = 256
CONFIG = gpt2_model.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)
LORA = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("c_attn", "c_proj", "c_fc", "lm_head"))


def randomised(params, seed):
  """Every leaf random (LayerNorm scales and biases, all biases, adapters' B too)."""
  rng = np.random.RandomState(seed)
  return traverse_util.unflatten_dict({
      p: jnp.asarray((1.0 if p[-1] == "scale" else 0.0) + rng.normal(0.0, 0.1, v.shape), v.dtype)
      for p, v in traverse_util.flatten_dict(params).items()})


@pytest.fixture(scope="module")
def per_layer():
  base = gpt2_model.init_params(CONFIG, jax.random.PRNGKey(0))
  return randomised(lora.add(base, LORA, jax.random.PRNGKey(1)), 2)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.RandomState(0)
  ids = rng.randint(0, VOCAB, (2, 16)).astype(np.int32)
  segments = np.concatenate([np.ones((2, 9)), 2 * np.ones((2, 7))], 1).astype(np.int32)  # packed rows
  return {"inputs": jnp.asarray(ids), "targets": jnp.asarray(np.roll(ids, -1, 1)),
          "positions": jnp.asarray(np.tile(np.arange(16, dtype=np.int32), (2, 1))),
          "segment_ids": jnp.asarray(segments), "loss_mask": jnp.asarray(rng.rand(2, 16) < 0.7, jnp.float32)}


def test_stack_unstack_roundtrip_and_layout(per_layer):
  stacked = stacking.stack_layers(per_layer)
  assert set(stacked) == {"wte", "wpe", "ln_f", "lm_head", "h"}
  assert stacked["h"]["attn"]["c_attn"]["kernel"].shape == (2, 32, 96)
  assert stacked["h"]["mlp"]["c_fc"]["lora_a"].shape == (2, 32, 4)
  np.testing.assert_array_equal(stacked["h"]["ln_2"]["bias"][1], per_layer["h_1"]["ln_2"]["bias"])
  back = stacking.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(per_layer)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(per_layer)):
    np.testing.assert_array_equal(a, b)
  # A scanned model initialises exactly this layout.
  scanned_init = jax.eval_shape(lambda: gpt2_model.GPT2(CONFIG.replace(scan_layers=True)).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
  assert jax.tree.map(jnp.shape, scanned_init) == jax.tree.map(jnp.shape, stacking.stack_layers(
      gpt2_model.init_params(CONFIG, jax.random.PRNGKey(0))))


def test_scanned_equals_unrolled_loss_and_gradients(per_layer, batch):
  dtype = "bfloat16"  # the recipes' compute and base dtype
  cfg = CONFIG.replace(dtype=dtype, param_dtype=dtype)
  params = jax.tree.map(lambda x: x.astype(dtype) if x.ndim and x.dtype == jnp.float32 else x, per_layer)
  adapters, base = lora.split(params, lora.labels(params, LORA))
  unrolled = lora.make_model(cfg, LORA)
  scanned = lora.make_model(cfg.replace(scan_layers=True, remat="dots"), LORA)

  def loss(model, stack):
    def f(tr):
      tree = lora.combine(tr, stacking.stack_layers(base) if stack else base)
      return train.token_loss_sums(model, tree, batch, None, True)[0]
    return f
  # Same math; scan and remat fuse differently, so bf16 rounding differs (~2^-8 relative).
  tol = 2e-2
  lu, gu = jax.jit(jax.value_and_grad(loss(unrolled, False)))(adapters)
  ls, gs = jax.jit(jax.value_and_grad(loss(scanned, True)))(stacking.stack_layers(adapters))
  np.testing.assert_allclose(ls, lu, rtol=tol)
  gs = stacking.unstack_layers(gs)
  assert jax.tree.structure(gs) == jax.tree.structure(gu)
  flat_s = traverse_util.flatten_dict(gs)
  for path, b in traverse_util.flatten_dict(gu).items():
    a, b = np.asarray(flat_s[path], np.float32), np.asarray(b, np.float32)
    assert np.max(np.abs(a - b)) <= tol * np.max(np.abs(b)), path


def test_scanned_greedy_decoding_with_kv_cache_equals_unrolled(per_layer):
  prompts = np.random.RandomState(3).randint(0, VOCAB, (2, 5)).astype(np.int32)
  mask = np.ones_like(prompts)
  mask[1, :2] = 0  # a left-padded row
  run = lambda cfg, p: sample.generate_tokens(lora.make_model(cfg, LORA), p, prompts, mask,
                                              max_new_tokens=6, eos_id=None)["tokens"]
  np.testing.assert_array_equal(run(CONFIG.replace(scan_layers=True), stacking.stack_layers(per_layer)),
                                run(CONFIG, per_layer))


def test_hf_export_and_peft_both_ways_from_a_scanned_tree(per_layer, tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  scanned_cfg = CONFIG.replace(scan_layers=True)
  stacked = stacking.stack_layers(per_layer)
  ids = np.random.RandomState(4).randint(0, VOCAB, (2, 12))
  ours = lambda p, cfg=scanned_cfg: np.asarray(lora.make_model(cfg, LORA).apply({"params": p}, jnp.asarray(ids)))
  torch_logits = lambda m: m(torch.tensor(ids)).logits.detach().numpy()
  factored = ours(stacked)

  # Merge (stacked in, stacked out) and export per layer: transformers gives the factored logits.
  merged, merged_cfg = lora.merge(stacked, LORA, scanned_cfg)
  assert stacking.is_stacked(merged) and not merged_cfg.tie_word_embeddings
  weights.save_pretrained(merged, merged_cfg, str(tmp_path / "merged"))
  hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "merged")).eval()
  np.testing.assert_allclose(torch_logits(hf), factored, atol=2e-4)

  # Adapters saved from the stacked tree run in PEFT on the exported base.
  base_only = {k: v for k, v in traverse_util.flatten_dict(stacked).items() if k[-1] not in lora.ADAPTER_LEAVES}
  weights.save_pretrained(traverse_util.unflatten_dict(base_only), scanned_cfg, str(tmp_path / "base"))
  lora.save_peft(stacked, LORA, str(tmp_path / "adapter"))
  peft_model = peft.PeftModel.from_pretrained(
      transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "base")), str(tmp_path / "adapter")).eval()
  np.testing.assert_allclose(torch_logits(peft_model), factored, atol=2e-4)

  # And back: PEFT's adapters loaded into a stacked base give PEFT's logits.
  torch.manual_seed(5)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_" in name:
        p.normal_(0.0, 0.1)
  peft_model.save_pretrained(str(tmp_path / "adapter2"))
  loaded, cfg = lora.load_peft(traverse_util.unflatten_dict(base_only), str(tmp_path / "adapter2"))
  assert stacking.is_stacked(loaded) and loaded["h"]["attn"]["c_attn"]["lora_a"].shape == (2, 32, 4)
  np.testing.assert_allclose(ours(loaded), torch_logits(peft_model), atol=2e-4)


def test_stacked_shardings_split_the_per_layer_dimensions(per_layer):
  mesh = sharding.make_mesh(2, 4)
  flat_u = traverse_util.flatten_dict(sharding.param_specs(per_layer, mesh), sep="/")
  flat_s = traverse_util.flatten_dict(sharding.param_specs(stacking.stack_layers(per_layer), mesh), sep="/")
  assert flat_s["h/attn/c_attn/kernel"] == P(None, "fsdp")  # (L, D, 3D): D split, never L
  assert flat_s["h/mlp/c_proj/lora_b"] == P(None, None, "fsdp")  # (L, r, D): out split
  for path, spec in flat_s.items():
    if path.startswith("h/"):
      assert spec == P(*((None,) + tuple(flat_u["h_1/" + path[2:]]))) or (spec == P() and flat_u["h_1/" + path[2:]] == P()), path
    else:
      assert spec == flat_u[path], path


def test_scanned_run_trains_like_unrolled_on_a_mesh_and_checkpoints(tmp_path):
  """experiment.build with model.scan_layers: one sharded train step equals the unrolled one; the
  stacked state saves, restores, and an unrolled run refuses it by name."""
  from conftest import TINY_CONFIG
  import importlib.util
  from gpt2_lora_jax import experiment
  spec = importlib.util.spec_from_file_location("tiny_config", TINY_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  def build(scan):
    c = module.get_config()
    c.model.scan_layers = scan
    c.lora.dropout = 0.0
    c.optim.warmup_steps = 0
    c.model.overrides.vocab_size = VOCAB
    return experiment.build(c)
  rng = np.random.RandomState(1)
  ids = rng.randint(0, VOCAB, (8, 16)).astype(np.int32)
  batch = {"inputs": ids, "targets": np.roll(ids, -1, 1), "loss_mask": (rng.rand(8, 16) < 0.8).astype(np.float32),
           "segment_ids": np.ones((8, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}
  mesh = sharding.make_mesh(2, 4)
  out = {}
  for scan in (False, True):
    exp = build(scan)
    tx, schedule = experiment.optimizer(exp)
    state, frozen, state_sh, frozen_sh = train.init_state(exp.params, exp.labels, 0, mesh, tx)
    step = train.jit_train_step(exp.model, exp.labels, 1, tx, schedule, mesh, state_sh, frozen_sh)
    new_state, metrics = step(state, frozen, sharding.global_batch(batch, mesh))
    out[scan] = (float(metrics["loss"]),
                 traverse_util.flatten_dict(stacking.unstack_layers(jax.device_get(new_state["trainable"]))))
  assert stacking.is_stacked(exp.params) and exp.gpt2_config.scan_layers
  np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-6)
  assert set(out[True][1]) == set(out[False][1])
  for path, b in out[False][1].items():
    # Adam's first step is ~lr * sign(g): 1e-5 is 0.1% of the step of lr 1e-2.
    np.testing.assert_allclose(out[True][1][path], b, rtol=0, atol=1e-5, err_msg=str(path))

  mngr = checkpoint.manager(str(tmp_path), async_save=False)
  checkpoint.save(mngr, 1, new_state, exp.meta)
  restored = checkpoint.restore(mngr, 1, checkpoint.abstract_like(new_state), exp.meta)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(new_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(checkpoint.CheckpointMismatchError, match="scan_layers=True"):
    checkpoint.check_meta(checkpoint.read_meta(mngr, 1), build(False).meta, "here")


def test_layer_subset_targets_cannot_be_stacked(per_layer):
  base = gpt2_model.init_params(CONFIG, jax.random.PRNGKey(0))
  some = lora.add(base, lora.LoraConfig(rank=2, targets=("h_0/attn/c_attn",)), jax.random.PRNGKey(1))
  with pytest.raises(ValueError, match="every block must hold the same leaves.*scan_layers=False"):
    stacking.stack_layers(some)
  cfg = lora.LoraConfig(rank=2, targets=("c_attn",), extra_trainable=("h_1/ln_1",))
  labels = lora.labels(lora.add(base, cfg, jax.random.PRNGKey(1)), cfg)
  with pytest.raises(ValueError, match="label h/ln_1/(bias|scale) alike.*trainable. in h_1"):
    stacking.stack_layers(labels)
