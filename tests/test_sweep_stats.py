"""A sweep's statistics against references written here (plain numpy: a paired bootstrap and Holm's
step-down procedure), and what a sweep config expands to. No JAX, no training."""
import math

import numpy as np
import pytest

from gpt2_lora_jax import config as config_lib, stats, sweep, sweep_report
from gpt2_lora_jax.errors import UserError


def reference_bootstrap(statistic, n, n_boot, seed):
  """Resample n rows n_boot times with numpy's Generator (the documented scheme), apply statistic."""
  rng = np.random.default_rng(seed)
  out = np.empty(n_boot)
  draws = rng.integers(0, n, size=(n_boot, n))
  for b in range(n_boot):
    out[b] = statistic(draws[b])
  return out


def reference_holm(p, alpha=0.05):
  """Holm (1979): test the i-th smallest p at alpha / (m - i + 1), stop at the first acceptance.
  Returns (rejected flags, step divisors, adjusted p-values), each in the given order."""
  m = len(p)
  order = sorted(range(m), key=lambda k: (p[k], k))
  rejected, divisor, adjusted = [False] * m, [0] * m, [0.0] * m
  still = True
  for i, k in enumerate(order):
    divisor[k] = m - i
    still = still and p[k] < alpha / (m - i)
    rejected[k] = still
    adjusted[k] = max([min(1.0, (m - j) * p[order[j]]) for j in range(i + 1)])
  return rejected, divisor, adjusted


def test_paired_bootstrap_and_its_p_value_match_the_reference():
  rng = np.random.default_rng(7)
  a, b = rng.normal(0.3, 1, 40), rng.normal(0.0, 1, 40)
  est, boot = stats.paired_bootstrap(a, b, n_boot=2000, seed=3)
  want = reference_bootstrap(lambda ix: np.mean(a[ix]) - np.mean(b[ix]), 40, 2000, 3)
  assert est == pytest.approx(np.mean(a - b), abs=1e-12)
  np.testing.assert_allclose(boot, want, rtol=0, atol=1e-12)
  below, above = np.mean(want <= 0), np.mean(want >= 0)
  assert stats.bootstrap_p(boot) == pytest.approx(min(1.0, 2 * min(below, above)), abs=1e-12)
  assert stats.bootstrap_p(np.zeros(10)) == 1.0  # every replicate at 0: no evidence of a difference


def test_ratio_statistics_resample_whole_rows():
  rng = np.random.default_rng(1)
  tokens_a = rng.integers(5, 50, 30)
  nll_a, nll_b = tokens_a * rng.uniform(2, 3, 30), tokens_a * rng.uniform(2.2, 3.2, 30)
  est, boot = stats.paired_bootstrap((nll_a, tokens_a), (nll_b, tokens_a), n_boot=500, seed=0, ratio=True)
  want = reference_bootstrap(lambda ix: nll_a[ix].sum() / tokens_a[ix].sum() - nll_b[ix].sum() / tokens_a[ix].sum(),
                             30, 500, 0)
  assert est == pytest.approx(nll_a.sum() / tokens_a.sum() - nll_b.sum() / tokens_a.sum(), abs=1e-12)
  np.testing.assert_allclose(boot, want, rtol=0, atol=1e-12)
  loss, lo, hi = stats.ratio_ci(nll_a, tokens_a, n_boot=500, seed=0)
  replicates = reference_bootstrap(lambda ix: nll_a[ix].sum() / tokens_a[ix].sum(), 30, 500, 0)
  assert loss == pytest.approx(nll_a.sum() / tokens_a.sum(), abs=1e-12)
  assert [lo, hi] == pytest.approx(list(np.quantile(replicates, [0.025, 0.975])), abs=1e-12)


@pytest.mark.parametrize("p", [[0.01, 0.04, 0.03, 0.2], [0.001, 0.03, 0.026], [0.04, 0.01], [0.5],
                               [0.02, 0.02, 0.02]])
def test_holm_matches_the_step_down_reference(p):
  adjusted, divisors = stats.holm(p)
  rejected, want_divisors, want_adjusted = reference_holm(p)
  assert divisors == want_divisors
  assert adjusted == pytest.approx(want_adjusted, abs=1e-12)
  assert [a < 0.05 for a in adjusted] == rejected  # adjusted p below alpha <=> Holm rejects


def test_holm_stops_at_the_first_acceptance():
  # 0.03 > 0.05 / 2 is accepted, so 0.04 is accepted too although 0.04 < 0.05 / 1.
  adjusted, _ = stats.holm([0.04, 0.03])
  assert adjusted == pytest.approx([0.06, 0.06]) and not any(a < 0.05 for a in adjusted)


def test_best_run_against_the_others_paired_and_holm_adjusted():
  rng = np.random.default_rng(0)
  ids = [f"p{i:02d}" for i in range(60)]  # prompts are paired by id, in sorted order
  base = rng.normal(0, 1, 60)
  gains = {"best": 1.0, "close": 0.9, "far": -0.5}
  values = {name: {i: float(g + base[k] * 0.1 + rng.normal(0, 1)) for k, i in enumerate(ids)}
            for name, g in gains.items()}
  best = {"name": "best", "values": values["best"]}
  others = [{"name": n, "values": values[n]} for n in ("close", "far")]
  got = sweep_report.compare(best, others, "reward_difference")
  a = np.array([values["best"][i] for i in ids])
  p, boots = [], []
  for name in ("close", "far"):
    b = np.array([values[name][i] for i in ids])
    boot = reference_bootstrap(lambda ix: np.mean(a[ix] - b[ix]), 60, sweep_report.N_BOOT, sweep_report.SEED)
    boots.append(boot)
    p.append(min(1.0, 2 * min(np.mean(boot <= 0), np.mean(boot >= 0))))
  rejected, divisors, adjusted = reference_holm(p)
  for c, name, boot, pk, adj, d, rej in zip(got, ("close", "far"), boots, p, adjusted, divisors, rejected):
    level = 1 - 0.05 / d
    assert c["other"] == name and c["p"] == pytest.approx(pk, abs=1e-12)
    assert c["p_holm"] == pytest.approx(adj, abs=1e-12) and c["separated"] == rej
    assert c["level"] == pytest.approx(level)
    assert c["ci"] == pytest.approx(list(np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])), abs=1e-12)
  assert got[1]["separated"] and not got[0]["separated"]  # 'far' is resolved, 'close' is not
  verdict, _ = sweep_report._verdict([{**best, "metric": 1.0}, *({**o, "metric": 0.0} for o in others)],
                                     "reward_difference", "the reward gain")
  assert verdict.startswith("No winner") and "do not separate" in verdict


def sweep_config(**changes):
  c = config_lib.default_config()
  c.model.init = "random"
  c.pretrain.steps = 5
  for key, value in changes.items():
    section, leaf = key.split("__")
    c[section][leaf] = value
  return c


def test_grid_and_runs_expand_to_named_runs():
  c = sweep_config(sweep__grid=(("lora.rank", (4, 16)), ("optim.lr", (1e-3, 3e-3))),
                   sweep__runs=((), (("lora.targets", ("c_attn", "c_proj")),)))
  runs = sweep.plan(c)
  assert [r.name for r in runs] == ["rank=4,lr=0.001", "rank=4,lr=0.003", "rank=16,lr=0.001",
                                    "rank=16,lr=0.003", "recipe", "targets=c_attn+c_proj"]
  assert runs[2].overrides == {"lora.rank": 16, "optim.lr": 1e-3}
  rc = sweep.run_config(c, runs[2].overrides, "/w")
  assert (rc.lora.rank, rc.optim.lr, rc.data.cache_dir, rc.eval.demo_scorer_dir) == (16, 1e-3, "/w/cache", "/w/demo_scorer")
  assert c.lora.rank == 8  # the recipe is untouched
  clash = sweep_config(sweep__runs=((("optim.lr", 1e-3), ("dpo.beta", 0.2)),))
  with pytest.raises(UserError, match="dpo.beta"):  # the sweep is SFT: dpo.* belongs to the recipe
    sweep.plan(clash)


@pytest.mark.parametrize("runs, message", [
    (((("eval.num_prompts", 10),),), "belong to the recipe"),
    (((("data.loss_mask", "all"),),), "belong to the recipe"),
    (((("lora.rnak", 4),),), "names no config value"),
    (((("lora", 4),),), "names no config value"),
    (((("lora.rank", 4),), (("lora.rank", 4),)), "both named"),
    ((("lora.rank", 4),), "tuple of"),
])
def test_bad_sweeps_fail_in_one_line(runs, message):
  with pytest.raises(UserError, match=message) as e:
    sweep.plan(sweep_config(sweep__runs=runs))
  assert "\n" not in str(e.value)


def test_override_of_another_type_and_a_missing_sweep_fail_in_one_line():
  c = sweep_config(sweep__runs=((("lora.rank", "four"),),))
  (run,) = sweep.plan(c)
  with pytest.raises(UserError, match="lora.rank='four'"):
    sweep.run_config(c, run.overrides, "/w")
  with pytest.raises(UserError, match="defines no sweep"):
    sweep.plan(sweep_config())
  seeded = sweep_config(sweep__runs=((("train.seed", 1),),), pretrain__steps=0)
  with pytest.raises(UserError, match="another base"):
    sweep.plan(seeded)


def test_selecting_runs_for_array_tasks(monkeypatch):
  runs = sweep.plan(sweep_config(sweep__grid=(("lora.rank", (2, 4, 8)),)))
  assert [r.index for r in sweep.select(runs, "")] == [0, 1, 2] and sweep.select(runs, "base") == []
  assert sweep.select(runs, "rank=4")[0].index == 1 and sweep.select(runs, "2")[0].name == "rank=8"
  monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
  assert sweep.select(runs, "slurm_array")[0].name == "rank=4"
  monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
  with pytest.raises(UserError, match="SLURM_ARRAY_TASK_ID"):
    sweep.select(runs, "slurm_array")
  with pytest.raises(UserError, match="names no run"):
    sweep.select(runs, "7")
  assert sweep.wall_time({"attempts": [{"seconds": 2.5}, {"seconds": None}, {"seconds": 1.0}]}) == (3.5, 1)
  assert math.isclose(sweep.wall_time({})[0], 0.0)
