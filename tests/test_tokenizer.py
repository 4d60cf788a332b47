"""GPT-2's tokenizer from the bundled BPE files (hash-checked), and the hub/local error paths."""
import os
import shutil

import pytest

from gpt2_lora_jax import hub, tokenizer as tok


def test_hello_world_ids(tokenizer):
  assert tokenizer("Hello world")["input_ids"] == [15496, 995]
  assert tokenizer.eos_token_id == tokenizer.pad_token_id == tok.EOT_ID == 50256
  assert len(tokenizer) == 50257


def test_multi_turn_dialogue_roundtrips(tokenizer):
  text = ("\n\nHuman: What's the capital of France?  Ünïcödé ✓\n\nAssistant: Paris.\n\n"
          "Human: And Spain?\n\nAssistant: Madrid.<|endoftext|>")
  ids = tokenizer(text)["input_ids"]
  assert ids[-1] == 50256 and ids.count(50256) == 1  # end-of-text is one special token
  assert tokenizer.decode(ids) == text


def test_offline_files_with_another_hash_are_refused(tmp_path):
  for name in tok.BPE_SHA256:
    shutil.copy(os.path.join(tok.bundled_bpe_dir(), name), tmp_path / name)
  with open(tmp_path / "vocab.bpe", "a") as f:
    f.write("x y\n")
  with pytest.raises(ValueError, match="vocab.bpe has sha256"):
    tok.from_bpe_files(str(tmp_path))
  os.remove(tmp_path / "encoder.json")
  with pytest.raises(FileNotFoundError, match="encoder.json"):
    tok.from_bpe_files(str(tmp_path))


def test_local_dir_through_transformers(tokenizer, tmp_path):
  tokenizer.save_pretrained(tmp_path)
  again = tok.load(str(tmp_path))
  assert again("Hello world")["input_ids"] == [15496, 995]


def test_unreachable_hub_points_to_offline(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(hub.HubUnreachableError, match="offline"):
    tok.load("openai-community/not-in-cache")
