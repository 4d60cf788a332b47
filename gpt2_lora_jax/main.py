r"""Entry point: parses flags and calls library code.

  python -m gpt2_lora_jax.main --config=configs/demo.py --workdir=/tmp/demo [--mode=train_and_eval]
      [--config.train.steps=500 --config.lora.rank=4 ...]

Modes: train, eval (restore the latest checkpoint, sample, score, report), train_and_eval,
score (score existing eval/step_<N>/generations.jsonl again and rewrite the report), show_config
(print every config key with its value and what it means, then exit; --workdir is not needed),
dpo (DPO from --config.dpo.init_from), preference_study (SFT -> DPO -> base vs SFT vs DPO report in
<workdir>/sft, <workdir>/dpo, <workdir>/eval; see study.py), sweep (every run of the config's sweep.grid /
sweep.runs in <workdir>/runs/<name>, then <workdir>/sweep_report.md; see sweep.py), sweep_report (that
report from the runs that finished), sweep_plan (list the sweep's runs, then exit).
Multi-host: jax.distributed is initialised on Cloud TPU pods and SLURM automatically, or with
--coordinator_address/--num_processes/--process_id.
Compiled programs are kept in JAX's persistent compilation cache, by default
~/.cache/gpt2_lora_jax/jax_compilation_cache (--compilation_cache_dir=DIR elsewhere, empty to turn it off).

Exit codes: 0 done (also when the run was already trained to train.steps: it says so), 1 a user
error (one line, `error: ...`, no traceback) or a failed scorer, 128 + N stopped by signal N
after saving a checkpoint (rerun to resume). Anything else is a bug and prints its traceback.
"""
import os
import shutil
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]). "
                                          "Every key can be overridden with --config.a.b=value; "
                                          "--mode=show_config lists them.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots, reports.")
_MODE = flags.DEFINE_enum("mode", "train_and_eval",
                          ["train", "eval", "train_and_eval", "score", "show_config", "dpo",
                           "preference_study", "sweep", "sweep_report", "sweep_plan"],
                          "What to run (show_config: print every config key, its value and comment).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (multi-process runs).")
DEFAULT_COMPILATION_CACHE = "~/.cache/gpt2_lora_jax/jax_compilation_cache"
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", DEFAULT_COMPILATION_CACHE,
    "JAX's persistent compilation cache: a resumed or repeated run loads its compiled steps from "
    "here instead of compiling again (local path or gs://). Empty: off. Unless given, the "
    "JAX_COMPILATION_CACHE_DIR environment variable wins over the default.")
flags.mark_flag_as_required("config")


def fail(message: str):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


def _config_path(argv) -> str:
  """The file part of --config=FILE[:arg] as given on the command line ('' when absent)."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1].split(":", 1)[0]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return ""


def _config_dir_listing(path: str) -> str:
  """What the directory of a missing config file holds, or the project's configs/ when that directory
  does not exist: 'configs/ holds demo.py, dpo_hh.py, ...', read from the directory itself."""
  given = os.path.dirname(path) or "."
  project = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  for folder in (given, project):
    names = sorted(f for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_")) \
        if os.path.isdir(folder) else []
    if names:
      shown = folder if folder == given else os.path.relpath(folder)
      shown = os.path.abspath(folder) if shown.startswith("..") else shown
      return f"{shown.rstrip(os.sep)}{os.sep} holds {', '.join(names)}"
  return f"no config files in {given}{os.sep} or {project}{os.sep}"


def _unknown_key_message(argv, key: str) -> str:
  """'no config key ...' with the keys of any section it may have meant (config.suggest)."""
  given = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and f".{key}" in a]
  message = f"no config key {key!r}" + (f" (in {given[0]})" if given else "")
  if given:
    from gpt2_lora_jax import config as config_lib
    loaded = flags.FLAGS["config"].value  # the config file's dict, parsed before its overrides
    candidates = config_lib.suggest(loaded if loaded is not None else config_lib.default_config(),
                                    given[0][len("--config."):])
    if candidates:
      options = [f"--config.{c}" for c in candidates]
      return message + "; did you mean " + (f"{', '.join(options[:-1])} or {options[-1]}"
                                            if len(options) > 1 else options[0]) \
          + "? (--mode=show_config lists every key)"
  return message + "; --mode=show_config lists every key"


def parse_flags(argv):
  """absl's parsing, with a user's mistake printed as one line instead of a traceback."""
  path = _config_path(argv)
  if path and not os.path.isfile(path):
    fail(f"config file {path!r} (--config) does not exist; {_config_dir_listing(path)}")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a bad flag value, or get_config(arg) rejected its argument
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    head = lines[0].rstrip(":").replace(": Error whilst parsing config file", "")
    last = lines[-1]
    reason = last.split(": ", 1)[1] if "Traceback" in str(e) and ": " in last else " ".join(lines[1:])
    fail(f"{head}: {reason}" if reason else head)
  except (AttributeError, KeyError) as e:  # a --config.a.b override naming no key of the config
    cause = e
    while cause.args and isinstance(cause.args[0], BaseException):  # AttributeError(KeyError(text))
      cause = cause.args[0]
    text = str(cause.args[0]) if cause.args else str(cause)
    fail(_unknown_key_message(argv, text.partition("\n")[0].strip("'\" ")))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MODE.value == "show_config":
    from gpt2_lora_jax import config as config_lib
    print(config_lib.describe(_CONFIG.value))
    return
  if _MODE.value == "sweep_plan":
    from gpt2_lora_jax import errors, sweep
    try:
      print(sweep.describe(_CONFIG.value, _WORKDIR.value or ""))
    except errors.UserError as e:
      fail(str(e))
    return
  if not _WORKDIR.value:
    fail("--workdir is required (the directory for checkpoints, metrics, plots and reports)")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  if _MODE.value in ("eval", "train_and_eval", "preference_study", "sweep"):
    # The reward scorer (PyTorch, another process) needs GPU memory: JAX must not preallocate
    # 75% of the GPU; without preallocation it holds only what it used. Set before jax starts.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  use_compilation_cache(_COMPILATION_CACHE.value, given=flags.FLAGS["compilation_cache_dir"].present)
  from gpt2_lora_jax import sharding
  sharding.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from gpt2_lora_jax import evaluate, experiment, hub, preemption, reward, study, sweep, sweep_report, train
  from gpt2_lora_jax.demo import pretrain
  from gpt2_lora_jax.errors import UserError

  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  created = "://" not in workdir and not os.path.exists(workdir)
  try:
    experiment.check_workdir(workdir)
    if mode not in ("score", "sweep", "sweep_report"):  # scoring reads files; a sweep pre-trains itself
      config = pretrain.maybe_pretrain(config, workdir, train_if_missing=mode != "eval")
    if mode in ("train", "train_and_eval"):
      train.run(experiment.build(config), workdir)
    if mode in ("eval", "train_and_eval"):
      evaluate.run(config, workdir)
    if mode == "dpo":  # DPO in workdir from --config.dpo.init_from (an SFT run, or '' for fresh adapters)
      study.train_dpo(config, workdir)
    if mode == "preference_study":  # <workdir>/sft, then <workdir>/dpo, then <workdir>/eval (study.py)
      study.run(config, workdir)
    if mode == "score":
      evaluate.score_and_report(config, workdir)
    ran_every_run = mode == "sweep" and sweep.run(config, workdir)  # the base once, then the runs
    if mode == "sweep_report" or ran_every_run:  # the comparison of the runs that finished
      sweep_report.write(config, workdir)
  except preemption.Preempted as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except (UserError, FileNotFoundError, hub.HubUnreachableError, train.NonFiniteLoss,
          reward.ScorerError) as e:
    if created and not _holds_work(workdir):
      shutil.rmtree(workdir, ignore_errors=True)  # a start that failed leaves no empty workdir
    fail(str(e))


def use_compilation_cache(path: str, given: bool):
  """Points JAX's persistent compilation cache at `path` ('' turns it off). Programs that took at
  least jax_persistent_cache_min_compile_time_secs to compile (jax's default: 1 s) are stored."""
  import jax
  if not given and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return  # jax reads the variable itself
  if not path:
    jax.config.update("jax_enable_compilation_cache", False)
    return
  path = path if "://" in path else os.path.expanduser(path)
  jax.config.update("jax_compilation_cache_dir", path)
  # A program holding cuDNN's packed layout (a custom_partitioning call) carries a pointer into this
  # process in its cache key unless told otherwise (jax's config help: "potentially unsafe" where the
  # partitioning callbacks could differ; here they are the project's own code, fixed per version).
  jax.config.update("jax_remove_custom_partitioning_ptr_from_cache_key", True)


def _holds_work(workdir: str) -> bool:
  """Whether any checkpoints/<step> exists under workdir (a run's, or a preference study's stages'),
  or reward scores of training rows (reward_filter.py; a failed scorer keeps those it wrote)."""
  for root, dirs, files in os.walk(workdir):
    if os.path.basename(root) == "checkpoints" and any(d.isdigit() for d in dirs):
      return True
    if any(f.startswith("reward-scores-") for f in files):
      return True
  return False


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
