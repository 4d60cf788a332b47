"""model.remat='auto' (remat.py, train.auto_remat_step): the policy against memory figures the test
computes itself, the one-line error and its computed suggestion, compile counts, and resume.

Each figure is a train step built here the way a run with a fixed policy builds it
(train.jit_train_step), compiled, and read from XLA's memory_analysis(): temporaries + arguments +
outputs - outputs aliased to donated arguments, per device. The budget reaches the product through
train.memory_limit_gib, a config value; nothing in jax is patched.
"""
import dataclasses
import os

import jax
import numpy as np
import pytest

from conftest import train_losses
from gpt2_lora_jax import experiment, lora, remat, sharding, train
from gpt2_lora_jax.bench.run_setup import compiled_programs
from gpt2_lora_jax.errors import UserError
from test_train import tiny_config

STEP = "jit(train_step)"  # the name XLA's compile event gives train.make_train_step's function


def config(**overrides):
  """configs/tiny.py with scanned blocks (on CPU only a scanned step's plan shrinks with remat,
  benchmarks/README.md), a constant learning rate (the schedule does not depend on train.steps) and
  nothing but training."""
  return tiny_config(**{"model.scan_layers": True, "model.remat": "auto", "optim.schedule": "constant",
                        "optim.warmup_steps": 0, "train.eval_every": 0, "train.plot_every": 0,
                        "train.ckpt_every": 2, **overrides})


@pytest.fixture(scope="module")
def exp():
  return experiment.build(config())


def sft_batch(mesh, rows: int, T: int):
  """The shapes and dtypes of packing.batch_for_step's batch, placed as train.run places it."""
  s = lambda dtype: jax.ShapeDtypeStruct((rows, T), dtype, sharding=sharding.batch_sharding(mesh))
  return {"inputs": s(np.int32), "targets": s(np.int32), "segment_ids": s(np.int32), "positions": s(np.int32),
          "loss_mask": s(np.float32)}


def figures(exp, mesh, micro_batches: int = 1, rows: int | None = None, policies=("none", "dots", "full")) -> dict:
  """policy -> bytes per device of the step train.run would run with that fixed policy."""
  tx, schedule = experiment.optimizer(exp)
  state, frozen, state_sh, frozen_sh = train.init_state(exp.params, exp.labels, 0, mesh, tx)
  batch = sft_batch(mesh, rows or exp.config.train.batch_size, exp.config.data.max_length)
  out = {}
  for policy in policies:
    model = lora.make_model(exp.gpt2_config.replace(remat=policy), exp.lora_config)
    step = train.jit_train_step(model, exp.labels, micro_batches, tx, schedule, mesh, state_sh, frozen_sh,
                                train.sft_loss(model))
    m = step.lower(state, frozen, batch).compile().memory_analysis()
    out[policy] = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  return out


def with_limit(exp, limit_bytes: float):
  c = exp.config.copy_and_resolve_references()
  c.train.memory_limit_gib = limit_bytes / 2 ** 30
  return dataclasses.replace(exp, config=c)


def auto_step(exp, mesh, log=None):
  """train.auto_remat_step on `mesh` for exp, as train.run calls it (the first batch's shapes)."""
  tx, schedule = experiment.optimizer(exp)
  state, frozen, state_sh, frozen_sh = train.init_state(exp.params, exp.labels, 0, mesh, tx)
  first = sft_batch(mesh, exp.config.train.batch_size, exp.config.data.max_length)
  return train.auto_remat_step(exp, train.sft_objective(exp, None), tx, schedule, mesh, state, state_sh,
                               frozen, frozen_sh, first, log)


def test_the_lightest_policy_that_fits_is_chosen_and_compiled_once(exp):
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  need = figures(exp, mesh)
  assert need["none"] > need["dots"] > need["full"], need  # the figures tell the policies apart
  for limit, chosen in ((need["none"], "none"), ((need["none"] + need["dots"]) / 2, "dots"),
                        (need["dots"] - 1, "full")):
    lines = []
    with compiled_programs() as programs:
      compiled = auto_step(with_limit(exp, limit), mesh, log=lambda line, **kw: lines.append(line))
    tried = ("none", "dots", "full")[:("none", "dots", "full").index(chosen) + 1]
    assert programs.count(STEP) == len(tried), programs  # the lighter ones, then the chosen: no recompile
    assert remat.step_bytes(compiled) == need[chosen]
    assert len(lines) == 1 and f"remat='auto': '{chosen}'" in lines[0], lines
    for policy in tried:
      assert f"{policy} {remat.size_text(need[policy])}" in lines[0], (policy, lines[0])


def test_a_step_that_fits_no_policy_gets_one_line_naming_what_fits(exp):
  """The suggestion is the fewest micro-batches whose 'full' step fits (figures computed here), and
  the batch of the same rows per pass at one micro-batch, with its own figure."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  need = figures(exp, mesh)
  halves = figures(exp, mesh, micro_batches=2, policies=("full",))
  half_batch = figures(exp, mesh, rows=exp.config.train.batch_size // 2, policies=("full",))
  limit = (need["full"] + halves["full"]) / 2
  assert halves["full"] < limit < need["full"]
  with pytest.raises(UserError) as raised:
    auto_step(with_limit(exp, limit), mesh)
  message = str(raised.value)
  assert "\n" not in message
  for policy in ("none", "dots", "full"):
    assert f"{policy} {remat.size_text(need[policy])}" in message, (policy, message)
  assert f"train.micro_batches=2 fits ('full' {remat.size_text(halves['full'])})" in message, message
  verdict = "fits" if half_batch["full"] <= limit else "does not fit"
  assert f"train.batch_size=4 {verdict} ('full' {remat.size_text(half_batch['full'])})" in message, message


def test_an_auto_run_compiles_its_step_once_and_resumes(tmp_path, capsys):
  """train.run on the 8 CPU devices with remat='auto' and the CPU's own budget (host RAM, far above
  this step): 4 steps, then resumed to 6, give the losses of an uninterrupted 6-step run with remat
  'none' (the policy that fits first), and each start compiles the train step once: the program
  remat.choose compiled is the one that runs, resumed state included."""
  reference_run = str(tmp_path / "none")
  train.run(experiment.build(config(**{"model.remat": "none", "train.steps": 6})), reference_run)
  workdir = str(tmp_path / "auto")
  for steps in (4, 6):
    auto = experiment.build(config(**{"train.steps": steps, "train.allow_changed_config": True}))
    capsys.readouterr()
    with compiled_programs() as programs:
      train.run(auto, workdir)
    assert programs.count(STEP) == 1, programs
    assert "remat='auto': 'none' (train step memory per device: none " in capsys.readouterr().out
  assert sorted(train_losses(workdir)) == list(range(1, 7))
  assert train_losses(workdir) == train_losses(reference_run)


class Device:
  """What remat.budget reads of a device: its platform, kind and allocator statistics."""
  def __init__(self, platform, stats, kind="test device"):
    self.platform, self.device_kind, self._stats = platform, kind, stats

  def memory_stats(self):
    return self._stats


def test_the_budget_is_a_fraction_of_the_smallest_device_limit_or_the_setting():
  gib = 2 ** 30
  devices = [Device("gpu", {"bytes_limit": 100 * gib}), Device("gpu", {"bytes_limit": 80 * gib})]
  budget, source = remat.budget(devices)
  assert budget == int(remat.MEMORY_FRACTION * 80 * gib) and "bytes_limit 80.00 GiB" in source
  assert remat.budget(devices, limit_gib=12.5) == (int(12.5 * gib), "train.memory_limit_gib=12.5")
  with pytest.raises(UserError, match=r"reports no memory limit.*--config.train.memory_limit_gib"):
    remat.budget([Device("gpu", {})])  # the host's RAM says nothing about an accelerator
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  cpu_budget, source = remat.budget([Device("cpu", None), Device("cpu", None)])
  assert cpu_budget == int(remat.MEMORY_FRACTION * ram / 2) and "/ 2 devices" in source
