"""The comparison's preference statistics against formulas written here: Wilson intervals, exact
McNemar (scipy's binomtest), length-normalised and implicit-reward accuracies, paired bootstraps,
the KL estimate beside the reward gain, and their report sections."""
import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from gpt2_lora_jax import report, stats


def wilson(successes, n, z=1.959963984540054):
  """Wilson (1927): the p solving |p_hat - p| = z sqrt(p (1 - p) / n), a quadratic in p."""
  p_hat = successes / n
  a = 1 + z * z / n
  b = -(2 * p_hat + z * z / n)
  c = p_hat * p_hat
  root = math.sqrt(b * b - 4 * a * c)
  return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize("successes,n", [(0, 10), (7, 10), (10, 10), (52.5, 100), (1800, 2303)])
def test_wilson_interval_solves_the_score_equation(successes, n):
  low, high = stats.wilson_interval(successes, n)
  want = wilson(successes, n)
  assert low == pytest.approx(want[0], abs=1e-12) and high == pytest.approx(want[1], abs=1e-12)
  # 7 of 10 by hand: center (0.7 + 1.96^2 / 20) / (1 + 1.96^2 / 10) = 0.6445, half-width
  # 1.96 / 1.3842 * sqrt(0.021 + 1.96^2 / 400) = 0.2477.
  if (successes, n) == (7, 10):
    assert (round(low, 4), round(high, 4)) == (0.3968, 0.8922)


@pytest.mark.parametrize("b,c", [(0, 0), (0, 5), (3, 11), (40, 25), (200, 260), (1, 1)])
def test_mcnemar_exact_is_the_two_sided_binomial_test(b, c):
  want = 1.0 if b + c == 0 else scipy_stats.binomtest(b, b + c, 0.5).pvalue
  assert stats.mcnemar_exact(b, c) == pytest.approx(want, rel=1e-12)


def preference_file(rng, n=400):
  """preference.json's content for 3 models on n pairs with known structure."""
  tokens = rng.integers(1, 60, size=(n, 2))
  per_token = rng.normal(-2.0, 0.3, size=(n, 2))
  base = per_token * tokens
  sft = base + rng.normal(0.0, 2.0, size=(n, 2))
  dpo = sft + np.stack([rng.normal(1.0, 1.0, n), rng.normal(-1.0, 1.0, n)], 1)
  dpo[:5] = sft[:5] + 0.25  # implicit-reward ties against sft on 5 pairs
  return {"pairs": n, "rows": list(range(n)), "subsets": ["s"] * n, "reply_tokens": tokens.tolist(),
          "logps": {"base": base.tolist(), "sft": sft.tolist(), "dpo": dpo.tolist()}}


def test_preference_summary_against_hand_formulas():
  rng = np.random.default_rng(0)
  raw = preference_file(rng)
  out = stats.preference_summary(raw, ["base", "sft", "dpo"], n_boot=2000, seed=0)
  tokens = np.asarray(raw["reply_tokens"], float)
  lp = {m: np.asarray(v) for m, v in raw["logps"].items()}
  assert out["chosen_shorter_share"] == np.mean(tokens[:, 0] < tokens[:, 1])
  for m in lp:
    right = np.sum(lp[m][:, 0] > lp[m][:, 1]) + 0.5 * np.sum(lp[m][:, 0] == lp[m][:, 1])
    v = out["models"][m]
    assert v["logp_accuracy"] == right / 400
    assert v["logp_accuracy_ci"] == pytest.approx(wilson(right, 400))
    normed = lp[m] / tokens
    assert v["length_normalised_accuracy"] == np.mean(normed[:, 0] > normed[:, 1])
  # Implicit reward of dpo against sft: 5 tied pairs count half each.
  ratio = lp["dpo"] - lp["sft"]
  right = np.sum(ratio[:, 0] > ratio[:, 1]) + 2.5
  assert out["implicit"]["dpo vs sft"] == pytest.approx(right / 400)
  assert out["implicit_ci"]["dpo vs sft"]["n_ties"] == 5
  assert out["implicit_ci"]["dpo vs sft"]["ci"] == pytest.approx(wilson(right, 400))
  # Paired test of dpo against sft on summed log-prob accuracy: McNemar's b and c counted here.
  a_right, b_right = lp["dpo"][:, 0] > lp["dpo"][:, 1], lp["sft"][:, 0] > lp["sft"][:, 1]
  t = out["paired"]["dpo vs sft"]["summed"]
  assert (t["mcnemar_b"], t["mcnemar_c"]) == (np.sum(a_right & ~b_right), np.sum(~a_right & b_right))
  assert t["mcnemar_p"] == pytest.approx(scipy_stats.binomtest(t["mcnemar_b"], t["mcnemar_b"] + t["mcnemar_c"]).pvalue)
  assert t["difference"] == pytest.approx(np.mean(a_right) - np.mean(b_right))
  # The bootstrap interval of a mean difference of 0/1 pairs: close to the normal approximation.
  d = a_right.astype(float) - b_right
  half = 1.96 * d.std(ddof=1) / math.sqrt(400)
  assert t["difference_ci"] == pytest.approx([d.mean() - half, d.mean() + half], abs=0.01)


def test_length_normalisation_changes_the_verdict_when_chosen_is_longer():
  """Chosen replies twice as long with the same per-token log-prob: summed accuracy 0, per token 0.5
  (ties), and with chosen better per token, per-token accuracy 1 while the sum still prefers rejected."""
  raw = {"pairs": 3, "reply_tokens": [[20, 10]] * 3,
         "logps": {"m": [[-40.0, -20.0]] * 3, "n": [[-38.0, -20.0]] * 3}}
  out = stats.preference_summary(raw, ["m", "n"], n_boot=100, seed=0)
  assert out["models"]["m"]["logp_accuracy"] == 0.0 and out["models"]["m"]["length_normalised_accuracy"] == 0.5
  assert out["models"]["n"]["logp_accuracy"] == 0.0 and out["models"]["n"]["length_normalised_accuracy"] == 1.0
  assert out["paired"]["n vs m"]["per_token"]["n_with_a_tie"] == 3  # m ties on every pair


def test_drift_summary_is_the_mean_log_ratio_beside_the_reward_gain():
  rng = np.random.default_rng(1)
  rows = [{"id": i, "model": "dpo", "reference": "sft", "logp_model": float(-10 + rng.normal()),
           "logp_reference": float(-12 + rng.normal()), "n_tokens": 5, "temperature": 0.7,
           "top_k": 0, "top_p": 1.0} for i in range(50)]
  pairs = {"dpo vs sft": {"mean_difference": 0.25, "difference_ci": [0.1, 0.4]}}
  out = stats.drift_summary(rows, pairs, n_boot=2000, seed=0)["dpo vs sft"]
  ratio = np.array([r["logp_model"] - r["logp_reference"] for r in rows])
  assert out["kl"] == pytest.approx(ratio.mean()) and out["kl_per_token"] == pytest.approx(ratio.sum() / 250)
  half = 1.96 * ratio.std(ddof=1) / math.sqrt(50)
  assert out["kl_ci"] == pytest.approx([ratio.mean() - half, ratio.mean() + half], abs=0.05)
  assert (out["reward_gain"], out["reward_gain_ci"], out["n_answers"]) == (0.25, [0.1, 0.4], 50)


def test_report_shows_the_preference_and_drift_sections(tmp_path):
  rng = np.random.default_rng(2)
  gens, scores, drift = [], [], []
  for i in range(20):
    for m in ("base", "sft", "dpo"):
      gens.append({"id": i, "model": m, "prompt": f"\n\nHuman: q{i}?\n\nAssistant:", "answer": f"a {m}",
                   "stop_reason": "eos", "n_answer_tokens": 2, "prompt_tokens": 6, "prompt_truncated": False})
      scores.append({"id": i, "model": m, "reward": float(rng.normal())})
    for m, ref in (("sft", "base"), ("dpo", "base"), ("dpo", "sft")):
      drift.append({"id": i, "model": m, "reference": ref, "logp_model": -3.0, "logp_reference": -3.5 - i / 10,
                    "n_tokens": 3, "temperature": 0.7, "top_k": 0, "top_p": 1.0})
  for name, rows in (("generations.jsonl", gens), ("scores.jsonl", scores), ("drift.jsonl", drift)):
    with open(tmp_path / name, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  raw = preference_file(rng, 60)
  (tmp_path / report.PREFERENCE_FILE).write_text(json.dumps(raw))
  (tmp_path / report.EVAL_CONFIG_FILE).write_text(json.dumps({
      "models": ["base", "sft", "dpo"], "data": {"max_eval_rows": 40, "eval_seed": 0},
      "subsets": {"harmless-base": {"rows_in_split": 2312, "heldout_rows": 20, "heldout_loss_rows": 19, "prompts": 9},
                  "helpful-base": {"rows_in_split": 2354, "heldout_rows": 20, "heldout_loss_rows": 20, "prompts": 11}}}))
  text = open(report.write_report(str(tmp_path), n_boot=500)).read()
  summary = json.load(open(tmp_path / "summary.json"))
  assert "| harmless-base | 2312 | 20 | 19 | n/a | 9 |" in text
  acc = summary["preference"]["models"]["dpo"]
  assert f"| dpo | {report.fmt(acc['logp_accuracy'])} | [{report.fmt(acc['logp_accuracy_ci'][0], 3)}, " in text
  assert "McNemar exact p" in text and "| dpo vs sft | length-normalised |" in text
  d = summary["drift"]["dpo vs sft"]
  assert d["kl"] == pytest.approx(0.5 + np.mean(np.arange(20) / 10))
  assert d["reward_gain"] == summary["pairs"]["dpo vs sft"]["mean_difference"]
  assert "## Reward against KL" in text and f"| dpo vs sft | 20 | {report.fmt(d['kl'])} |" in text


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_answer_logps_match_transformers_at_the_sampling_temperature(tmp_path, temperature):
  """preference_eval.answer_logps (packed rows, 8-device mesh) against transformers scoring each
  (prompt, answer) alone: sum over the answer of log_softmax(logits / T) (T = 1 for greedy)."""
  import torch
  from conftest import make_hf_gpt2
  from gpt2_lora_jax import model as gpt2_model, preference_eval, sharding, weights
  hf = make_hf_gpt2(str(tmp_path), n_embd=32, n_layer=2, n_head=4, n_positions=64)
  gpt2_config, params = weights.load_pretrained(str(tmp_path))
  mesh = sharding.make_mesh(-1, 1)
  params = sharding.put(params, sharding.param_shardings(params, mesh))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 50257, size=n).tolist() for n in (5, 20, 9, 30, 3, 12, 7, 40, 2, 16)]
  answers = [rng.integers(0, 50257, size=n).tolist() for n in (3, 10, 1, 20, 7, 0, 12, 24, 5, 9)]
  got = preference_eval.answer_logps(gpt2_model.GPT2(gpt2_config), params, prompts, answers,
                                     temperature=temperature, batch_size=8)
  scale = 1.0 / temperature if temperature > 0 else 1.0
  want = []
  for p, a in zip(prompts, answers):
    ids = torch.tensor([p + a])
    with torch.no_grad():
      logp = torch.log_softmax(hf(ids).logits[0].double() * scale, -1)
    want.append(float(logp[torch.arange(len(p) - 1, len(p) + len(a) - 1), ids[0, len(p):]].sum()))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-4)


def test_the_kl_estimate_on_own_samples_matches_the_exact_kl_of_one_token(tmp_path, tokenizer):
  """One sampled token per prompt: sample.generate draws it from model p at temperature T, and the
  mean of answer_logps under p minus under q estimates KL(p_T || q_T), computed here exactly from
  transformers' logits, sum_v p_T(v) (log p_T(v) - log q_T(v)), averaged over the prompts."""
  import torch
  from conftest import make_hf_gpt2
  from gpt2_lora_jax import model as gpt2_model, preference_eval, sample, weights
  T, n, V = 0.05, 128, 50257  # a low temperature: random models' logits are small, this makes them peaked
  hf, jax_models = {}, {}
  for name, seed in (("p", 1), ("q", 2)):
    hf[name] = make_hf_gpt2(str(tmp_path / name), vocab_size=V, seed=seed, n_embd=32, n_layer=2, n_head=4,
                            n_positions=16)
    jax_models[name] = weights.load_pretrained(str(tmp_path / name))
  rng = np.random.default_rng(0)
  prompt_ids = [rng.integers(0, V, size=int(k)).tolist() for k in rng.integers(2, 12, size=n)]
  prompts = [str(i) for i in range(n)]
  cfg, params = jax_models["p"]
  results = sample.generate(gpt2_model.GPT2(cfg), params, tokenizer, prompts, max_new_tokens=1, temperature=T,
                            stop_strings=(), eos_id=None, batch_size=64, seed=3,
                            encode=lambda prompt, most: (prompt_ids[int(prompt)], 0))
  answers = [r["tokens"] for r in results]
  assert all(len(a) == 1 for a in answers)
  logps = {name: preference_eval.answer_logps(gpt2_model.GPT2(c), w, prompt_ids, answers, temperature=T,
                                              batch_size=64) for name, (c, w) in jax_models.items()}
  ratio = logps["p"] - logps["q"]
  exact = []
  for ids in prompt_ids:
    with torch.no_grad():
      lp, lq = (torch.log_softmax(hf[k](torch.tensor([ids])).logits[0, -1].double() / T, -1) for k in ("p", "q"))
    exact.append(float((lp.exp() * (lp - lq)).sum()))
  stderr = ratio.std(ddof=1) / math.sqrt(n)
  # Measured: estimate 5.553, exact 5.821, standard error 0.298 (0.9 standard errors apart); 4
  # standard errors allow for sampling noise.
  assert abs(ratio.mean() - np.mean(exact)) < 4 * stderr
  assert np.mean(exact) > 10 * stderr  # the KL is far from 0, so the check has power
