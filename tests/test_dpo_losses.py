"""DPO's loss variants against formulas written here from their papers (PyTorch, float64), their
combinations, reference-free training, the settings' checks and TRL's per-step metrics."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2_lora_jax import config as config_lib
from gpt2_lora_jax import dpo, dpo_losses


def paper_loss(kind, pc, pr, rc, rr, nc, nr, beta, eps, gamma):
  """Per-pair losses from the papers, on summed log-probs of policy (p) and reference (r)."""
  z = (pc - rc) - (pr - rr)
  if kind == "hinge":  # SLiC (Zhao et al. 2023), as TRL: max(0, 1 - beta z)
    return torch.clamp(1 - beta * z, min=0)
  if kind == "robust":  # rDPO (Chowdhury et al. 2024), Eq. 5 with flip rate eps
    return ((1 - eps) * -F.logsigmoid(beta * z) + eps * F.logsigmoid(-beta * z)) / (1 - 2 * eps)
  if kind == "sigmoid_norm":  # DPO on log-ratios per reply token
    return -F.logsigmoid(beta * ((pc - rc) / nc - (pr - rr) / nr))
  if kind == "simpo":  # SimPO (Meng et al. 2024), Eq. 6: no reference
    return -F.logsigmoid(beta / nc * pc - beta / nr * pr - gamma)
  if kind == "sft":  # the chosen reply's NLL per token
    return -pc / nc
  if kind == "sigmoid":
    return -F.logsigmoid(beta * z)
  raise ValueError(kind)


def random_logps(seed=0, n=16):
  rng = np.random.RandomState(seed)
  logps = [rng.uniform(-60, -5, n) for _ in range(4)]  # policy chosen/rejected, ref chosen/rejected
  return logps, rng.randint(3, 40, n).astype(np.float64), rng.randint(3, 40, n).astype(np.float64)


@pytest.mark.parametrize("kind,eps", [("hinge", 0.0), ("robust", 0.2), ("robust", 0.0),
                                      ("sigmoid_norm", 0.0), ("simpo", 0.0), ("sft", 0.0)])
def test_each_loss_and_its_gradients_match_the_paper(kind, eps):
  logps, nc, nr = random_logps()
  beta, gamma = 0.3, 0.7
  t = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in logps]
  want = paper_loss(kind, *t, torch.tensor(nc), torch.tensor(nr), beta, eps, gamma)
  want.mean().backward()

  def mean_loss(*xs):
    return dpo_losses.loss(*xs, beta=beta, kind=kind, label_smoothing=eps, chosen_tokens=nc,
                           rejected_tokens=nr, simpo_gamma=gamma)[0].mean()
  with jax.enable_x64(True):
    got, grads = jax.value_and_grad(mean_loss, argnums=(0, 1, 2, 3))(*[jnp.asarray(x, jnp.float64) for x in logps])
  np.testing.assert_allclose(float(got), float(want.mean().detach()), rtol=1e-12)
  for g, x in zip(grads, t):
    np.testing.assert_allclose(np.asarray(g), np.zeros(16) if x.grad is None else x.grad.numpy(),
                               rtol=1e-10, atol=1e-15)
  if kind == "hinge":  # some pairs past the margin, some not: both sides of the hinge are exercised
    assert 0 < float(torch.sum(want > 0)) < 16


def test_weighted_combination_reference_free_and_rpo_alpha():
  """'sigmoid,sft' with weights (1.0, 0.2) plus rpo_alpha 0.5 = sigmoid + 0.2 sft + 0.5 sft, per pair;
  reference_free: the same formulas with reference log-probs 0 (TRL's reference_free)."""
  logps, nc, nr = random_logps(1)
  cfg = config_lib.default_config().dpo
  cfg.update(dict(loss="sigmoid, sft", loss_weights=(1.0, 0.2), rpo_alpha=0.5, beta=0.2))
  t = [torch.tensor(x, dtype=torch.float64) for x in logps]
  n = torch.tensor(nc), torch.tensor(nr)
  want = (paper_loss("sigmoid", *t, *n, 0.2, 0, 0) + 0.2 * paper_loss("sft", *t, *n, 0.2, 0, 0)
          + 0.5 * (-t[0] / n[0]))
  with jax.enable_x64(True):
    got = dpo_losses.combined_loss(*[jnp.asarray(x) for x in logps], nc, nr, cfg)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-12)
  assert dpo_losses.uses_reference(cfg)
  cfg.reference_free = True
  assert not dpo_losses.uses_reference(cfg)
  cfg.update(dict(loss="simpo,sft", loss_weights=(), reference_free=False, rpo_alpha=0.0))
  assert not dpo_losses.uses_reference(cfg)  # neither term reads the reference: no reference forward


@pytest.mark.parametrize("change,words", [
    (dict(beta=0.0), "dpo.beta=0.0"), (dict(loss="sigmoid,nope"), "'nope' unknown"),
    (dict(loss="sigmoid,sigmoid"), "names a loss twice"),
    (dict(loss="sigmoid,sft", loss_weights=(1.0,)), "1 weights for the 2 losses"),
    (dict(loss_weights=(0.0,)), "every weight must be > 0"),
    (dict(loss="conservative", label_smoothing=0.0), "dpo.label_smoothing=0.0: dpo.loss 'conservative'"),
    (dict(loss="robust", label_smoothing=0.5), "dpo.label_smoothing=0.5: dpo.loss 'robust'"),
    (dict(label_smoothing=0.1), "applies only to dpo.loss 'conservative' or 'robust'"),
    (dict(rpo_alpha=-1.0), "dpo.rpo_alpha=-1.0"), (dict(simpo_gamma=-0.1), "dpo.simpo_gamma=-0.1")])
def test_bad_settings_are_named_in_one_line(change, words):
  cfg = config_lib.default_config().dpo
  cfg.update(change)
  with pytest.raises(ValueError) as e:
    dpo.check_config(cfg)
  lines = str(e.value).splitlines()
  assert len(lines) == 2 and words in lines[1], str(e.value)


def test_every_dpo_key_is_documented():
  notes = config_lib.comments()
  for key in config_lib.default_config().dpo:
    assert f"dpo.{key}" in notes, key
