"""Shared fixtures: small real objects built locally (the Hugging Face hub is not needed)."""
import os

# Eight CPU devices for the mesh tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Many tests run configs/tiny.py in subprocesses that compile the same steps: JAX's persistent
# compilation cache (one directory per test process, inherited by its subprocesses) compiles each once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpt2_lora_jax_xla_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "tiny.py")
HH_TEST_FILE = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"

# Small GPT-2 shapes used across the suite: (n_embd, n_layer, n_head).
TINY = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)


def randomize_all_params(model, seed=0):
  """Every parameter of a torch model drawn at random, in place; returns the model.

  transformers' init leaves LayerNorm scales at 1 and every bias at 0, so a parity test on it
  cannot see a swapped ln_1/ln_2 or a dropped bias. Here LayerNorm scales are 1 + N(0, 0.2^2),
  LayerNorm shifts and biases N(0, 0.1^2), weights and embeddings N(0, 0.02^2) (GPT-2's init
  scale, so activations stay in the range a trained model sees).
  """
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      is_norm = p.ndim == 1 and (".ln_" in name or name.startswith("ln_") or "LayerNorm" in name)
      if is_norm and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif p.ndim == 1:  # LayerNorm shifts and linear biases
        p.copy_(0.1 * noise)
      else:
        p.copy_(0.02 * noise)
  return model


def make_hf_gpt2(out_dir, vocab_size=50257, seed=0, **kw):
  """A transformers GPT2LMHeadModel with every parameter random (randomize_all_params), saved with
  save_pretrained; returns the model."""
  import torch
  import transformers
  torch.manual_seed(seed)
  cfg = transformers.GPT2Config(vocab_size=vocab_size, **{**TINY, **kw})
  model = randomize_all_params(transformers.GPT2LMHeadModel(cfg), seed).eval()
  model.save_pretrained(out_dir)
  return model


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
  """Directory of a random-weight 2-layer GPT-2 with GPT-2's real vocabulary size."""
  d = tmp_path_factory.mktemp("tiny_gpt2")
  make_hf_gpt2(str(d))
  return str(d)


@pytest.fixture(scope="session")
def tokenizer():
  from gpt2_lora_jax import tokenizer as tok
  return tok.load("offline")


@pytest.fixture(scope="session")
def hh_test_file():
  if not HH_TEST_FILE.exists():
    pytest.skip(f"real HH-RLHF rows not found at {HH_TEST_FILE} (../shared beside the repo)")
  return str(HH_TEST_FILE)


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory):
  """A DeBERTa-v3-shaped sequence classifier (1 label, random weights) with a WordPiece tokenizer."""
  from gpt2_lora_jax.bench import peft_peer
  return peft_peer.random_reward_model(str(tmp_path_factory.mktemp("tiny_reward_model")),
                                        hidden_size=32, num_layers=2)


def run_main(workdir, *flags, timeout=600):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return subprocess.run([sys.executable, "-m", "gpt2_lora_jax.main", f"--config={TINY_CONFIG}",
                         f"--workdir={workdir}", *flags], capture_output=True, text=True, env=env,
                        timeout=timeout, cwd=REPO)


def train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_reward_dir):
  """configs/tiny.py trained (24 steps) and evaluated in one command, scored by the tiny reward
  model. Tests of training and of evaluation share it; the tests that rerun main in its workdir
  either fail before writing or write only eval/."""
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  result = run_main(workdir, "--mode=train_and_eval", "--config.train.steps=24",
                    f"--config.eval.reward_model={tiny_reward_dir}", "--config.eval.temperature=0.7")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


# --- GPU programs lowered on this CPU -----------------------------------------------------------

def lower_for_cuda(fn, *args, static_argnums=()) -> str:
  """StableHLO text of jit(fn)(*args) lowered for CUDA on this CPU machine (compiling for CUDA is
  not possible here; lowering runs every rule jax applies for a GPU, cuDNN attention included)."""
  import jax
  traced = jax.jit(fn, static_argnums=static_argnums).trace(*args)
  return traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.fixture
def simulated_gpu(monkeypatch):
  """make(packed=True, problems={}) -> the attention.Platform of an H100/H200 this process then
  reports: cuDNN 9.8 (packed layout available) or, with packed=False, 9.5 (not available).

  Patches jax's cuDNN version and compute-capability checks (they ask a GPU that is not here) and
  attention.probe (it would run a kernel): problems maps a path to the probe's answer, '' (runs)
  for every path not named. Patches live in the tests only, never in product code.
  """
  import jax
  from jax._src.cudnn import fused_attention_stablehlo as fas
  from gpt2_lora_jax import attention

  def make(packed: bool = True, problems: dict | None = None):
    version = 90800 if packed else 90500
    monkeypatch.setattr(fas, "check_cudnn_version", lambda *a, **k: version)
    monkeypatch.setattr(fas, "check_compute_capability", lambda *a, **k: True)
    plat = attention.Platform("gpu", True, (9, 0), version, attention._version_tuple(jax.__version__),
                              attention._packed_api_available())
    monkeypatch.setattr(attention, "platform", lambda: plat)
    monkeypatch.setattr(attention, "probe", lambda path: (problems or {}).get(path, ""))
    return plat

  return make

