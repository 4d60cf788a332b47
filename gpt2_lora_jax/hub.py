"""Resolving a Hugging Face hub id or a local directory, with an error that says what to do offline."""
from __future__ import annotations

import os

from gpt2_lora_jax.errors import describe_exception


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
  offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
  try:
    from huggingface_hub import HfApi, snapshot_download
    if not offline:
      require_answer()
    # Offline, only the cache is read, so asking for both weight formats costs nothing.
    patterns = (list(files) + ["pytorch_model.bin"] * ("model.safetensors" in files) if offline
                else weight_patterns(files, HfApi().list_repo_files(name_or_path)))
    if not offline:  # huggingface_hub draws a progress bar per file
      print(f"fetching {what} {name_or_path!r} from the Hugging Face hub: {', '.join(patterns)}",
            flush=True)
    return snapshot_download(name_or_path, allow_patterns=patterns)
  except Exception as e:  # connection errors, unknown repos, gated repos: one clear message
    cached = ("HF_HUB_OFFLINE is set, so only the Hugging Face cache was searched: fetch it once on a "
              "machine that is online, or point " + flag + " at a local directory (for example one "
              "written by save_pretrained)") if offline else (
              f"If this machine is offline, point {flag} at a local directory (for example one written "
              "by save_pretrained), or set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face "
              "cache")
    raise HubUnreachableError(
        f"could not fetch {what} {name_or_path!r} from the Hugging Face hub "
        f"({describe_exception(e)}). {cached}.") from e


_ANSWERED = set()  # hub endpoints that answered a request in this process


def require_answer():
  """One request to the hub's endpoint without retries; raises whatever the request raised.

  huggingface_hub retries a request that gets no answer 5 times, waiting 1 + 2 + 4 + 8 + 8 s: on a
  machine without network, `--config=configs/gpt2_hh.py:gpt2` took 25 s and printed 22 lines of
  retries before its error. Any HTTP answer, whatever its status, means the hub is reachable, and
  the calls that follow keep their retries for a hub that answers badly for a moment."""
  from huggingface_hub import constants, get_session
  if constants.ENDPOINT in _ANSWERED:
    return
  get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
  _ANSWERED.add(constants.ENDPOINT)


def weight_patterns(files: list[str], repo_files: list[str]) -> list[str]:
  """The files to download: `files`, where model.safetensors stands for the model's weights in the
  one format the repository has, safetensors when it has them (GPT-2's repos hold both; fetching
  both would download the weights twice), else pytorch_model.bin."""
  if "model.safetensors" in files and "model.safetensors" not in repo_files \
      and "pytorch_model.bin" in repo_files:
    return [f for f in files if f != "model.safetensors"] + ["pytorch_model.bin"]
  return list(files)
