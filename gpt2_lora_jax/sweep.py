r"""Sweeps: one recipe, a list or grid of overrides, each run trained and evaluated as main would.

    python -m gpt2_lora_jax.main --config=configs/demo_sweep.py --mode=sweep_plan   # what would run
    python -m gpt2_lora_jax.main --config=configs/demo_sweep.py --workdir=W --mode=sweep
    python -m gpt2_lora_jax.main --config=configs/demo_sweep.py --workdir=W --mode=sweep_report

The config is the recipe; sweep.grid (every combination of its values) and sweep.runs (further runs)
list the overrides (config.py). What W holds:
  pretrained_base/, pretrain/   the base, when the recipe pre-trains one (the demo's): once per sweep
  base_eval/     the base evaluated once: held-out loss, answers to the prompts, their scores
  cache/         tokenised rows and data.reward_filter's scores, shared by every run
  demo_scorer/   the demo scorer (eval.demo_scorer), shared
  runs/<name>/   one ordinary run per set of overrides, its name made of them: checkpoints,
                 metrics.jsonl, data_summary.json, eval/step_<N>/report.md, and sweep_run.json (its
                 overrides, settings, the wall time of each attempt, and whether it finished)
  sweep_report.md, sweep_summary.json, sweep_loss.png, sweep_metric.png   (sweep_report.py)
Each run's evaluation takes the base's answers, held-out loss and scores from base_eval/ and
evaluates only its fine-tuned model (evaluate.run's base_eval), so every run answers the same
prompts and every comparison is paired. That is why overrides may not touch what is evaluated:
model.*, pretrain.*, eval.*, and the data settings that decide the held-out rows or how they are
read and packed (FIXED_DATA); those belong to the recipe.

Rerunning the command resumes: finished runs are skipped, a run that stopped resumes from its
checkpoint (train.run), the rest train. Before anything runs, every run that has a checkpoint is
checked against the config: changed settings are refused in one line naming each change, as resuming a
run is (checkpoint.check_run; --config.train.allow_changed_config=True accepts them and trains and
evaluates those runs again), and so is a base evaluated with other settings.

On a cluster (launch/slurm_sweep.sh): sweep.task='base' pre-trains and evaluates the base, then one
SLURM array task per run (sweep.task='slurm_array': the run numbered $SLURM_ARRAY_TASK_ID), then
--mode=sweep_report builds the comparison from the runs that finished.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
from typing import NamedTuple

from gpt2_lora_jax.errors import UserError

RUNS_DIR, BASE_EVAL_DIR, CACHE_DIR = "runs", "base_eval", "cache"
RUN_FILE = "sweep_run.json"  # in each run's workdir
# In base_eval/, written when the base's evaluation is done: {'record': base_record, 'base_fingerprint'}
BASE_FILE = "sweep_base.json"
FIXED_PREFIXES = ("model.", "pretrain.", "eval.", "sweep.", "dpo.")
# sweep.metric -> (what it measures, whether higher is better); sweep_report.py ranks runs by it
METRICS = {
    "reward_difference": ("paired mean reward difference, fine-tuned minus base, per prompt", True),
    "win_rate": ("win rate over the base (a tie counts half)", True),
    "correct_difference": ("share of correct answers, fine-tuned minus base, per prompt", True),
    "heldout_loss": ("held-out loss (mean NLL per loss token)", False),
}
FIXED_DATA = ("source", "hub_id", "subset", "eval_files", "eval_split", "max_eval_rows", "eval_seed",
              "tfds_dir", "demo_rows", "field", "loss_mask", "max_length", "packing",
              "max_segments_per_row", "cache_dir")


class Run(NamedTuple):
  index: int
  name: str
  overrides: dict  # 'section.key' -> value, in the order the config gives them


def plan(config) -> list[Run]:
  """The runs of the sweep: every combination of sweep.grid, then each of sweep.runs."""
  grid = []
  for entry in config.sweep.grid:
    if len(entry) != 2 or not isinstance(entry[0], str) or not isinstance(entry[1], (tuple, list)) or not entry[1]:
      raise UserError(f"sweep.grid entry {entry!r}: give ('section.key', (value, value, ...))")
    grid.append((entry[0], tuple(entry[1])))
  sets = [dict(zip([k for k, _ in grid], values)) for values in itertools.product(*(v for _, v in grid))] if grid else []
  for entry in config.sweep.runs:
    if not all(isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) for p in entry):
      raise UserError(f"sweep.runs entry {entry!r}: give a tuple of ('section.key', value) pairs, "
                      "e.g. (('lora.rank', 4), ('optim.lr', 1e-3)); () is the recipe itself")
    sets.append(dict(entry))
  if not sets:
    raise UserError("this config defines no sweep: set sweep.grid or sweep.runs (configs/demo_sweep.py shows both)")
  keys = list(dict.fromkeys(k for overrides in sets for k in overrides))
  for key in keys:
    check_key(config, key)
  runs = [Run(i, run_name(overrides, keys), overrides) for i, overrides in enumerate(sets)]
  seen = {}
  for run in runs:
    if run.name in seen:
      raise UserError(f"sweep runs {seen[run.name]} and {run.index} are both named {run.name!r}: "
                      "give each run different overrides")
    seen[run.name] = run.index
  return runs


def check_key(config, key: str):
  """A UserError unless `key` names a config value a run may override."""
  section, _, leaf = key.rpartition(".")
  node = config
  for part in section.split(".") if section else ():
    node = node.get(part) if hasattr(node, "get") else None
  if node is None or not hasattr(node, "keys") or leaf not in node or hasattr(node[leaf], "keys"):
    raise UserError(f"sweep override {key!r} names no config value; --mode=show_config lists them")
  if key.startswith(FIXED_PREFIXES) or key in {f"data.{k}" for k in FIXED_DATA}:
    raise UserError(f"sweep override {key!r}: every run of a sweep is compared on the same base, prompts, "
                    "held-out rows and reward model, so model.*, pretrain.*, eval.* and the data settings "
                    f"{', '.join(FIXED_DATA)} belong to the recipe: set it there (--config.{key}=...)")
  if key == "train.seed" and config.model.init == "random" and config.pretrain.steps <= 0:
    raise UserError("sweep override 'train.seed': this recipe's base is random weights drawn from train.seed, "
                    "so each seed would be another base; pre-train it (pretrain.steps) or load one (model.name)")


def _text(value) -> str:
  if isinstance(value, (tuple, list)):
    return "+".join(_text(v) for v in value)
  if isinstance(value, float):
    return f"{value:g}"
  return re.sub(r"[^A-Za-z0-9._+-]", "_", str(value))


def run_name(overrides: dict, keys: list[str]) -> str:
  """'lr=0.008,keep_fraction=0.5': each override's last key part (its whole key where two overridden
  keys share a last part) and value; 'recipe' for no overrides."""
  leaves = [k.rsplit(".", 1)[-1] for k in keys]
  short = {k: k if leaves.count(k.rsplit(".", 1)[-1]) > 1 else k.rsplit(".", 1)[-1] for k in keys}
  return ",".join(f"{short[k]}={_text(v)}" for k, v in overrides.items()) or "recipe"


def run_config(config, overrides: dict, workdir: str):
  """The recipe with one run's overrides, its caches and demo scorer the sweep's shared ones."""
  c = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    node = c
    for part in path:
      node = node[part]
    try:
      node[leaf] = value
    except TypeError as e:  # ml_collections refuses values of another type
      raise UserError(f"sweep override {key}={value!r} (sweep.grid / sweep.runs): the config holds a "
                      f"{type(node[leaf]).__name__} there") from e
  c.data.cache_dir = config.data.cache_dir or os.path.join(workdir, CACHE_DIR)
  c.eval.demo_scorer_dir = config.eval.demo_scorer_dir or os.path.join(workdir, "demo_scorer")
  return c


def settings(config) -> dict:
  """What a run's checkpoint records and resuming compares: run settings and the adapter layout."""
  from gpt2_lora_jax import experiment, lora
  return json.loads(json.dumps({"run": experiment.run_settings(config),
                                "lora": experiment.lora_record(lora.LoraConfig.from_config(config.lora))}))


def base_record(config) -> dict:
  """What the base's evaluation depends on (compared when a sweep is rerun)."""
  record = {"model": config.model.to_dict(), "pretrain": config.pretrain.to_dict(),
            "eval": config.eval.to_dict(), "data": {k: config.data[k] for k in FIXED_DATA}}
  return json.loads(json.dumps(record))


def read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value):
  from gpt2_lora_jax import reward
  reward.write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def _changes(old: dict, new: dict) -> list[str]:
  show = lambda d, k: json.dumps(d[k]) if k in d else "(not recorded)"
  return [f"{k}: {show(old, k)} -> {show(new, k)}" for k in sorted(set(old) | set(new))
          if old.get(k, KeyError) != new.get(k, KeyError)]


def check_runs(config, workdir: str, runs: list[Run]):
  """Refuses, before anything runs, a base evaluated with other settings and every run whose
  checkpoint was trained with settings the config now changes (one line naming each change)."""
  from gpt2_lora_jax import checkpoint
  base = read_json(os.path.join(workdir, BASE_EVAL_DIR, BASE_FILE))
  now = base_record(run_config(config, {}, workdir))
  if base is not None and base["record"] != now:
    flat = lambda r: {f"{s}.{k}": v for s, d in r.items() for k, v in d.items()}
    raise UserError(f"this sweep's base in {workdir}/{BASE_EVAL_DIR} was evaluated with other settings: "
                    + "; ".join(_changes(flat(base["record"]), flat(now)))
                    + ". Every run is compared with that base: rerun with its settings or use a fresh --workdir")
  for run in runs:
    run_dir = os.path.join(workdir, RUNS_DIR, run.name)
    latest = checkpoint.latest_meta(run_dir)
    if latest is None:
      continue
    rc = run_config(config, run.overrides, workdir)
    now = settings(rc)
    where = f"{run_dir}/checkpoints/{latest[0]} (sweep run {run.name!r})"
    if latest[1].get("lora") != now["lora"]:
      raise UserError(f"checkpoint {where} has adapters lora={latest[1].get('lora')}, the config now gives "
                      f"lora={now['lora']}: rerun with its settings or use a fresh --workdir")
    checkpoint.check_run(latest[1], now, where, rc.train.allow_changed_config)
    check_base(base, latest[1].get("base_fingerprint"), where)


def check_base(base: dict | None, fingerprint: str | None, where: str):
  """A run trained on another base than the one the sweep evaluated would not be paired with it."""
  if base is not None and fingerprint != base["base_fingerprint"]:
    raise UserError(f"{where}: its base (fingerprint {fingerprint}) is not the one this sweep evaluated "
                    f"(fingerprint {base['base_fingerprint']}; was the pre-trained base made again?): "
                    "use a fresh --workdir")


def select(runs: list[Run], task: str) -> list[Run]:
  """The runs sweep.task asks for ('' all, 'base' none, an index, a name, 'slurm_array')."""
  if task == "":
    return runs
  if task == "base":
    return []
  if task == "slurm_array":
    if not os.environ.get("SLURM_ARRAY_TASK_ID", "").isdigit():
      raise UserError("sweep.task='slurm_array' runs the run numbered $SLURM_ARRAY_TASK_ID, which is not set: "
                      "submit with launch/slurm_sweep.sh, or give a run's index or name")
    task = os.environ["SLURM_ARRAY_TASK_ID"]
  chosen = [r for r in runs if (task.isdigit() and r.index == int(task)) or r.name == task]
  if not chosen:
    raise UserError(f"sweep.task={task!r} names no run of this sweep: its runs are 0..{len(runs) - 1} "
                    f"({', '.join(r.name for r in runs)}); --mode=sweep_plan lists them")
  return chosen


def describe(config, workdir: str = "") -> str:
  """--mode=sweep_plan: 'runs: N', then one line per run (index, name, overrides, and with a workdir
  its state)."""
  runs = plan(config)
  lines = [f"runs: {len(runs)}", f"metric: {config.sweep.metric}"]
  for run in runs:
    state = ""
    if workdir:
      record = read_json(os.path.join(workdir, RUNS_DIR, run.name, RUN_FILE)) or {}
      state = "  [finished]" if record.get("done") else "  [started]" if record else "  [not started]"
    lines.append(f"{run.index}  {run.name}  " + " ".join(f"{k}={v!r}" for k, v in run.overrides.items())
                 + state)
  return "\n".join(lines)


def prepare_base(config, workdir: str, create: bool):
  """The recipe pointing at the sweep's base, pre-trained once if the recipe pre-trains (create), and
  the base evaluated once into base_eval/ (create); without create both must exist."""
  import jax
  from gpt2_lora_jax import evaluate, sharding
  from gpt2_lora_jax.demo import pretrain
  missing = ("this sweep's base is not ready in {}: run its base stage first (--config.sweep.task=base; "
             "launch/slurm_sweep.sh submits it before the array), or the whole sweep with --config.sweep.task=''")
  base_dir = os.path.join(workdir, pretrain.BASE_DIR, "model.safetensors")
  if config.pretrain.steps > 0 and not create and not os.path.exists(base_dir):
    raise UserError(missing.format(base_dir))
  record = base_record(run_config(config, {}, workdir))  # the recipe as given (check_runs compares it)
  config = pretrain.maybe_pretrain(config, workdir, train_if_missing=create)
  out = os.path.join(workdir, BASE_EVAL_DIR)
  if read_json(os.path.join(out, BASE_FILE)) is None:
    if not create:
      raise UserError(missing.format(out))
    print(f"sweep: evaluating the base once -> {out}", flush=True)
    fingerprint = evaluate.evaluate_base(run_config(config, {}, workdir), out, workdir)
    if jax.process_index() == 0:
      write_json(os.path.join(out, BASE_FILE), {"record": record, "base_fingerprint": fingerprint})
    sharding.barrier("sweep base evaluated")
  return config


def check_metric(config):
  if config.sweep.metric not in METRICS:
    raise UserError(f"sweep.metric={config.sweep.metric!r}: choose one of {', '.join(METRICS)}")


def run(config, workdir: str) -> bool:
  """--mode=sweep: the base (once), then the runs sweep.task asks for. Returns whether that was every
  run (then main writes the report: sweep_report.write)."""
  runs = plan(config)
  check_metric(config)
  chosen = select(runs, config.sweep.task)
  check_runs(config, workdir, runs)
  config = prepare_base(config, workdir, create=config.sweep.task in ("", "base"))
  for k, one in enumerate(chosen):
    print(f"sweep: run {one.index} ({k + 1} of {len(chosen)} here): {one.name}", flush=True)
    run_one(config, workdir, one)
  return config.sweep.task == ""


def run_one(config, workdir: str, one: Run):
  """Trains (or resumes) and evaluates one run in runs/<name>/, unless it finished with these settings."""
  import jax
  from gpt2_lora_jax import checkpoint, evaluate, experiment, train
  run_dir = os.path.join(workdir, RUNS_DIR, one.name)
  path = os.path.join(run_dir, RUN_FILE)
  rc = run_config(config, one.overrides, workdir)
  now = settings(rc)
  record = read_json(path) or {"name": one.name, "overrides": one.overrides, "attempts": [], "done": None}
  if record.get("done") and record.get("settings") == now:
    print(f"sweep: {one.name} finished at step {record['done']['step']}; skipped", flush=True)
    return
  is_main = jax.process_index() == 0
  record.update(settings=now, done=None)
  attempt = {"started": time.time(), "seconds": None}
  record["attempts"].append(attempt)
  os.makedirs(run_dir, exist_ok=True)
  if is_main:
    write_json(path, record)
  t0 = time.time()
  try:
    exp = experiment.build(rc)
    check_base(read_json(os.path.join(workdir, BASE_EVAL_DIR, BASE_FILE)), exp.meta["base_fingerprint"],
               f"sweep run {one.name!r}")
    result = train.run(exp, run_dir)
    attempt["train_seconds"] = time.time() - t0
    del result, exp
    jax.clear_caches()
    evaluate.run(rc, run_dir, base_eval=os.path.join(workdir, BASE_EVAL_DIR))
    step = rc.eval.step if rc.eval.step >= 0 else checkpoint.latest_meta(run_dir)[0]  # the evaluated one
    record["done"] = {"step": step, "finished": time.time()}
  finally:
    attempt["seconds"] = time.time() - t0
    if is_main:
      write_json(path, record)
    jax.clear_caches()


def wall_time(record: dict) -> tuple[float, int]:
  """(seconds of the attempts whose time was recorded, attempts whose time was lost: killed)."""
  known = [a["seconds"] for a in record.get("attempts", []) if a.get("seconds") is not None]
  return (math.fsum(known), len(record.get("attempts", [])) - len(known))
