r"""Entry point: parses flags and calls library code.

  python -m gpt2_lora_jax.main --config=configs/demo.py --workdir=/tmp/demo [--mode=train_and_eval]
      [--config.train.steps=500 --config.lora.rank=4 ...]

Modes: train, eval (restore the latest checkpoint, sample, score, report), train_and_eval,
score (score existing eval/generations.jsonl again and rewrite the report), dpo (DPO from
--config.dpo.init_from), preference_study (SFT -> DPO -> base vs SFT vs DPO report; see study.py).
Multi-host: jax.distributed is initialised on Cloud TPU pods and SLURM automatically, or with
--coordinator_address/--num_processes/--process_id.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots, reports.")
_MODE = flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval", "score", "dpo",
                                                      "preference_study"],
                          "What to run.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (multi-process runs).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  if _MODE.value in ("eval", "train_and_eval", "preference_study"):
    # The reward scorer (PyTorch, another process) needs GPU memory: JAX must not preallocate
    # 75% of the GPU; without preallocation it holds only what it used. Set before jax starts.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  from gpt2_lora_jax import sharding
  sharding.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from gpt2_lora_jax import evaluate, experiment, pretrain, reward, study, train

  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  try:
    experiment.check_workdir(workdir)
    if mode != "score":  # scoring reads files only; no model is loaded
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
  except train.Preempted as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except (ValueError, OSError, FloatingPointError, ImportError, reward.ScorerError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
