"""Evaluation: base vs fine-tuned answers, held-out loss, reward scores (separate process), report.

Stages, each leaving plain files in <workdir>/eval/step_<N>/ (N: the evaluated checkpoint's step,
so evaluating another step never overwrites one) so any one can be rerun alone:
  1. restore the Orbax checkpoint (latest or eval.step) onto the base. The fine-tuned model is the
     one training ran (lora.make_model: adapters applied factored, y = x W + s (x A) B, the base
     as stored and the adapters in fp32), not a merge: on a bf16 base, W + s A B rounded to bf16
     loses much of a small update, so a merged model would be another model than the one trained;
  2. held-out loss / perplexity of base and fine-tuned on the test split -> heldout.json;
  3. a seeded sample of eval.num_prompts test prompts (the dialogue up to the final
     "\\n\\nAssistant:"), answered by both models under the same sampling seed -> generations.jsonl.
     Held-out rows are data.max_eval_rows rows sampled with data.eval_seed, stratified over the
     eval split's subsets (data.stratified_sample); the prompts are a sample of those rows,
     stratified the same way with eval.seed; eval_config.json counts both per subset;
  4. `python -m gpt2_lora_jax.reward` scores them in its own process -> scores.jsonl (scoring.py)
     (skipped, with the reason written down, when no reward model is configured or it fails);
  5. report.md + summary.json + PNGs from those files (report.py).
Generations are written before scoring starts, so a scorer failure never loses them:
`--mode=score` picks them up again (from eval.step's directory; -1: the highest evaluated step).
eval_config.json records what was evaluated (step, base, data and sampling settings) for the report;
demo rows are graded (demo/data.py's is_correct) into each generation's 'correct'.

Multi-host: every process restores (a collective read), gathers the fine-tuned tree to host memory
and evaluates it on its own devices; only process 0 writes files and runs the scorer. The workdir
must be a local (or mounted) path: these stages write with plain file calls.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_lora_jax import (checkpoint, data, experiment, lora, report, reward, sample, scoring, sharding, timings,
                           train)
from gpt2_lora_jax import loss as loss_lib
from gpt2_lora_jax.scoring import DEMO_SCORER_DIR, DEMO_SCORER_LABEL  # noqa: F401 (re-exported)
from gpt2_lora_jax.errors import UserError

EVAL_DIR = "eval"


def eval_dir(workdir: str, step: int | None = None) -> str:
  """<workdir>/eval/step_<step>/: each evaluated checkpoint keeps its own files. step None (or < 0):
  the newest step directory that holds generations (what --mode=score rescores)."""
  if "://" in workdir:
    raise UserError(f"--workdir={workdir} is a bucket, and evaluation writes local files: mount the "
                     "bucket (e.g. gcsfuse) and pass the mounted path, or copy the run's checkpoints/ "
                     "and metrics.jsonl to a local directory and pass that")
  root = os.path.join(workdir, EVAL_DIR)
  if step is None or step < 0:
    done = sorted(int(d[5:]) for d in (os.listdir(root) if os.path.isdir(root) else ())
                  if d.startswith("step_") and d[5:].isdigit()
                  and os.path.exists(os.path.join(root, d, "generations.jsonl")))
    if not done:
      raise FileNotFoundError(f"{root} holds no evaluated step (no step_<N>/generations.jsonl): "
                              "run --mode=eval first")
    step = done[-1]
  path = os.path.join(root, f"step_{step}")
  os.makedirs(path, exist_ok=True)
  return path


def restore_finetuned(exp, workdir: str, step: int = -1):
  """(fine-tuned params, step): the checkpoint's trainable leaves on top of the run's frozen base."""
  mngr = checkpoint.manager(workdir, keep=exp.config.train.keep_ckpts)
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint: train first "
                            "(--mode=train or train_and_eval) or point --workdir at a trained run")
  step = max(steps) if step < 0 else step
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {workdir}/checkpoints; it has {sorted(steps)}")
  mesh = sharding.make_mesh(exp.config.mesh.data, exp.config.mesh.fsdp)
  tx, _ = experiment.optimizer(exp)
  state, frozen, _, _ = train.init_state(exp.params, exp.labels, exp.config.train.seed, mesh, tx)
  state = checkpoint.restore(mngr, step, checkpoint.abstract_like(state), exp.meta)
  params = lora.combine(state["trainable"], frozen)
  if jax.process_count() > 1:  # leaves may span hosts; from here on each process works alone
    # ... and on its own first device, placed once (host arrays would be copied at every call).
    params = jax.device_put(sharding.fetch_to_host(params), jax.local_devices()[0])
  return params, step


def row_nll_sums(model, params, batch):
  """((B,) NLL summed over each packed row's loss tokens, (B,) its loss tokens): the head of
  train.token_loss_sums (fp32 chunked logits, loss.token_logps) summed per row, for intervals."""
  h_BTD = model.apply({"params": params}, batch["inputs"], position_ids=batch["positions"],
                      segment_ids=batch["segment_ids"], deterministic=True, return_hidden=True)
  cfg = model.config
  spec = loss_lib.HeadSpec(vocab_size=cfg.vocab_size, tied=cfg.tie_word_embeddings, dtype=cfg.dtype,
                           lora_scale=float(model.lora_scale or 0.0), deterministic=True)
  logp_BT = loss_lib.token_logps(h_BTD, loss_lib.head_from_params(params, cfg.tie_word_embeddings),
                                 batch["targets"], spec)
  mask_BT = batch["loss_mask"].astype(jnp.float32)
  return -jnp.sum(logp_BT * mask_BT, axis=-1), jnp.sum(mask_BT, axis=-1)


def heldout_loss(model, params, eval_data, batch_size: int) -> dict:
  """Mean next-token NLL over the loss tokens of the held-out packed rows, and its perplexity; per
  packed row (each a group of whole conversations) its NLL sum and loss tokens (row_nll, row_tokens:
  what a bootstrap over rows resamples; stats.ratio_bootstrap_ci)."""
  step = jax.jit(lambda p, b: (train.token_loss_sums(model, p, b, None, deterministic=True),
                               row_nll_sums(model, p, b)))
  nll = n = 0.0
  row_nll, row_tokens = [], []
  for batch in data.eval_batches(eval_data, batch_size):
    (s, c), (s_B, c_B) = step(params, batch)
    nll, n = nll + float(s), n + float(c)
    real = np.asarray(c_B) > 0  # the last batch is filled with empty rows
    row_nll += np.asarray(s_B, np.float64)[real].tolist()
    row_tokens += np.asarray(c_B)[real].astype(int).tolist()
  loss = nll / max(n, 1.0)
  return {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": n, "row_nll": row_nll,
          "row_tokens": row_tokens}


def choose_prompts(rows: list[tuple[int, str, str]], num_prompts: int, seed: int) -> list[tuple[int, str, str, str]]:
  """A seeded sample of (row index, prompt, reference reply, subset) from the held-out rows
  [(row index, text, subset)], stratified over their subsets (data.stratified_sample), in row order."""
  picked = data.stratified_sample([subset for _, _, subset in rows], num_prompts, seed) if num_prompts > 0 else []
  return [(rows[k][0], *data.prompt_and_response(rows[k][1]), rows[k][2]) for k in picked]


def run(config, workdir: str, base_eval: str = "") -> str:
  """Stages 1-5 of the module docstring; returns the path of report.md.

  base_eval: a directory where evaluate_base left the base's answers, held-out loss and scores (a
  sweep's): only the fine-tuned model is evaluated here and the base's files are merged in, so every
  run of a sweep is compared with the same base answers."""
  if "://" in workdir:
    eval_dir(workdir)  # first: a bucket workdir fails here, before anything is loaded
  exp = experiment.build(config)
  ecfg = config.eval
  tuned_params, step = restore_finetuned(exp, workdir, ecfg.step)
  timings.mark("restore")
  out = eval_dir(workdir, step)
  named = [(report.TUNED, exp.model, tuned_params)]  # the module training used (stage 1)
  if not base_eval:
    named.insert(0, (report.BASE, exp.base_model, base_tree(tuned_params, exp)))
  answer_and_write(config, exp, out, workdir, named, step, base_eval=base_eval)
  del tuned_params, named
  jax.clear_caches()
  if jax.process_index() != 0:
    return ""
  try:
    return score_and_report(config, workdir, step, reuse=base_eval)
  finally:
    timings.mark("score_report")
    timings.write(workdir)


def evaluate_base(config, out: str, workdir: str) -> str:
  """The base model alone (no adapters, before any training) on evaluation's held-out rows and
  prompts, its answers scored: out/heldout.json, generations.jsonl, scores.jsonl (or why scoring was
  skipped), eval_config.json. A sweep evaluates its base once this way (run's base_eval). Returns the
  base's fingerprint (checkpoint.base_fingerprint), as the runs' checkpoints record theirs."""
  exp = experiment.build(config)
  params = jax.device_put(strip_adapters(exp.params), jax.local_devices()[0])
  os.makedirs(out, exist_ok=True)
  answer_and_write(config, exp, out, workdir, [(report.BASE, exp.base_model, params)], step=0)
  del params
  jax.clear_caches()
  if jax.process_index() == 0:
    reason, failure, _ = scoring.score_answers(config, workdir, out)
    if failure is not None:
      raise reward.ScorerError(reason) from failure
  return exp.meta["base_fingerprint"]


def _merge_base(base_eval: str, heldout: dict, rows: list, ids, prompts) -> tuple[dict, list]:
  """The base's held-out loss and answers from base_eval put first, after checking that they were made
  for the same prompts and held-out rows."""
  with open(os.path.join(base_eval, "heldout.json")) as f:
    base_heldout = json.load(f)[report.BASE]
  base_rows = report.read_jsonl(os.path.join(base_eval, "generations.jsonl"))
  mine = next(iter(heldout.values()))
  if ([(r["id"], r["prompt"]) for r in base_rows] != list(zip(ids, prompts))
      or base_heldout.get("row_tokens") != mine["row_tokens"]):
    raise UserError(f"the base's answers in {base_eval} were made for other prompts or held-out rows "
                    "than this run's: evaluate the base again with this config (delete that directory)")
  return {report.BASE: base_heldout, **heldout}, base_rows + rows


def answer_and_write(config, exp, out: str, workdir: str, named: list, step: int,
                     runs: dict | None = None, base_eval: str = ""):
  """Stages 2-3 for the models `named` [(name, module, params)]: heldout.json, generations.jsonl
  (every model answers the same seeded prompts under the same sampling seed), eval_config.json.
  base_eval: the base's files to put first (run)."""
  ecfg = config.eval
  is_main = jax.process_index() == 0
  eval_data, eval_summary = data.build(config.data, exp.tokenizer, "eval", ecfg.batch_size,
                                       config.data.cache_dir or os.path.join(workdir, "cache"), log=None)
  heldout = {name: heldout_loss(model, params, eval_data, ecfg.batch_size) for name, model, params in named}
  timings.mark("heldout")

  heldout_rows, _ = data.read_heldout(config.data)
  chosen = choose_prompts(heldout_rows, ecfg.num_prompts, ecfg.seed)
  ids, prompts, references, prompt_subsets = zip(*chosen) if chosen else ((), (), (), ())
  subsets = {name: {"rows_in_split": c["rows_in_split"], "heldout_rows": c["rows_read"],
                    "heldout_loss_rows": c["rows_used"], "prompts": prompt_subsets.count(name)}
             for name, c in eval_summary["subsets"].items()}
  kwargs = dict(max_new_tokens=ecfg.max_new_tokens, temperature=ecfg.temperature, top_k=ecfg.top_k,
                top_p=ecfg.top_p, stop_strings=tuple(ecfg.stop_strings), seed=ecfg.seed,
                batch_size=ecfg.batch_size,
                encode=lambda prompt, most: data.fit_prompt_token_ids(exp.tokenizer, prompt, most))
  rows, results_of = [], {}
  for name, model, params in named:
    log = (lambda done, total, name=name: print(f"sampling {name}: {done}/{total} prompts", flush=True)) \
        if is_main else None
    results = sample.generate(model, params, exp.tokenizer, list(prompts), **kwargs, progress=log)
    results_of[name] = results
    model_rows = report.generation_rows(ids, prompts, results, name, references)
    for row, subset in zip(model_rows, prompt_subsets):
      row["subset"] = subset
    rows += model_rows
  timings.mark("sampling")
  if config.data.source == "demo":  # demo tasks have one right reply each: grade every answer
    from gpt2_lora_jax.demo import data as demo_data
    for row in rows:
      row["correct"] = demo_data.is_correct(row["answer"], row["reference"])
  models = [name for name, _, _ in named]
  if base_eval:
    heldout, rows = _merge_base(base_eval, heldout, rows, ids, prompts)
    models.insert(0, report.BASE)
  generations = os.path.join(out, "generations.jsonl")
  if is_main:
    with open(os.path.join(out, "heldout.json"), "w") as f:
      json.dump(heldout, f, indent=2)
    # Scores of earlier generations do not score these answers: they go before the new ones land.
    for stale in (os.path.join(out, "scores.jsonl"), os.path.join(out, report.SKIP_REASON_FILE)):
      if os.path.exists(stale):
        os.remove(stale)
    reward.write_jsonl_atomic(generations, rows)
    write_eval_config(os.path.join(out, report.EVAL_CONFIG_FILE), config, step, exp.base_name,
                      models=models, runs=runs, subsets=subsets)
  return list(ids), list(prompts), results_of


def write_eval_config(path: str, config, step: int, base_name: str, models=None, runs=None, subsets=None):
  """What was evaluated, for the report: the checkpoint step, the base, the data and sampling
  settings, and per subset of the eval split its rows, held-out sample, held-out loss rows and prompts."""
  d = config.data
  data_desc = {"source": d.source, "field": d.field, "eval_split": d.eval_split,
               "max_eval_rows": d.max_eval_rows, "eval_seed": d.get("eval_seed", 0)}
  data_desc.update({"hub": {"hub_id": d.hub_id, "subset": d.subset},
                    "files": {"eval_files": list(d.eval_files)}, "tfds": {"tfds_dir": d.tfds_dir},
                    "demo": {"demo_rows": d.demo_rows}}.get(d.source, {}))
  with open(path, "w") as f:
    json.dump({"checkpoint_step": int(step), "base": base_name, "data": data_desc,
               **({"models": list(models)} if models else {}), **({"runs": runs} if runs else {}),
               **({"subsets": subsets} if subsets else {}),
               **config.eval.to_dict()}, f, indent=2, default=list)


SFT, DPO = "sft", "dpo"  # model names in a comparison (study.py)


def compare(config, workdir: str, runs: dict) -> str:
  """The base and each trained run of `runs` {name: run workdir} (latest checkpoints) on the same
  prompts: held-out loss, held-out preference log-probs (preference.json), answers, each model's
  answers scored under every earlier model (drift.jsonl; preference_eval.py), scores and one report
  in <workdir>/eval/step_<step of the last run>/. The runs share this config's base and adapter layout."""
  exp = experiment.build(config)
  named, steps, frozen = [], {}, None
  for name, run_dir in runs.items():
    params, steps[name] = restore_finetuned(exp, run_dir, -1)
    trainable, run_frozen = lora.split(params, exp.labels)
    frozen = run_frozen if frozen is None else frozen  # one placed copy of the base for every model
    named.append((name, exp.model, lora.combine(trainable, frozen)))
  named.insert(0, (report.BASE, exp.base_model, base_tree(named[0][2], exp)))
  step = steps[list(runs)[-1]]
  out = eval_dir(workdir, step)
  run_info = {name: {"workdir": os.path.abspath(d), "step": int(steps[name])} for name, d in runs.items()}
  ids, prompts, results_of = answer_and_write(config, exp, out, workdir, named, step, runs=run_info)
  from gpt2_lora_jax import preference_eval
  logps = preference_eval.preference_logps(config, exp, named,
                                           config.data.cache_dir or os.path.join(workdir, "cache"))
  drift = preference_eval.drift_rows(config, exp, named, ids, prompts, results_of)
  if jax.process_index() == 0:
    with open(os.path.join(out, report.PREFERENCE_FILE), "w") as f:
      json.dump(logps, f)
    reward.write_jsonl_atomic(os.path.join(out, report.DRIFT_FILE), drift)
  del named
  jax.clear_caches()
  return score_and_report(config, workdir, step) if jax.process_index() == 0 else ""


def strip_adapters(params: dict) -> dict:
  """The tree without the LoRA adapters."""
  from flax import traverse_util
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[-1] not in lora.ADAPTER_LEAVES})


def base_tree(tuned_params: dict, exp) -> dict:
  """The untrained model's tree: the fine-tuned tree's frozen leaves (the same device arrays, so the
  base is on the device once) and, for the base leaves training changed (every leaf at rank 0,
  lora.extra_trainable), their values before training (exp.params). No adapters."""
  from flax import traverse_util
  flat = traverse_util.flatten_dict(strip_adapters(tuned_params))
  labels, before = traverse_util.flatten_dict(exp.labels), traverse_util.flatten_dict(exp.params)
  return traverse_util.unflatten_dict({  # trained leaves placed once, as their fine-tuned values are
      p: v if labels[p] == "frozen" else jax.device_put(before[p], v.sharding) for p, v in flat.items()})


def score_and_report(config, workdir: str, step: int | None = None, metrics_path: str | None = None,
                     reuse: str = "") -> str:
  """Stages 4-5: scores eval/step_<step>/generations.jsonl (step None: eval.step, -1 the newest
  evaluated step) in a child process (or records why not), then the report. reuse: see
  scoring.score_answers.

  scores.jsonl and the skip-reason file are replaced only when a new one is complete: the scorer
  writes to a temporary name that is renamed on success, so a failed rescoring (--mode=score)
  keeps the scores already there, and the report is built from them.
  """
  out = eval_dir(workdir, config.eval.step if step is None else step)
  reason, failure, reward_model = scoring.score_answers(config, workdir, out, reuse)
  metrics_path = metrics_path or os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(metrics_path) and os.path.exists(os.path.join(out, report.EVAL_CONFIG_FILE)):
    with open(os.path.join(out, report.EVAL_CONFIG_FILE)) as f:  # a comparison: its last run's log
      runs = json.load(f).get("runs") or {}
    if runs:
      metrics_path = os.path.join(list(runs.values())[-1]["workdir"], "metrics.jsonl")
  path = report.write_report(out, metrics_path=metrics_path, skip_reason=reason, reward_model=reward_model,
                             loss_window=config.train.loss_avg_window)
  print(f"evaluation report: {path}", flush=True)
  if failure is not None:  # the report (without rewards) is written; still a failed run
    raise reward.ScorerError(f"{reason}\nreport without rewards: {path}") from failure
  return path
