"""Loading Hugging Face checkpoints (every tensor checked) and exporting back to transformers."""
import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import jax.numpy as jnp
from conftest import randomize_all_params
from gpt2_lora_jax import hub, model as gpt2_model, weights


def _logits(hf, ids):
  with torch.no_grad():
    return hf(torch.tensor(ids)).logits.numpy()


def test_load_export_roundtrip_through_transformers(tiny_hf_dir, tmp_path):
  config, params = weights.load_pretrained(tiny_hf_dir)
  out = weights.save_pretrained(params, config, str(tmp_path / "export"))
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  original = transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
  ids = np.random.RandomState(0).randint(0, 50257, (2, 16))
  ours = np.asarray(gpt2_model.GPT2(config).apply({"params": params}, jnp.asarray(ids)))
  np.testing.assert_allclose(_logits(reloaded, ids), _logits(original, ids), atol=1e-5, rtol=0)
  np.testing.assert_allclose(ours, _logits(original, ids), atol=1e-4, rtol=0)


def test_untied_head_roundtrip(tmp_path):
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=4, n_positions=32,
                                tie_word_embeddings=False)
  hf = randomize_all_params(transformers.GPT2LMHeadModel(cfg)).eval()
  hf.save_pretrained(tmp_path / "untied")
  config, params = weights.load_pretrained(str(tmp_path / "untied"))
  assert not config.tie_word_embeddings and params["lm_head"]["kernel"].shape == (32, 300)
  ids = np.random.RandomState(1).randint(0, 300, (1, 10))
  ours = np.asarray(gpt2_model.GPT2(config).apply({"params": params}, jnp.asarray(ids)))
  np.testing.assert_allclose(ours, _logits(hf, ids), atol=1e-4, rtol=0)
  out = weights.save_pretrained(params, config, str(tmp_path / "export"))
  np.testing.assert_allclose(_logits(transformers.GPT2LMHeadModel.from_pretrained(out).eval(), ids),
                             _logits(hf, ids), atol=1e-5, rtol=0)


def test_pytorch_bin_checkpoint_loads(tiny_hf_dir, tmp_path):
  state = load_file(os.path.join(tiny_hf_dir, "model.safetensors"))
  d = tmp_path / "bin"
  d.mkdir()
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, d / "pytorch_model.bin")
  (d / "config.json").write_text(open(os.path.join(tiny_hf_dir, "config.json")).read())
  config, params = weights.load_pretrained(str(d))
  _, want = weights.load_pretrained(tiny_hf_dir)
  np.testing.assert_array_equal(params["h_1"]["mlp"]["c_fc"]["kernel"], want["h_1"]["mlp"]["c_fc"]["kernel"])


def _tampered(tiny_hf_dir, tmp_path, edit):
  state = load_file(os.path.join(tiny_hf_dir, "model.safetensors"))
  edit(state)
  d = tmp_path / "tampered"
  d.mkdir()
  save_file(state, str(d / "model.safetensors"))
  (d / "config.json").write_text(open(os.path.join(tiny_hf_dir, "config.json")).read())
  return str(d)


def test_missing_tensor_is_named(tiny_hf_dir, tmp_path):
  d = _tampered(tiny_hf_dir, tmp_path, lambda s: s.pop("transformer.h.1.attn.c_proj.weight"))
  with pytest.raises(weights.CheckpointMismatchError, match=r"missing tensors: transformer\.h\.1\.attn\.c_proj\.weight"):
    weights.load_pretrained(d)


def test_wrong_shape_and_unexpected_tensor_are_named(tiny_hf_dir, tmp_path):
  def edit(s):
    s["transformer.h.0.mlp.c_fc.weight"] = s["transformer.h.0.mlp.c_fc.weight"][:, :10].copy()
    s["transformer.h.7.mlp.c_fc.weight"] = np.zeros((2, 2), np.float32)
  d = _tampered(tiny_hf_dir, tmp_path, edit)
  with pytest.raises(weights.CheckpointMismatchError) as err:
    weights.load_pretrained(d)
  msg = str(err.value)
  assert "transformer.h.0.mlp.c_fc.weight: checkpoint (64, 10), config needs (64, 256)" in msg
  assert "unexpected tensors: transformer.h.7.mlp.c_fc.weight" in msg


def test_missing_local_dir_and_unreachable_hub_name_the_flag(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="--config.model.name"):
    weights.load_pretrained(str(tmp_path / "nowhere"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub cannot be reached, as on this machine
  with pytest.raises(hub.HubUnreachableError, match="--config.model.name"):
    weights.load_pretrained("openai-community/gpt2-not-cached")


def test_export_refuses_unmerged_adapters(tiny_hf_dir, tmp_path):
  config, params = weights.load_pretrained(tiny_hf_dir)
  params["h_0"]["attn"]["c_attn"]["lora_a"] = jnp.zeros((64, 2))
  with pytest.raises(ValueError, match="merge them first"):
    weights.save_pretrained(params, config, str(tmp_path / "x"))


def test_bf16_storage(tiny_hf_dir):
  config, params = weights.load_pretrained(tiny_hf_dir, dtype="bfloat16")
  assert params["wte"]["embedding"].dtype == jnp.bfloat16 and config.param_dtype == "bfloat16"
  json.dumps(config.to_hf_dict())


def test_random_params_draw_init_params_distributions_in_one_compile():
  """weights.random_params (the product's random init) against model.init_params (Flax's own
  initialisers): the same tree, shapes and dtypes; zeros and ones exactly; every normal leaf's mean
  and standard deviation within 6 standard errors of init_params' sample (other keys, same law);
  layers drawn apart; one compiled program whatever the depth."""
  import jax
  from flax import traverse_util
  config = gpt2_model.GPT2Config.preset("gpt2", n_layer=3, n_embd=64, n_head=4, n_positions=128,
                                        vocab_size=4096, param_dtype="bfloat16")
  got = traverse_util.flatten_dict(weights.random_params(config, seed=3))
  want = traverse_util.flatten_dict(jax.device_get(jax.jit(gpt2_model.init_params, static_argnums=0)(
      config, jax.random.PRNGKey(3))))
  assert set(got) == set(want)
  for path, w in want.items():
    g = got[path]
    assert isinstance(g, np.ndarray) and g.shape == w.shape and g.dtype == w.dtype, path
    g, w = np.asarray(g, np.float64).ravel(), np.asarray(w, np.float64).ravel()
    if path[-1] in ("bias", "scale"):
      np.testing.assert_array_equal(g, w)
      continue
    se = w.std() / np.sqrt(w.size)  # of the mean; the std's is about std / sqrt(2 n)
    assert abs(g.mean() - w.mean()) <= 6 * np.sqrt(2) * se, path
    assert abs(g.std() - w.std()) <= 6 * w.std() / np.sqrt(w.size), path
  kernel = lambda i: got[(f"h_{i}", "mlp", "c_fc", "kernel")]
  assert not np.array_equal(kernel(0), kernel(1)) and not np.array_equal(kernel(1), kernel(2))
  again = traverse_util.flatten_dict(weights.random_params(config, seed=3))
  assert all(np.array_equal(again[p], got[p]) for p in got)
  assert not np.array_equal(traverse_util.flatten_dict(weights.random_params(config, seed=4))[
      ("wte", "embedding")], got[("wte", "embedding")])

  compiles = []
  listener = lambda event, seconds, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    weights.random_params(config.replace(n_layer=4), seed=0)  # a new shape: compiled now
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(compiles) == 1
