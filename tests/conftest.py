"""Shared fixtures: small real objects built locally (the Hugging Face hub is not needed)."""
import os

# Eight CPU devices for the mesh tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
HH_TEST_FILE = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"

# Small GPT-2 shapes used across the suite: (n_embd, n_layer, n_head).
TINY = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)


def make_hf_gpt2(out_dir, vocab_size=50257, seed=0, **kw):
  """A random-weight transformers GPT2LMHeadModel saved with save_pretrained; returns the model."""
  import torch
  import transformers
  torch.manual_seed(seed)
  cfg = transformers.GPT2Config(vocab_size=vocab_size, **{**TINY, **kw})
  model = transformers.GPT2LMHeadModel(cfg).eval()
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
