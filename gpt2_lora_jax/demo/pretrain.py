"""An optional first stage: pre-train a random-init GPT-2 briefly, save it as a Hugging Face dir.

The offline demo has no pretrained GPT-2 to start from. This stage trains one (every parameter,
loss on every token) with the same train loop, writes it with weights.save_pretrained to
<workdir>/pretrained_base, and the LoRA run then loads that directory as its frozen base through the
ordinary loading path. Rerunning skips a stage that already finished.
"""
from __future__ import annotations

import os

import jax

from gpt2_lora_jax import experiment, metrics, sharding, train, weights
from gpt2_lora_jax.errors import UserError

BASE_DIR = "pretrained_base"


def maybe_pretrain(config, workdir: str, train_if_missing: bool = True):
  """Returns the config for the main run: unchanged, or pointing at the pre-trained base
  (trained now if it is missing and train_if_missing, else an error)."""
  if config.pretrain.steps <= 0:
    return config
  if config.model.init != "random":
    raise UserError("pretrain.steps > 0 needs model.init='random' (a pretrained base needs no pre-training)")
  base_dir = os.path.join(workdir, BASE_DIR)
  if not os.path.exists(os.path.join(base_dir, "model.safetensors")):
    if not train_if_missing:
      raise FileNotFoundError(f"{base_dir} does not exist: this config pre-trains its base first; "
                              "run --mode=train (or train_and_eval) in this workdir")
    stage = config.copy_and_resolve_references()
    stage.lora.rank = 0  # full training of every parameter
    stage.lora.extra_trainable = ()
    stage.data.loss_mask = "all"
    stage.data.field = config.pretrain.field or config.data.field
    stage.data.reward_filter.keep_fraction = 1.0  # the reward filter is for the fine-tuning rows
    stage.data.reward_filter.min_reward = float("-inf")
    stage.optim.lr = config.pretrain.lr
    stage.optim.schedule = "cosine"
    stage.optim.warmup_steps = min(config.optim.warmup_steps, config.pretrain.steps)
    stage.train.steps = config.pretrain.steps
    stage.train.eval_every = max(config.pretrain.steps // 3, 1)  # a held-out curve for the stage
    stage.train.ckpt_every = config.pretrain.steps
    if not stage.data.cache_dir and not metrics.is_remote(workdir):
      stage.data.cache_dir = os.path.join(workdir, "cache")  # shared with the LoRA stage's rows
    exp = experiment.build(stage)
    if jax.process_index() == 0:
      print(f"pre-training a random {exp.gpt2_config.n_layer}-layer GPT-2 for {stage.train.steps} steps",
            flush=True)
    result = train.run(exp, os.path.join(workdir, "pretrain"))
    params = sharding.fetch_to_host(result["params"])  # every process takes part in the gather
    if jax.process_index() == 0:
      metrics.plot_loss(os.path.join(workdir, "pretrain"), config.train.loss_avg_window,
                        title=f"Pre-training loss (every parameter, loss on every token of "
                              f"{stage.data.field!r})")
      weights.save_pretrained(params, exp.gpt2_config.replace(param_dtype="float32"), base_dir)
    sharding.barrier("pretrained base saved")  # nobody loads it before it is written
  main = config.copy_and_resolve_references()
  main.model.init = "pretrained"
  main.model.name = base_dir
  return main
