"""LoRA adapters <-> Hugging Face PEFT, both ways, checked against the real `peft` package on CPU torch.

Each case builds a random-weight GPT-2 with transformers, loads it here with weights.load_pretrained,
and compares logits: adapters saved here run in peft.PeftModel, adapters saved by PEFT run here.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import make_hf_gpt2
from gpt2_lora_jax import lora, weights

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 256
TARGET_SETS = [("c_attn", "c_proj", "c_fc"), ("c_attn", "c_proj", "c_fc", "lm_head"), ("attn/c_proj",)]
PEFT_KEY = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("peft_base"))
  make_hf_gpt2(d, vocab_size=VOCAB)
  return d


@pytest.fixture(scope="module")
def base(base_dir):
  return weights.load_pretrained(base_dir)


@pytest.fixture(scope="module")
def ids():
  return np.random.default_rng(0).integers(0, VOCAB, (2, 16))


def _torch_logits(torch_model, ids):
  with torch.no_grad():
    return torch_model(torch.tensor(ids)).logits.numpy()


def _jax_logits(config, lora_cfg, params, ids):
  return np.asarray(lora.make_model(config, lora_cfg).apply({"params": params}, jnp.asarray(ids)))


def _peft_model(base_dir, **lora_kw):
  """A PEFT LoRA model on the saved base, with random (non-zero) lora_B so adapters matter."""
  torch.manual_seed(1)
  model = transformers.GPT2LMHeadModel.from_pretrained(base_dir)
  peft_model = peft.get_peft_model(model, peft.LoraConfig(fan_in_fan_out=True, **lora_kw)).eval()
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.05)
  return peft_model


@pytest.mark.parametrize("targets", TARGET_SETS)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapters_saved_here_load_in_peft(base_dir, base, ids, tmp_path, targets, use_rslora):
  config, params = base
  lora_cfg = lora.LoraConfig(rank=4, alpha=8, targets=targets, use_rslora=use_rslora)
  tuned = lora.add(params, lora_cfg, jax.random.PRNGKey(0))
  flat = traverse_util.flatten_dict(tuned)
  keys = iter(jax.random.split(jax.random.PRNGKey(1), len(flat)))
  tuned = traverse_util.unflatten_dict({
      p: (0.05 * jax.random.normal(next(keys), v.shape) if p[-1] == "lora_b" else v)
      for p, v in flat.items()})
  jax_logits = _jax_logits(config, lora_cfg, tuned, ids)

  adapter_dir = lora.save_peft(tuned, lora_cfg, str(tmp_path / "adapter"), base_model_name_or_path=base_dir)
  torch_base = transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval()
  base_logits = _torch_logits(torch_base, ids)
  peft_model = peft.PeftModel.from_pretrained(torch_base, adapter_dir).eval()
  peft_logits = _torch_logits(peft_model, ids)
  assert np.abs(peft_logits - base_logits).max() > 1e-3  # PEFT did apply the adapters
  assert np.abs(peft_logits - jax_logits).max() <= 1e-4

  # Round trip here: the same tree and an equivalent config.
  loaded, loaded_cfg = lora.load_peft(params, adapter_dir)
  jax.tree.map(np.testing.assert_array_equal, loaded, tuned)
  assert (loaded_cfg.rank, loaded_cfg.alpha, loaded_cfg.use_rslora) == (4, 8.0, use_rslora)
  assert lora.target_modules(params, loaded_cfg) == lora.target_modules(params, lora_cfg)


@pytest.mark.parametrize("targets", TARGET_SETS[:2])
def test_peft_adapters_load_here(base_dir, base, ids, tmp_path, targets):
  config, params = base
  peft_model = _peft_model(base_dir, r=4, lora_alpha=8, target_modules=list(targets))
  peft_logits = _torch_logits(peft_model, ids)
  peft_model.save_pretrained(str(tmp_path / "adapter"))

  tuned, lora_cfg = lora.load_peft(params, str(tmp_path / "adapter"))
  assert (lora_cfg.rank, lora_cfg.alpha) == (4, 8.0)
  assert sorted(lora_cfg.targets) == sorted(targets)
  jax_logits = _jax_logits(config, lora_cfg, tuned, ids)
  assert np.abs(jax_logits - peft_logits).max() <= 1e-4
  # Same tree structure as adding adapters here: base paths unchanged, adapters beside the kernels.
  assert set(traverse_util.flatten_dict(tuned)) == set(traverse_util.flatten_dict(
      lora.add(params, lora_cfg, jax.random.PRNGKey(0))))


def test_summary_line_matches_peft(base_dir, base, capsys):
  _, params = base
  lora_cfg = lora.LoraConfig(rank=1, alpha=1, targets=("c_attn", "c_proj", "c_fc", "lm_head"))  # the study
  tuned = lora.add(params, lora_cfg, jax.random.PRNGKey(0))
  peft_model = _peft_model(base_dir, r=1, lora_alpha=1, target_modules=list(lora_cfg.targets))
  capsys.readouterr()
  peft_model.print_trainable_parameters()
  assert capsys.readouterr().out.strip() == lora.summary(tuned, lora.labels(tuned, lora_cfg))


def _export(params, tmp_path, name="adapter", targets=("c_attn", "c_proj", "c_fc")):
  cfg = lora.LoraConfig(rank=4, alpha=8, targets=targets)
  return lora.save_peft(lora.add(params, cfg, jax.random.PRNGKey(0)), cfg, str(tmp_path / name))


def _rewrite(adapter_dir, edit_tensors=None, edit_config=None):
  from safetensors.numpy import load_file, save_file
  path = os.path.join(adapter_dir, lora.PEFT_WEIGHTS_FILE)
  if edit_tensors:
    save_file(edit_tensors(load_file(path)), path)
  if edit_config:
    config_path = os.path.join(adapter_dir, lora.PEFT_CONFIG_FILE)
    with open(config_path) as f:
      pc = json.load(f)
    edit_config(pc)
    with open(config_path, "w") as f:
      json.dump(pc, f)


def _assert_refused(params, adapter_dir, match):
  before = traverse_util.flatten_dict(params)
  with pytest.raises(ValueError, match=match):
    lora.load_peft(params, adapter_dir)
  assert traverse_util.flatten_dict(params) == before  # nothing half-applied


def test_adapter_for_another_base_is_refused_naming_the_tensor(base, tmp_path):
  _, params = base
  # A real PEFT adapter for a narrower GPT-2 (n_embd 32): every shape differs.
  other_dir = str(tmp_path / "other_base")
  make_hf_gpt2(other_dir, vocab_size=VOCAB, n_embd=32)
  narrow = _peft_model(other_dir, r=4, lora_alpha=8, target_modules=["c_attn"])
  narrow.save_pretrained(str(tmp_path / "narrow"))
  _assert_refused(params, str(tmp_path / "narrow"), rf"{PEFT_KEY}: shape \(4, 32\).*needs \(4, 64\)")

  # An adapter for a deeper GPT-2: block 5 does not exist here.
  deeper = _export(params, tmp_path, "deeper")
  _rewrite(deeper, lambda t: {k.replace(".h.1.", ".h.5."): v for k, v in t.items()})
  _assert_refused(params, deeper, r"transformer\.h\.5\.attn\.c_attn\.lora_A\.weight: no such LoRA module")

  # Half a pair.
  half = _export(params, tmp_path, "half")
  _rewrite(half, lambda t: {k: v for k, v in t.items() if k != PEFT_KEY})
  _assert_refused(params, half, rf"{PEFT_KEY}: missing")

  # A head adapter whose saved base head is not this model's embedding.
  head = _export(params, tmp_path, "head", targets=("lm_head",))
  not_wte = np.ones((VOCAB, 64), np.float32)
  _rewrite(head, lambda t: {**t, "base_model.model.lm_head.base_layer.weight": not_wte})
  _assert_refused(params, head, r"lm_head\.base_layer\.weight: the adapter's base head differs")


def test_unsupported_peft_features_are_refused_naming_the_field(base, tmp_path):
  _, params = base
  dora = _export(params, tmp_path, "dora")
  _rewrite(dora, edit_config=lambda pc: pc.update(use_dora=True))
  _assert_refused(params, dora, "use_dora=True")
  per_module = _export(params, tmp_path, "rank_pattern")
  _rewrite(per_module, edit_config=lambda pc: pc.update(rank_pattern={"c_fc": 8}))
  _assert_refused(params, per_module, "rank_pattern")
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    lora.load_peft(params, str(tmp_path / "nowhere"))
  tuned = lora.load_peft(params, _export(params, tmp_path, "ok"))[0]
  with pytest.raises(ValueError, match="already hold LoRA adapters"):
    lora.load_peft(tuned, str(tmp_path / "ok"))


def test_merge_and_export_on_a_bf16_base_keep_a_small_update(base_dir, ids, tmp_path):
  """W + s A B in fp32 (checked against float64 numpy); transformers runs the export as trained."""
  from safetensors.numpy import load_file
  config, params = weights.load_pretrained(base_dir, dtype="bfloat16")
  lora_cfg = lora.LoraConfig(rank=4, alpha=8, targets=("c_attn", "lm_head"))
  tuned = lora.add(params, lora_cfg, jax.random.PRNGKey(0))
  flat = traverse_util.flatten_dict(tuned)
  keys = iter(jax.random.split(jax.random.PRNGKey(1), len(flat)))
  tuned = traverse_util.unflatten_dict({  # a small update, as after a few hundred steps
      p: (1e-4 * jax.random.normal(next(keys), v.shape) if p[-1] == "lora_b" else v)
      for p, v in flat.items()})
  merged, merged_config = lora.merge(tuned, lora_cfg, config)
  exported = load_file(os.path.join(weights.save_pretrained(merged, merged_config, str(tmp_path / "m")),
                                    "model.safetensors"))
  s = lora.scale(lora_cfg)
  for module, base_w, hf_key in ((("h_0", "attn", "c_attn"), params["h_0"]["attn"]["c_attn"]["kernel"],
                                  "transformer.h.0.attn.c_attn.weight"),
                                 (("lm_head",), params["wte"]["embedding"].T, "lm_head.weight")):
    node = tuned
    for name in module:
      node = node[name]
    w64 = np.asarray(base_w, np.float64)
    delta64 = s * np.asarray(node["lora_a"], np.float64) @ np.asarray(node["lora_b"], np.float64)
    want = w64 + delta64
    got = traverse_util.flatten_dict(merged)[module + ("kernel",)]
    assert got.dtype == jnp.float32
    # Only fp32 rounding of the sum: measured at most 3.0e-9 (c_attn) and 3.7e-9 (lm_head).
    assert np.abs(np.asarray(got, np.float64) - want).max() <= 1e-8
    # Why fp32: rounded to bf16, 68% (c_attn) and 70% (lm_head) of these weights would not move.
    assert np.mean(np.asarray(jnp.asarray(want, jnp.bfloat16), np.float64) == w64) > 0.6
    written = exported[hf_key].T if hf_key == "lm_head.weight" else exported[hf_key]
    assert written.dtype == np.float32
    np.testing.assert_array_equal(written, np.asarray(got))
  hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "m")).eval()
  np.testing.assert_allclose(_torch_logits(hf, ids), _jax_logits(config, lora_cfg, tuned, ids),
                             atol=1e-5, rtol=0)
