"""The one ConfigDict schema every config file in configs/ starts from.

Config files (configs/*.py) call `default_config()` and change what their recipe needs. The dict is
locked by main.py, so a mistyped `--config.a.b=...` override fails instead of being ignored.
"""
from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.name = "gpt2"  # hub id ('gpt2', 'openai-community/gpt2-xl') or a local HF directory
  c.model.init = "pretrained"  # 'pretrained' loads model.name; 'random' builds model.preset from scratch
  c.model.preset = "gpt2"  # size for init='random': gpt2, gpt2-medium, gpt2-large, gpt2-xl
  c.model.overrides = ml_collections.ConfigDict()  # GPT2Config fields for init='random' (n_layer=2, ...)
  c.model.tokenizer = "gpt2"  # hub id, local dir, or 'offline' (GPT-2's BPE shipped with the package)
  c.model.dtype = "float32"  # compute dtype; 'bfloat16' on GPU/TPU
  c.model.base_param_dtype = "float32"  # storage of the frozen base; 'bfloat16' halves its memory
  # 'xla' (the reference, every backend), 'cudnn' (NVIDIA GPUs: packed rows through cuDNN's packed
  # layout, no dense mask; falls back to XLA elsewhere) or 'auto' (cuDNN where it applies); attention.py
  c.model.attention_impl = "xla"
  # Rematerialisation of each block, trading compute for activation memory: 'none', 'dots' (keep
  # matmul outputs), 'full', or 'auto': the first of none, dots, full whose compiled train step fits
  # the device's memory (remat.py; one line in the log gives the choice and every figure)
  c.model.remat = "none"
  # Run the blocks under nn.scan over stacked layer parameters: compile time stops growing with
  # depth (gpt2-xl train step on CPU: BUILD.md). Checkpoints of a scanned run hold stacked leaves;
  # HF / PEFT exports and LoRA patterns stay per layer.
  c.model.scan_layers = False

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 8  # 0 turns LoRA off: every parameter is trained (full fine-tuning baseline)
  c.lora.alpha = 16.0  # scale = alpha / rank (alpha / sqrt(rank) with use_rslora)
  c.lora.dropout = 0.05  # dropout on the adapter input only
  # Its random bits (dropout.py): 'packed' (four 16-bit values per threefry hash; the rate rounded
  # to a multiple of 2^-16) or 'bernoulli' (flax's nn.Dropout: one threefry hash per element).
  c.lora.dropout_rng = "packed"
  # x @ [W | A] as one matmul where an adapter reads x itself (no dropout, or evaluation and
  # sampling): fused_lora.py. Off until a GPU measures it (bench/levers.py's like_peft_fused).
  c.lora.fused_matmul = False
  c.lora.targets = ("c_attn", "c_proj", "c_fc")  # regexes on module paths, or PEFT short names
  c.lora.use_rslora = False
  c.lora.init = "kaiming_uniform"  # init of A ('kaiming_uniform' as PEFT, or 'gaussian'); B = 0
  c.lora.extra_trainable = ()  # regexes of further leaves to train, e.g. ('ln_.*',) or ('.*bias',)

  c.data = ml_collections.ConfigDict()
  c.data.source = "hub"  # 'hub' (Anthropic/hh-rlhf), 'files' (jsonl/json/parquet), 'tfds', 'demo'
  c.data.hub_id = "Anthropic/hh-rlhf"
  c.data.subset = "all"  # harmless-base, helpful-base, helpful-online, helpful-rejection-sampled, all
  c.data.train_files = ()  # for source='files': paths of the training split
  c.data.eval_files = ()  # for source='files': paths of the held-out split
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.field = "chosen"  # text field to train on ('rejected' for preference methods)
  c.data.loss_mask = "assistant"  # 'all' tokens, every 'assistant' reply, or the 'final' reply only
  c.data.max_length = 1024  # tokens per training row (GPT-2 allows 1024)
  c.data.packing = True  # pack several conversations per row (attention stays inside each)
  # At most this many conversations per packed row (a full row is closed, nothing is dropped); sizes
  # cuDNN's packed attention layout (0: no cap, and no packed layout). 32 costs 0.36% padding on
  # HH-RLHF harmless-base (packing.py).
  c.data.max_segments_per_row = 32
  c.data.max_bad_fraction = 0.01  # stop if more than this share of rows is malformed
  # Held-out rows (0: all): a seeded sample stratified over the subsets of the eval split (data.py),
  # the rows of held-out loss, held-out preference accuracy and the evaluation's prompts alike.
  c.data.max_eval_rows = 0
  c.data.eval_seed = 0  # seed of that sample
  c.data.cache_dir = ""  # tokenisation cache ('' = <workdir>/cache)
  c.data.tfds_dir = ""  # for source='tfds': the data_dir rows were staged into (local or gs://)
  c.data.demo_rows = 4000  # for source='demo': rows of project-written conversations per split
  # For source='demo': share of the training rows whose final 'chosen' reply is a wrong one (as real
  # HH-RLHF chosen replies are sometimes poor), for data.reward_filter to find; test rows stay right.
  c.data.demo_wrong_share = 0.0
  # Training rows kept by the reward of their final Assistant reply (reward_filter.py): each is scored
  # once by the reward model in its own process and the scores cached in the cache dir.
  c.data.reward_filter = ml_collections.ConfigDict()
  c.data.reward_filter.keep_fraction = 1.0  # keep this highest-scored share of the rows (1.0: all)
  c.data.reward_filter.min_reward = float("-inf")  # and only rows scored at least this (-inf: any)
  # '' = the evaluation's scorer: eval.reward_model, or the demo scorer with eval.demo_scorer
  c.data.reward_filter.reward_model = ""

  # Optional pre-training of a random-init model before the LoRA run (the offline demo uses it):
  # full fine-tuning for `steps` steps, saved as a Hugging Face dir, then loaded as the frozen base.
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.steps = 0  # 0: no pre-training stage
  c.pretrain.lr = 1e-3
  c.pretrain.field = ""  # text field to pre-train on ('' = data.field; the demo uses 'wrong')

  # Preference tuning (dpo.py; configs/dpo_hh.py): DPO on the (chosen, rejected) pairs of the rows.
  c.dpo = ml_collections.ConfigDict()
  # One loss or several joined by commas, summed with loss_weights (dpo_losses.py has each formula and
  # its paper): 'sigmoid' (DPO), 'conservative' (cDPO), 'robust' (rDPO), 'hinge' (SLiC), 'ipo',
  # 'sigmoid_norm' (log-ratios per reply token), 'simpo' (SimPO, reference-free), 'sft' (chosen NLL)
  c.dpo.loss = "sigmoid"
  c.dpo.loss_weights = ()  # one weight per dpo.loss entry, e.g. (1.0, 0.2) for 'sigmoid,sft' (() = 1 each)
  c.dpo.beta = 0.1  # pull toward the reference, > 0 (TRL's DPOConfig default is 0.1)
  c.dpo.label_smoothing = 0.0  # 'conservative' / 'robust': the probability that a pair's labels are flipped
  c.dpo.reference_free = False  # reference log-probs = 0 (TRL's reference_free): no reference forward
  c.dpo.rpo_alpha = 0.0  # adds rpo_alpha x the chosen reply's NLL per token (TRL's rpo_alpha; RPO)
  c.dpo.simpo_gamma = 0.5  # 'simpo': the target reward margin gamma (TRL's CPOConfig default 0.5)
  c.dpo.init_from = ""  # SFT workdir or checkpoint the policy's adapters start from ('' = fresh)
  c.dpo.steps = 0  # DPO steps (0: train.steps); the SFT stage of --mode=preference_study uses train.steps
  c.dpo.lr = 0.0  # DPO peak learning rate (0: optim.lr)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-4  # peak learning rate
  c.optim.schedule = "cosine"  # 'cosine', 'linear' (to 0) or 'constant', after warmup
  c.optim.warmup_steps = 100
  c.optim.min_lr_ratio = 0.0  # cosine floor as a fraction of lr
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0  # AdamW decoupled decay on trainable matmul weights (see no_decay)
  # Regex on '/'-joined parameter paths that weight decay skips: biases, layer norms, embeddings
  # (optim.py says whose practice this follows); '' decays every trainable leaf.
  c.optim.no_decay = r".*/(bias|scale)|(wte|wpe)/embedding"
  c.optim.clip_norm = 1.0  # global-norm clipping (0 disables)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 16  # global rows per step
  c.train.micro_batches = 1  # gradient accumulation: batch_size / micro_batches rows per pass
  # GiB per device the train step may plan for when model.remat='auto' (0: 0.9 x what the device's
  # allocator allows; on CPU 0.9 x the host's RAM over its devices; remat.py)
  c.train.memory_limit_gib = 0.0
  c.train.seed = 0  # data order, adapter init and dropout all derive from it
  c.train.log_every = 10  # progress line / bar cadence (metrics.jsonl and TensorBoard get every step)
  c.train.eval_every = 200  # held-out loss cadence (0 disables)
  c.train.ckpt_every = 200  # checkpoint cadence
  c.train.keep_ckpts = 3  # checkpoints kept
  c.train.plot_every = 200  # loss plot refresh cadence
  c.train.loss_avg_window = 100  # loss curve smoothing window (the original study used 1000)
  # Resuming refuses a checkpoint whose optimizer, schedule, steps, batch size, seed or data
  # settings differ from this run's (experiment.run_settings); True resumes with the new ones, e.g.
  # to extend train.steps (the learning-rate schedule then follows the new length).
  c.train.allow_changed_config = False

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis size (-1: all remaining devices)
  c.mesh.fsdp = 1  # parameter-sharding axis size

  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 500  # seeded sample of test prompts (50 reproduces the original study)
  c.eval.max_new_tokens = 128
  c.eval.temperature = 0.7  # 0 = greedy
  c.eval.top_k = 0  # 0 disables
  c.eval.top_p = 1.0
  c.eval.stop_strings = ("\n\nHuman:",)
  c.eval.seed = 0
  c.eval.batch_size = 32
  c.eval.step = -1  # checkpoint step to evaluate (-1: latest)
  c.eval.reward_model = "OpenAssistant/reward-model-deberta-v3-large-v2"  # '' skips scoring
  # Offline demo only: with no reward_model, train a tiny classifier on the demo data's right vs wrong
  # replies (demo/scorer.py, seconds) and score with it, labelled "demo scorer" in the report.
  c.eval.demo_scorer = False
  c.eval.demo_scorer_dir = ""  # where the demo scorer is built ('' = <workdir>/demo_scorer)
  c.eval.reward_batch_size = 16
  c.eval.reward_max_length = 512

  # A sweep (--mode=sweep, sweep.py): this config is the recipe, and each run is the recipe with one
  # set of overrides, trained and evaluated in <workdir>/runs/<name>/ on the same base, prompts,
  # held-out rows and reward model; sweep_report.md compares them.
  c.sweep = ml_collections.ConfigDict()
  # Every combination of these values: (('lora.rank', (4, 16)), ('optim.lr', (1e-3, 3e-3)))
  c.sweep.grid = ()
  # Further runs, each a tuple of (key, value) pairs: ((('lora.rank', 8),), (('optim.lr', 1e-3),))
  c.sweep.runs = ()
  # What ranks the runs: 'reward_difference' (paired reward gain over the base), 'win_rate' (over
  # the base), 'correct_difference' (graded data: share correct gained over the base), 'heldout_loss'
  c.sweep.metric = "reward_difference"
  # '' runs every run here, one after another; 'base' only pre-trains and evaluates the base; a run's
  # index or name runs only it; 'slurm_array' the run numbered $SLURM_ARRAY_TASK_ID (launch/slurm_sweep.sh)
  c.sweep.task = ""
  return c


def comments() -> dict[str, str]:
  """{'train.steps': its comment} read from this file's source: the comments are the documentation."""
  import re
  out, above = {}, []  # above: a comment block right above an assignment that has none of its own
  with open(__file__) as f:
    for line in f:
      if line.strip().startswith("#"):
        above.append(line.strip()[1:].strip())
        continue
      m = re.match(r"\s*c\.([\w.]+) = .*?(?:  # (.*))?$", line.rstrip("\n"))
      if m and (m.group(2) or above):
        out[m.group(1)] = (m.group(2) or " ".join(above)).strip()
      above = []
  return out


def flat_values(config: ml_collections.ConfigDict) -> dict[str, object]:
  """{'train.steps': value} for every leaf of `config`, sorted by key; an empty section (model.overrides
  of most configs) is a leaf with value {}."""
  notes, flat = comments(), {}

  def walk(d, prefix):
    for k in sorted(d.keys()):
      v = d[k]
      if isinstance(v, ml_collections.ConfigDict) and (v.keys() or prefix + k not in notes):
        if not v.keys():
          flat[prefix + k] = {}
        walk(v, f"{prefix}{k}.")
      else:
        flat[prefix + k] = v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v

  walk(config, "")
  return flat


def describe(config: ml_collections.ConfigDict) -> str:
  """Every key of `config` with its value and its comment from default_config(), one per line."""
  notes = comments()
  flat = {k: "{}" if v == {} else repr(v) for k, v in flat_values(config).items()}
  width = max(len(f"{k} = {v}") for k, v in flat.items())
  return "\n".join((f"{k} = {v}".ljust(width) + f"  # {notes[k]}") if k in notes else f"{k} = {v}"
                   for k, v in flat.items())


def suggest(config: ml_collections.ConfigDict, dotted: str, most: int = 3) -> list[str]:
  """Keys of `config` that a mistyped key (dotted, e.g. 'train.lerning_rate') may have meant, in any
  section, best first ([] when none is close). Each key is scored by the likeness (difflib's ratio) of
  the typed name to its name or, for a name of several words, to as many consecutive words of what its
  comment says it is (the comment up to its first '(', ':', ';', ',' or '.'; 'lerning_rate' ->
  optim.lr, 'peak learning rate'), which must reach 0.75 (ml_collections' own cutoff), plus the
  likeness of the typed path to its path (so 'train.stepz' ranks train.steps above dpo.steps). Keys
  within 0.25 of the best score are returned, at most `most`."""
  import difflib
  import re
  notes = comments()
  ratio = lambda a, b: difflib.SequenceMatcher(None, a, b).ratio()
  name = dotted.rsplit(".", 1)[-1].lower()
  words = [w for w in re.split(r"[_\W]+", name) if w]
  scored = []
  for key in flat_values(config):
    like = ratio(name, key.rsplit(".", 1)[-1])
    said = re.findall(r"[a-z0-9]+", re.split(r"[(:;,.]", notes.get(key, ""), maxsplit=1)[0].lower())
    if len(words) > 1:
      for i in range(len(said) - len(words) + 1):
        like = max(like, ratio(" ".join(words), " ".join(said[i:i + len(words)])))
    if like >= 0.75:
      scored.append((like + ratio(dotted.lower(), key), key))
  scored.sort(key=lambda t: (-t[0], t[1]))
  return [key for score, key in scored[:most] if score >= scored[0][0] - 0.25]
