"""DPO starts exactly at its reference and resumes only against the reference it began with.

A bf16 base with bf16 compute and lora.dropout=0.05 (the default of default_config and
configs/gpt2_hh.py): the first DPO step from SFT adapters must give loss log 2 and margin 0, on 1, 4
and 8 devices, with micro-batches and scanned, rematerialised blocks (configs/dpo_hh.py's layout).
"""
import math
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import REPO
from gpt2_lora_jax import checkpoint, dpo, evaluate, experiment, lora, preference, sharding, study, train
from gpt2_lora_jax.errors import UserError

BF16 = {"model.dtype": "bfloat16", "model.base_param_dtype": "bfloat16", "lora.dropout": 0.05}


def tiny_dpo_config(**overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny_dpo", REPO / "configs" / "tiny_dpo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for key, value in {**BF16, **overrides}.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def metrics(workdir):
  from gpt2_lora_jax import metrics as metrics_lib
  return metrics_lib.read(os.path.join(workdir, "metrics.jsonl"))


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
  """2 SFT steps of configs/tiny_dpo.py (bf16, dropout 0.05) on the 8 CPU devices: adapters off B = 0."""
  workdir = str(tmp_path_factory.mktemp("sft"))
  train.run(experiment.build(tiny_dpo_config(**{
      "train.steps": 2, "train.eval_every": 0, "train.ckpt_every": 2, "train.plot_every": 0,
      "optim.warmup_steps": 0})), workdir)
  return workdir


def dpo_settings(sft, **more):
  return tiny_dpo_config(**{"dpo.init_from": sft, "train.steps": 1, "train.eval_every": 1, "optim.warmup_steps": 0,
                            "train.ckpt_every": 1, "train.plot_every": 0, **more})


@pytest.fixture(scope="module")
def dpo_run(sft_dir, tmp_path_factory):
  """One DPO step through train.run with remat 'auto', as configs/dpo_hh.py runs it (the DPO loss
  compiled per policy through its objective's loss_fn_for; on this CPU the first, 'none', fits)."""
  workdir = str(tmp_path_factory.mktemp("dpo"))
  study.train_dpo(dpo_settings(sft_dir, **{"model.remat": "auto"}), workdir)
  return workdir


def test_first_dpo_step_is_exactly_at_the_reference_on_eight_devices(dpo_run, capfd):
  """train.run on the conftest's 8 devices, bf16, lora.dropout=0.05 (which the forward ignores).
  Before, the policy forward dropped adapter inputs and the reference was another program: this
  test measured a first-step loss of log 2 + 0.0048 there."""
  rs = metrics(dpo_run)
  first = [r for r in rs if r["split"] == "train"][0]
  held_out = [r for r in rs if r["split"] == "eval" and r["step"] == 0][0]
  for r in (first, held_out):
    assert abs(r["loss"] - math.log(2)) <= 1e-6, r["loss"] - math.log(2)
    assert r["margin"] == 0.0 and r["reward_chosen"] == 0.0 and r["reward_rejected"] == 0.0
    assert r["logp_chosen"] == r["ref_logp_chosen"] and r["logp_rejected"] == r["ref_logp_rejected"]
    assert r["accuracy"] == 0.5  # every pair tied: each counts half
    assert r["logits_chosen"] != 0.0 and r["logits_rejected"] != 0.0


@pytest.mark.parametrize("devices,micro_batches,scan", [(1, 2, False), (4, 2, True)])
def test_first_step_exact_on_one_and_four_devices_with_micro_batches_and_scanned_blocks(
    sft_dir, devices, micro_batches, scan):
  """The train step of train.run (its frozen tree with the reference, jit_train_step) on a 1- and a
  4-device mesh; 4 devices with configs/dpo_hh.py's scanned blocks and remat 'dots' (one of the
  policies its remat 'auto' may take)."""
  config = dpo_settings(sft_dir, **{"model.scan_layers": scan, "model.remat": "dots" if scan else "none",
                                    "train.micro_batches": micro_batches, "train.batch_size": 16})
  config = study.dpo_config(config, sft_dir)
  exp = experiment.build(config)
  if scan:  # the SFT run's leaves are per layer: a scanned run restores them stacked
    from gpt2_lora_jax import stacking
    per_layer = experiment.build(dpo_settings(sft_dir))
    params, _ = dpo.init_adapters(per_layer, sft_dir)
    exp.params = stacking.stack_layers(params)
  else:
    dpo.start(exp, "/nonexistent-dpo-workdir")
  start_trainable, _ = lora.split(exp.params, exp.labels)
  assert any(np.abs(np.asarray(v)).max() > 0 for k, v in
             jax.tree_util.tree_leaves_with_path(start_trainable) if "lora_b" in jax.tree_util.keystr(k))
  mesh = sharding.make_mesh(devices, 1, jax.devices()[:devices])
  tx, schedule = experiment.optimizer(exp)
  state, frozen, state_sh, frozen_sh = train.init_state(exp.params, exp.labels, 0, mesh, tx)
  obj = dpo.objective(exp, None)
  frozen, frozen_sh = train.frozen_for_step(state, frozen, state_sh, frozen_sh, obj.initial_copy_key)
  step = train.jit_train_step(exp.model, exp.labels, micro_batches, tx, schedule, mesh, state_sh, frozen_sh,
                              obj.loss_fn)
  pairs, _ = preference.build(config.data, exp.tokenizer, "train", config.train.batch_size, None, log=None)
  batch = sharding.global_batch(preference.batch_for_step(pairs, 0, 0, config.train.batch_size), mesh)
  _, m = jax.device_get(step(state, frozen, batch))
  # Measured: loss - log 2 = 1.9e-9 (float32 log 2) and margin 0 on both meshes (bf16 base and compute).
  assert abs(float(m["loss"]) - math.log(2)) <= 1e-6 and float(m["margin"]) == 0.0
  assert float(m["logp_chosen"]) == float(m["ref_logp_chosen"]) and float(m["accuracy"]) == 0.5
  assert float(m["grad_norm"]) > 0  # the policy half is differentiated


def test_resume_refuses_changed_dpo_settings_and_keeps_its_reference(sft_dir, tmp_path):
  """A DPO checkpoint records dpo.* and its reference (init_from's checkpoints dir, step 2, a
  fingerprint of its adapters). Resuming with dpo.beta changed is refused by name; after the SFT run
  moves on to step 4, resuming reloads step 2 (a fresh DPO run takes step 4); with step 2 gone,
  resuming is refused. Before, the beta change continued silently and the reference was rebuilt
  from whatever init_from's latest checkpoint was."""
  sft, workdir = str(tmp_path / "sft"), str(tmp_path / "dpo")
  shutil.copytree(sft_dir, sft)
  study.train_dpo(dpo_settings(sft), workdir)
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"dpo\.beta: 0\.5 -> 0\.9"):
    study.train_dpo(dpo_settings(sft, **{"dpo.beta": 0.9, "train.steps": 2}), workdir)
  saved = checkpoint.latest_meta(workdir)[1]["run"]
  assert saved["dpo.beta"] == 0.5 and saved["dpo.reference_step"] == 2
  assert saved["dpo.init_from"] == os.path.join(sft, "checkpoints")

  train.run(experiment.build(tiny_dpo_config(**{  # the SFT run moves on: its latest step is 4
      "train.steps": 4, "train.eval_every": 0, "train.ckpt_every": 2, "train.plot_every": 0,
      "optim.warmup_steps": 0, "train.allow_changed_config": True})), sft)
  fresh = experiment.build(study.dpo_config(dpo_settings(sft), sft))
  dpo.start(fresh, str(tmp_path / "fresh"))
  assert fresh.meta["run"]["dpo.reference_step"] == 4
  longer = {"train.steps": 2, "train.allow_changed_config": True}  # one more step
  assert study.train_dpo(dpo_settings(sft, **longer), workdir)["step"] == 2
  resumed = experiment.build(study.dpo_config(dpo_settings(sft, **longer), sft))
  dpo.start(resumed, workdir)
  assert checkpoint.latest_meta(workdir)[1]["run"]["dpo.reference_step"] == 2
  want, _ = evaluate.restore_finetuned(resumed, sft, 2)  # through evaluation's Orbax path
  jax.tree.map(np.testing.assert_array_equal, lora.split(resumed.params, resumed.labels)[0],
               lora.split(jax.device_get(want), resumed.labels)[0])

  shutil.rmtree(os.path.join(sft, "checkpoints", "2"))
  with pytest.raises(UserError, match=r"trained against step 2 of it, which is gone"):
    study.train_dpo(dpo_settings(sft, **{"train.steps": 3}), workdir)
