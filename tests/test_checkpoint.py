"""checkpoint.py's records: the base fingerprint ignores the storage dtype, and resuming refuses a
checkpoint whose run settings (experiment.run_settings) differ, naming each change."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_lora_jax import checkpoint, experiment
from gpt2_lora_jax import model as gpt2_model
from test_train import tiny_config


def test_base_fingerprint_is_the_same_for_float32_and_bfloat16_copies():
  config = gpt2_model.GPT2Config(vocab_size=300, n_positions=16, n_embd=32, n_layer=2, n_head=4)
  shapes = gpt2_model.param_shapes(config)
  random_base = lambda seed: jax.tree.map(
      lambda s, r=np.random.RandomState(seed): r.normal(0, 0.2, s.shape).astype(np.float32), shapes)
  base = random_base(0)
  as_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
  assert checkpoint.base_fingerprint(as_bf16) == checkpoint.base_fingerprint(base)
  # Another base is still another base: other values, or one leaf moved by 1%.
  other = random_base(1)
  assert checkpoint.base_fingerprint(other) != checkpoint.base_fingerprint(base)
  nudged = {**base, "ln_f": {**base["ln_f"], "scale": base["ln_f"]["scale"] * 1.01}}
  assert checkpoint.base_fingerprint(nudged) != checkpoint.base_fingerprint(base)


def _meta(config, **kw):
  return {"meta_version": checkpoint.META_VERSION, "base_name": "b", "base_fingerprint": "f",
          "gpt2_config": {}, "lora": {}, "layout": {}, "run": experiment.run_settings(config), **kw}


def test_resume_refuses_changed_run_settings_in_one_error_naming_each():
  saved = _meta(tiny_config())
  changed = _meta(tiny_config(**{"optim.lr": 0.02, "train.steps": 30, "data.max_length": 32,
                                 "data.packing": False, "data.demo_rows": 100}))
  with pytest.raises(checkpoint.CheckpointMismatchError) as error:
    checkpoint.check_run(saved, changed, "ckpt/12", allow_changed=False)
  message = str(error.value)
  assert message.count(" -> ") == 5, message
  for change in ("optim.lr: 0.01 -> 0.02", "train.steps: 12 -> 30", "data.max_length: 64 -> 32",
                 "data.packing: true -> false", "data.demo_rows: 400 -> 100"):
    assert change in message, (change, message)
  assert "--config.train.allow_changed_config=True" in message and "ckpt/12" in message
  notes = checkpoint.check_run(saved, changed, "ckpt/12", allow_changed=True)
  assert len(notes) == 1 and "train.steps: 12 -> 30" in notes[0]
  # What does not shape the trajectory may change freely: accumulation, mesh, cadences, eval data.
  same = _meta(tiny_config(**{"train.micro_batches": 4, "mesh.fsdp": 2, "train.ckpt_every": 1,
                              "train.eval_every": 0, "data.max_eval_rows": 8, "data.eval_split": "x"}))
  assert checkpoint.check_run(saved, same, "ckpt/12", allow_changed=False) == []


def test_checkpoints_from_before_the_records_are_refused_unless_allowed():
  """A version-1 checkpoint: no run settings, and a fingerprint that hashed the storage dtype."""
  expected = _meta(tiny_config())
  old = {k: v for k, v in expected.items() if k not in ("run", "meta_version")} | {"base_fingerprint": "old"}
  with pytest.raises(checkpoint.CheckpointMismatchError, match=re.escape(
      "records no run settings") + ".*--config.train.allow_changed_config=True"):
    checkpoint.check_run(old, expected, "ckpt/7", allow_changed=False)
  assert "records no run settings" in checkpoint.check_run(old, expected, "ckpt/7", allow_changed=True)[0]
  # Its base is checked by name (its fingerprint cannot be compared): a note, or an error on another name.
  notes = checkpoint.check_meta(old, expected, "ckpt/7")
  assert len(notes) == 1 and "checked by name" in notes[0]
  with pytest.raises(checkpoint.CheckpointMismatchError, match="trained on base 'gpt2-medium'"):
    checkpoint.check_meta(old | {"base_name": "gpt2-medium"}, expected, "ckpt/7")
  # A current checkpoint with another fingerprint is refused as before.
  with pytest.raises(checkpoint.CheckpointMismatchError, match="fingerprint"):
    checkpoint.check_meta(expected | {"base_fingerprint": "g"}, expected, "ckpt/7")
