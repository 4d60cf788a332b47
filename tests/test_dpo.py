"""DPO: the losses against a PyTorch reference written from the papers, per-reply log-probs from
packed rows against transformers' GPT-2 on each (prompt, reply) alone, and training behaviour."""
import copy
import gzip
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, make_hf_gpt2
from gpt2_lora_jax import config as config_lib
from gpt2_lora_jax import conversation, dpo, preference, sharding, weights
from gpt2_lora_jax import model as gpt2_model


def torch_reference_loss(pc, pr, rc, rr, beta, kind, eps, nc, nr):
  """Rafailov et al. 2023 Eq. 7; cDPO (Mitchell 2023) = DPO on labels flipped with probability eps;
  IPO (Azar et al. 2023) Eq. 17 on per-token log-ratios (as TRL's DPOTrainer does)."""
  pi_logratios, ref_logratios = pc - pr, rc - rr
  if kind == "ipo":
    h = (pc - rc) / nc - (pr - rr) / nr
    return (h - 1 / (2 * beta)) ** 2
  logits = pi_logratios - ref_logratios
  eps = eps if kind == "conservative" else 0.0
  return -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps


@pytest.mark.parametrize("kind,eps", [("sigmoid", 0.0), ("conservative", 0.2), ("ipo", 0.0)])
def test_loss_and_gradients_match_reference_formulas(kind, eps):
  rng = np.random.RandomState(0)
  logps = [rng.uniform(-60, -5, 16) for _ in range(4)]  # policy chosen/rejected, ref chosen/rejected
  nc, nr = rng.randint(3, 40, 16).astype(np.float64), rng.randint(3, 40, 16).astype(np.float64)
  beta = 0.3

  t = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in logps]
  want = torch_reference_loss(*t, beta, kind, eps, torch.tensor(nc), torch.tensor(nr))
  want.mean().backward()

  def mean_loss(pc, pr, rc, rr):
    return dpo.loss(pc, pr, rc, rr, beta=beta, kind=kind, label_smoothing=eps, chosen_tokens=nc,
                    rejected_tokens=nr)[0].mean()
  with jax.enable_x64(True):
    args = [jnp.asarray(x, jnp.float64) for x in logps]
    got, grads = jax.value_and_grad(mean_loss, argnums=(0, 1, 2, 3))(*args)
    per_pair, chosen_reward, rejected_reward = dpo.loss(*args, beta=beta, kind=kind, label_smoothing=eps,
                                                        chosen_tokens=nc, rejected_tokens=nr)
  np.testing.assert_allclose(np.asarray(per_pair), want.detach().numpy(), rtol=1e-12)
  np.testing.assert_allclose(float(got), float(want.mean().detach()), rtol=1e-12)
  for g, x in zip(grads, t):
    np.testing.assert_allclose(np.asarray(g), x.grad.numpy(), rtol=1e-10, atol=1e-15)
  np.testing.assert_allclose(np.asarray(chosen_reward), beta * (logps[0] - logps[2]), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(rejected_reward), beta * (logps[1] - logps[3]), rtol=1e-12)


def test_sigmoid_loss_is_log2_when_policy_is_reference():
  x = jnp.asarray([-3.0, -17.5])
  losses, _, _ = dpo.loss(x, x + 1.0, x, x + 1.0, beta=0.1)
  np.testing.assert_allclose(np.asarray(losses), math.log(2), rtol=1e-6)


# --- per-reply log-probs: packed JAX rows vs transformers on each (prompt, reply) alone ---------------

def randomise_every_parameter(hf, seed=0):
  """Random values for every tensor, LayerNorm scales and biases and all biases included."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
        p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
  return hf


@pytest.fixture(scope="module")
def random_gpt2(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("dpo_gpt2"))
  hf = make_hf_gpt2(d, n_embd=32, n_layer=2, n_head=4, n_positions=256)
  randomise_every_parameter(hf).save_pretrained(d)
  return hf, d


def hf_reply_logp(hf, prompt_ids, reply_ids):
  ids = torch.tensor([list(prompt_ids) + list(reply_ids)])
  with torch.no_grad():
    logp = torch.log_softmax(hf(ids).logits[0].double(), -1)
  positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
  return float(logp[positions, ids[0, len(prompt_ids):]].sum())


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_reply_logps_match_transformers_pair_by_pair(random_gpt2, tokenizer, hh_test_file, base_dtype):
  """On the 8-device mesh; a bf16-stored base is compared with transformers holding the same
  bf16-rounded weights (both compute in fp32), so the bf16 path gets the fp32 tolerance."""
  hf, model_dir = random_gpt2
  if base_dtype == "bfloat16":
    hf = copy.deepcopy(hf)
    with torch.no_grad():
      for p in hf.parameters():
        p.copy_(p.to(torch.bfloat16).float())
  data_cfg = config_lib.default_config().data
  data_cfg.update(dict(source="files", eval_files=(hh_test_file,), max_eval_rows=16, max_length=256))
  pairs, summary = preference.build(data_cfg, tokenizer, "eval", 8, None, log=None)
  assert summary["rows_truncated"]["count"] > 0 and summary["pairs_per_row"] >= 2  # both exercised
  gpt2_config, params = weights.load_pretrained(model_dir, dtype=base_dtype)
  mesh = sharding.make_mesh(-1, 1)  # the 8 CPU devices of conftest
  params = sharding.put(params, sharding.param_shardings(params, mesh))
  got = dpo.reference_logps(gpt2_model.GPT2(gpt2_config), {}, params, pairs, mesh, batch_size=8)

  with gzip.open(hh_test_file, "rt") as f:
    rows = [json.loads(line) for line in f]  # the held-out sample's rows are spread over the file
  compared = 0
  for p, row in enumerate(pairs.pair_rows):
    prompt_ids = conversation.prompt_token_ids(tokenizer, rows[row]["chosen"])
    replies = [tokenizer(conversation.parse_conversation(rows[row][k])[-1].text,
                         add_special_tokens=False)["input_ids"] + [50256] for k in ("chosen", "rejected")]
    if sum(len(prompt_ids) + len(r) - 1 for r in replies) > 256:
      continue  # a cut pair: its segments hold a later part of the dialogue
    want = [hf_reply_logp(hf, prompt_ids, r) for r in replies]
    np.testing.assert_allclose(got[pairs.pair_packed_row[p], pairs.pair_slot[p]], want, rtol=2e-5)
    compared += 1
  assert compared >= 6


# --- training ------------------------------------------------------------------------------------

def tiny_dpo_config(**train):
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny_dpo", REPO / "configs" / "tiny_dpo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.train.update(train)
  return c


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, tiny_reward_dir):
  """configs/tiny_dpo.py through --mode=preference_study's code, in-process on the 8 CPU devices:
  4 SFT steps, 20 DPO steps from the SFT adapters, then base vs SFT vs DPO on 4 prompts."""
  from gpt2_lora_jax import study
  config = tiny_dpo_config(steps=4, eval_every=10, ckpt_every=10, plot_every=10)
  config.dpo.steps = 20
  config.eval.update(dict(num_prompts=4, max_new_tokens=6, batch_size=8, reward_model=tiny_reward_dir))
  config.data.max_eval_rows = 24
  workdir = str(tmp_path_factory.mktemp("study"))
  return config, workdir, study.run(config, workdir)


def records(workdir):
  with open(f"{workdir}/metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def test_dpo_starts_at_log2_and_preference_accuracy_rises(study_run):
  _, workdir, _ = study_run
  rs = records(f"{workdir}/dpo")
  train_rs = [r for r in rs if r["split"] == "train"]
  held_out = {r["step"]: r for r in rs if r["split"] == "eval"}
  first = train_rs[0]  # the update from step 0: the policy is the SFT model, its reference
  assert first["step"] == 1
  np.testing.assert_allclose(first["loss"], math.log(2), rtol=1e-6)
  assert first["margin"] == 0.0 and first["logp_chosen"] == first["ref_logp_chosen"]
  np.testing.assert_allclose(held_out[0]["loss"], math.log(2), rtol=1e-6)
  # Measured on this config (8 CPU devices): held-out accuracy 0.5 (every pair tied, each counts
  # half) -> 0.667 at step 10 -> 0.625 at step 20 (24 pairs), margin 0 -> 0.81; train accuracy 0.5
  # at steps 1-2, 0.73 on average over steps 11-20.
  assert held_out[0]["accuracy"] == 0.5 and held_out[20]["accuracy"] >= 0.6 and held_out[20]["margin"] >= 0.5
  assert [r["accuracy"] for r in train_rs[:2]] == [0.5, 0.5]  # lr 0 at step 0 (warmup): tied twice
  assert np.mean([r["accuracy"] for r in train_rs[-10:]]) >= 0.65
  for name in ("reward_chosen", "reward_rejected", "logp_rejected", "ref_logp_rejected", "pairs"):
    assert name in held_out[20]
  assert os.path.exists(f"{workdir}/dpo/preference.png") and os.path.exists(f"{workdir}/dpo/loss.png")


def test_reference_logps_are_the_frozen_sft_model_throughout(study_run):
  """The reference log-probs logged at the last DPO step are those of the SFT checkpoint (restored
  here through evaluation's Orbax path) on that step's batch, computed afresh."""
  from gpt2_lora_jax import evaluate, experiment
  config, workdir, _ = study_run
  exp = experiment.build(config)
  sft_params, _ = evaluate.restore_finetuned(exp, f"{workdir}/sft")
  pairs, _ = preference.build(config.data, exp.tokenizer, "train", config.train.batch_size,
                              f"{workdir}/dpo/cache", log=None)
  last_step = config.dpo.steps - 1
  batch = preference.batch_for_step(pairs, config.train.seed, last_step, config.train.batch_size)
  logps_fn = jax.jit(lambda p, b: dpo.reply_logps(exp.model, p, b, 2 * pairs.pairs_per_row))
  logps = np.asarray(logps_fn(sft_params, batch)).reshape(len(batch["inputs"]), -1, 2)
  mask = batch["pair_mask"]
  want = (logps * mask[..., None]).sum((0, 1)) / mask.sum()
  logged = [r for r in records(f"{workdir}/dpo") if r["split"] == "train" and r["step"] == last_step + 1][0]
  np.testing.assert_allclose([logged["ref_logp_chosen"], logged["ref_logp_rejected"]], want, rtol=1e-5)
  assert logged["logp_chosen"] != logged["ref_logp_chosen"]  # the policy moved, the reference did not


def test_init_from_loads_the_adapters_and_refuses_another_layout(study_run):
  from gpt2_lora_jax import checkpoint, evaluate, experiment, lora
  config, workdir, _ = study_run
  exp = experiment.build(config)
  restored, _ = evaluate.restore_finetuned(exp, f"{workdir}/sft")
  want, _ = lora.split(jax.device_get(restored), exp.labels)
  loaded, _ = lora.split(dpo.init_adapters(exp, f"{workdir}/sft")[0], exp.labels)
  jax.tree.map(np.testing.assert_array_equal, loaded, want)
  other = config.copy_and_resolve_references()
  other.lora.rank = 2
  with pytest.raises(checkpoint.CheckpointMismatchError, match="dpo.init_from=.*LoRA layout differs"):
    dpo.init_adapters(experiment.build(other), f"{workdir}/sft")
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    dpo.init_adapters(exp, f"{workdir}/sft/cache")


def test_preference_study_end_to_end(study_run):
  """SFT -> DPO -> base vs SFT vs DPO: every section of the report, from the files beside it."""
  config, workdir, path = study_run
  out = os.path.dirname(path)
  assert out == os.path.join(workdir, "eval", "step_20")
  with open(f"{out}/summary.json") as f:
    summary = json.load(f)
  assert summary["model_order"] == ["base", "sft", "dpo"]
  assert set(summary["pairs"]) == {"sft vs base", "dpo vs base", "dpo vs sft"}
  with open(f"{out}/scores.jsonl") as f:
    scores = [json.loads(line) for line in f]
  rewards = {m: {s["id"]: s["reward"] for s in scores if s["model"] == m} for m in ("base", "sft", "dpo")}
  for m, r in rewards.items():
    assert len(r) == 4 and summary["models"][m]["reward_mean"] == pytest.approx(np.mean(list(r.values())))
  diff = [rewards["dpo"][i] - rewards["sft"][i] for i in rewards["dpo"]]
  assert summary["pairs"]["dpo vs sft"]["mean_difference"] == pytest.approx(np.mean(diff))
  assert summary["pairs"]["dpo vs sft"]["length_matched"]["n_pairs"] <= 4
  assert set(summary["heldout"]) == {"base", "sft", "dpo"}
  pref = summary["preference"]
  assert set(pref["models"]) == {"base", "sft", "dpo"}
  # DPO's implicit-reward accuracy against the SFT model, recomputed by the evaluation from the two
  # checkpoints, is the held-out accuracy the DPO run logged at its last step (same pairs).
  dpo_held_out = [r for r in records(f"{workdir}/dpo") if r["split"] == "eval" and r["step"] == 20][0]
  assert pref["pairs"] == dpo_held_out["pairs"]
  assert pref["implicit"]["dpo vs sft"] == pytest.approx(dpo_held_out["accuracy"], abs=1.01 / pref["pairs"])
  report_md = open(path).read()
  for section in ("## What was evaluated", "## Answers", "## Reward", "## Answer length",
                  "## Held-out preference accuracy", "## Held-out loss", "## Training loss", "## Samples"):
    assert section in report_md, section
  assert "Win rate of dpo over sft" in report_md and "| dpo vs sft |" in report_md
  for png in ("reward_hist.png", "reward_vs_length.png", "loss_curve.png"):
    assert os.path.exists(f"{out}/{png}"), png
  from gpt2_lora_jax import report
  # The held-out sample: 24 rows stratified over the demo's task subsets in proportion to their rows,
  # the rows of held-out loss, preference pairs and prompts alike; the report names each subset.
  with open(f"{out}/eval_config.json") as f:
    subsets = json.load(f)["subsets"]
  in_split = sum(c["rows_in_split"] for c in subsets.values())
  assert len(subsets) >= 4 and sum(c["heldout_rows"] for c in subsets.values()) == 24
  for name, c in subsets.items():
    assert abs(c["heldout_rows"] - 24 * c["rows_in_split"] / in_split) < 1, name
    assert pref["data"]["subsets"][name]["rows_read"] == c["heldout_rows"]
    assert f"| {name} | {c['rows_in_split']} | {c['heldout_rows']} |" in report_md
  assert sum(c["prompts"] for c in subsets.values()) == 4
  # Every accuracy with its Wilson interval, length-normalised beside summed, DPO vs SFT paired.
  dpo_acc = pref["models"]["dpo"]
  assert dpo_acc["logp_accuracy_ci"][0] <= dpo_acc["logp_accuracy"] <= dpo_acc["logp_accuracy_ci"][1]
  assert "length-normalised accuracy" in report_md and "| dpo vs sft | log-prob |" in report_md
  test = pref["paired"]["dpo vs sft"]["summed"]
  assert test["mcnemar_b"] + test["mcnemar_c"] <= pref["pairs"] and 0 < test["mcnemar_p"] <= 1
  # Reward against KL: DPO's own answers scored under DPO and under SFT (drift.jsonl).
  with open(f"{out}/drift.jsonl") as f:
    drift = [json.loads(line) for line in f]
  mine = [r for r in drift if (r["model"], r["reference"]) == ("dpo", "sft")]
  assert len(mine) == 4 and {r["n_tokens"] for r in mine} <= set(range(1, 8))
  kl = summary["drift"]["dpo vs sft"]
  assert kl["kl"] == pytest.approx(np.mean([r["logp_model"] - r["logp_reference"] for r in mine]))
  assert kl["reward_gain"] == summary["pairs"]["dpo vs sft"]["mean_difference"]
  assert "## Reward against KL" in report_md and f"| dpo vs sft | 4 | {report.fmt(kl['kl'])} |" in report_md


def test_reference_free_loss_and_trl_metrics_match_transformers(random_gpt2, tokenizer, hh_test_file):
  """make_loss_fn with dpo.reference_free on real HH pairs, against transformers on each (prompt,
  reply) alone: the loss -log sigmoid(beta (log pi(y_w) - log pi(y_l))) (reference log-probs 0), and
  TRL's metrics: rewards beta log pi, margin, accuracy, log-probs, and logits/chosen, logits/rejected
  (per reply, the mean over its tokens of the mean logit over the vocabulary), each a mean over pairs."""
  hf, model_dir = random_gpt2
  data_cfg = config_lib.default_config().data
  data_cfg.update(dict(source="files", eval_files=(hh_test_file,), max_eval_rows=16, max_length=256))
  pairs, _ = preference.build(data_cfg, tokenizer, "eval", 8, None, log=None)
  gpt2_config, params = weights.load_pretrained(model_dir, dtype="float32")
  mesh = sharding.make_mesh(-1, 1)
  params = sharding.put(params, sharding.param_shardings(params, mesh))
  dpo_cfg = config_lib.default_config().dpo
  dpo_cfg.update(dict(reference_free=True, beta=0.1))
  loss_fn = jax.jit(lambda b: dpo.make_loss_fn(gpt2_model.GPT2(gpt2_config), dpo_cfg)({}, params, b, None))

  with gzip.open(hh_test_file, "rt") as f:
    rows = [json.loads(line) for line in f]  # the held-out sample's rows are spread over the file
  hf_pairs = {}  # (packed row, slot) -> (logp chosen, logp rejected, mean logit chosen, rejected)
  for p, row in enumerate(pairs.pair_rows):
    prompt_ids = conversation.prompt_token_ids(tokenizer, rows[row]["chosen"])
    replies = [tokenizer(conversation.parse_conversation(rows[row][k])[-1].text,
                         add_special_tokens=False)["input_ids"] + [50256] for k in ("chosen", "rejected")]
    if sum(len(prompt_ids) + len(r) - 1 for r in replies) > 256:
      continue  # a cut pair: left out of the masked batches below
    stats = []
    for reply in replies:
      ids = torch.tensor([list(prompt_ids) + reply])
      with torch.no_grad():
        logits = hf(ids).logits[0].double()
      at = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
      stats.append((float(torch.log_softmax(logits, -1)[at, ids[0, len(prompt_ids):]].sum()),
                    float(logits[at].mean(-1).mean())))
    hf_pairs[int(pairs.pair_packed_row[p]), int(pairs.pair_slot[p])] = (stats[0][0], stats[1][0],
                                                                          stats[0][1], stats[1][1])
  totals = None
  for first, batch in zip(range(0, pairs.num_rows, 8), preference.eval_batches(pairs, 8)):
    mask = np.zeros_like(batch["pair_mask"])
    for (r, j) in hf_pairs:
      if first <= r < first + 8:
        mask[r - first, j] = 1.0
    batch["pair_mask"] = mask
    out = jax.device_get(loss_fn(sharding.global_batch(batch, mesh)))
    totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
  num, den, aux = totals
  pc, pr, lc, lr = (np.asarray(v) for v in zip(*hf_pairs.values()))
  assert den == len(hf_pairs) >= 6
  z = 0.1 * (pc - pr)
  want = {"loss": np.mean(np.logaddexp(0, -z)), "reward_chosen": np.mean(0.1 * pc),
          "reward_rejected": np.mean(0.1 * pr), "margin": np.mean(z),
          "accuracy": np.mean((z > 0) + 0.5 * (z == 0)), "logp_chosen": np.mean(pc),
          "logp_rejected": np.mean(pr), "logits_chosen": np.mean(lc), "logits_rejected": np.mean(lr)}
  got = {"loss": num / den, **{k: aux[k] / den for k in want if k != "loss"}}
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
  assert aux["ref_logp_chosen"] == aux["ref_logp_rejected"] == 0.0
  assert 0 < want["accuracy"] < 1 and not np.isclose(want["logits_chosen"], want["logits_rejected"])
