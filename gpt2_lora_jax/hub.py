"""Resolving a Hugging Face hub id or a local directory, with an error that says what to do offline."""
from __future__ import annotations

import os


class HubUnreachableError(OSError):
  """The hub could not be reached (offline machine, firewall) or the id does not exist there."""


def resolve(name_or_path: str, files: list[str], what: str, flag: str) -> str:
  """Returns a local directory holding `files` for a local path or a hub id.

  what: what is being loaded ('GPT-2 model'), flag: the flag or argument that points at a local
  copy; both appear in the error when the hub cannot be reached.
  """
  if os.path.isdir(name_or_path):
    return name_or_path
  if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]:
    raise FileNotFoundError(f"{what} directory {name_or_path!r} does not exist; pass an existing "
                            f"directory or a Hugging Face hub id with {flag}")
  try:
    from huggingface_hub import snapshot_download
    # Weights may come as safetensors or a PyTorch pickle; take whichever the repo has.
    patterns = list(files) + ["pytorch_model.bin"] * ("model.safetensors" in files)
    return snapshot_download(name_or_path, allow_patterns=patterns)
  except Exception as e:  # connection errors, unknown repos, gated repos: one clear message
    raise HubUnreachableError(
        f"could not fetch {what} {name_or_path!r} from the Hugging Face hub ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}). If this machine is offline, point {flag} at a "
        "local directory (for example one written by save_pretrained), or set HF_HUB_OFFLINE=1 to "
        "use a copy already in the Hugging Face cache.") from e
