"""End-to-end evaluation on the tiny config: generations, held-out loss, scores, report, failures."""
import json
import os

import pytest

from conftest import run_main


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def trained(tiny_run):
  return tiny_run


def test_train_and_eval_writes_every_stage(trained):
  out = os.path.join(trained, "eval", "step_24")  # each evaluated checkpoint has its own directory
  generations = read_jsonl(os.path.join(out, "generations.jsonl"))
  assert sorted({g["model"] for g in generations}) == ["base", "finetuned"]
  assert len(generations) == 2 * 8  # eval.num_prompts=8 in configs/tiny.py, both models
  base_ids = [g["id"] for g in generations if g["model"] == "base"]
  assert base_ids == [g["id"] for g in generations if g["model"] == "finetuned"]
  assert all(g["prompt"].endswith("\n\nAssistant:") for g in generations)
  assert all(g["stop_reason"] in ("stop_string", "eos", "max_new_tokens") for g in generations)
  scores = read_jsonl(os.path.join(out, "scores.jsonl"))
  assert [(s["id"], s["model"]) for s in scores] == [(g["id"], g["model"]) for g in generations]
  heldout = json.load(open(os.path.join(out, "heldout.json")))
  assert heldout["finetuned"]["loss"] < heldout["base"]["loss"]  # training helped on held-out rows
  summary = json.load(open(os.path.join(out, "summary.json")))
  report = open(os.path.join(out, "report.md")).read()
  base_rewards = [s["reward"] for s in scores if s["model"] == "base"]
  mean = sum(base_rewards) / len(base_rewards)
  assert abs(summary["models"]["base"]["reward_mean"] - mean) < 1e-9
  assert summary["paired"]["n_pairs"] == 8
  assert f"{mean:.4f}" in report
  for png in ("reward_hist.png", "loss_curve.png"):
    assert os.path.getsize(os.path.join(out, png)) > 1000
  # The report says what it evaluated; every file is readable by others, like the rest of the workdir.
  assert "Checkpoint: step **24**" in report and "Base model: `random:gpt2:seed0`" in report
  assert "source 'demo'" in report and "temperature 0.7" in report
  for name in os.listdir(out):
    assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o644, name


def test_eval_mode_reruns_on_a_chosen_step_and_score_mode_rescoring(trained, tiny_reward_dir):
  result = run_main(trained, "--mode=eval", "--config.eval.step=20", "--config.eval.reward_model=")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "sampling base: 8/8 prompts" in result.stdout and "sampling finetuned: 8/8 prompts" in result.stdout
  out = os.path.join(trained, "eval", "step_20")
  assert json.load(open(os.path.join(out, "eval_config.json")))["checkpoint_step"] == 20
  assert not os.path.exists(os.path.join(out, "scores.jsonl"))
  assert "Scoring was skipped" in open(os.path.join(out, "report.md")).read()
  # The step 24 evaluation is still there, untouched.
  assert os.path.exists(os.path.join(trained, "eval", "step_24", "scores.jsonl"))
  result = run_main(trained, "--mode=score", "--config.eval.step=20",
                    f"--config.eval.reward_model={tiny_reward_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "scoring: 16/16 answers" in result.stderr  # the scorer's progress reaches the user
  assert len(read_jsonl(os.path.join(out, "scores.jsonl"))) == 16


def test_scorer_failure_keeps_generations_and_scores_and_fails_clearly(trained, tmp_path, tiny_reward_dir):
  out = os.path.join(trained, "eval", "step_24")  # --mode=score takes the newest evaluated step
  scores_path = os.path.join(out, "scores.jsonl")
  if not os.path.exists(scores_path):  # run alone, after a test that left the run unscored
    assert run_main(trained, "--mode=score", f"--config.eval.reward_model={tiny_reward_dir}").returncode == 0
  scores = open(scores_path).read()
  assert len(scores.splitlines()) == 16
  result = run_main(trained, "--mode=score", f"--config.eval.reward_model={tmp_path}/no_such_model")
  assert result.returncode == 1
  assert "--mode=score" in result.stderr and "no_such_model" in result.stderr
  assert len(read_jsonl(os.path.join(out, "generations.jsonl"))) == 16
  assert open(scores_path).read() == scores  # a failed rescoring keeps the valid scores
  assert not [f for f in os.listdir(out) if f.startswith(".tmp") or f.endswith(".partial")]
  assert "scores already in scores.jsonl are kept" in open(os.path.join(out, "scoring_skipped.txt")).read()


def test_bf16_base_evaluates_the_model_training_evaluated(tmp_path):
  """On a bf16 base the report's fine-tuned held-out loss is the training loop's at that step."""
  import importlib.util
  from conftest import TINY_CONFIG
  from gpt2_lora_jax import evaluate, experiment, train
  spec = importlib.util.spec_from_file_location("tiny_config", TINY_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.base_param_dtype = "bfloat16"
  config.lora.extra_trainable = ("ln_f",)  # a trained base leaf: the base model must not see it
  config.train.steps = config.train.eval_every = config.train.ckpt_every = 4
  config.data.max_eval_rows = 16
  config.eval.num_prompts = 0  # sampling is not under test here
  workdir = str(tmp_path)
  train.run(experiment.build(config), workdir)
  evaluate.run(config, workdir)
  trained = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "eval"]
  assert trained[-1]["step"] == 4
  heldout = json.load(open(os.path.join(workdir, "eval", "step_4", "heldout.json")))
  assert heldout["finetuned"]["tokens"] == trained[-1]["loss_tokens"]  # the same rows
  # Two programs summing in other orders: measured 2.0e-6 (fine-tuned; about 2 fp32 ulps at a loss
  # of 10.6) and 2.9e-7 (base) apart on the 16 sampled held-out rows.
  assert heldout["finetuned"]["loss"] == pytest.approx(trained[-1]["loss"], rel=0, abs=3e-6)
  assert heldout["base"]["loss"] == pytest.approx(trained[0]["loss"], rel=0, abs=3e-6)  # step 0 = base


def test_eval_without_checkpoints_and_missing_step(trained, tmp_path):
  result = run_main(str(tmp_path / "empty"), "--mode=eval")
  assert result.returncode == 1 and "holds no checkpoint" in result.stderr
  assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "empty")  # the failed start leaves no workdir behind
  result = run_main(trained, "--mode=eval", "--config.eval.step=7")
  assert result.returncode == 1 and "no checkpoint for step 7" in result.stderr


def test_a_finished_run_says_so(trained):
  result = run_main(trained, "--mode=train", "--config.train.steps=20")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "the checkpoint is at step 24, beyond train.steps=20" in result.stdout
  assert "resumed from" not in result.stdout
