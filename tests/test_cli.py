"""The command line a newcomer meets: one-line errors, show_config, progress without a terminal,
comma-separated file lists, the hub's choice of weight file."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, TINY_CONFIG


def main_cli(*args, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return subprocess.run([sys.executable, "-m", "gpt2_lora_jax.main", *args], capture_output=True,
                        text=True, env=env, timeout=timeout, cwd=REPO)


def one_line_error(result) -> str:
  """The stderr of a user error: exit 1, exactly one line 'error: ...', no traceback."""
  assert result.returncode == 1, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
  return lines[0]


@pytest.mark.parametrize("args, expected", [
    # A mistyped key: the suggestion, unescaped, and the flag it came from.
    (["--config.train.stepz=3"],
     "error: no config key 'stepz' (in --config.train.stepz); did you mean --config.train.steps,"),
    # A key named as in other trainers, in another section: the key of this config that means it
    # (issue 23: the learning rate is optim.lr, not train.*).
    (["--config.train.lerning_rate=1e-3"],
     "error: no config key 'lerning_rate' (in --config.train.lerning_rate); did you mean --config.optim.lr"),
    # A config file's argument it does not know.
    (["--config=configs/gpt2_hh.py:gpt3"],
     "configs/gpt2_hh.py:gpt3: choose one of ['gpt2', 'gpt2-large', 'gpt2-medium', 'gpt2-xl']"),
    # What configs/ holds, read from the directory (issue 23: a fixed list had missed two files).
    (["--config=configs/no_such.py"], "config file 'configs/no_such.py' (--config) does not exist; configs/ "
     "holds " + ", ".join(sorted(p.name for p in (REPO / "configs").iterdir() if p.suffix == ".py"))),
    (["--config.train.steps=abc"], "--config.train.steps=abc"),
])
def test_mistakes_on_the_command_line_are_one_line(tmp_path, args, expected):
  config = [a for a in args if a.startswith("--config=")] or [f"--config={TINY_CONFIG}"]
  rest = [a for a in args if not a.startswith("--config=")]
  workdir = tmp_path / "run"
  line = one_line_error(main_cli(*config, f"--workdir={workdir}", *rest))
  assert expected in line and "\\n" not in line and "\\'" not in line
  assert not workdir.exists()


def test_a_bad_value_found_after_the_workdir_was_made_leaves_no_workdir(tmp_path):
  workdir = tmp_path / "run"
  result = main_cli(f"--config={TINY_CONFIG}", f"--workdir={workdir}", "--mode=train",
                    "--config.lora.rank=-1")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  # validate() lists every bad value, one per line, under one error.
  assert result.stderr.startswith("error: invalid config:\n  lora.rank=-1: must be >= 0")
  assert not workdir.exists()


def test_show_config_lists_every_key_with_value_and_comment():
  result = main_cli(f"--config={TINY_CONFIG}", "--mode=show_config", "--config.train.steps=7")
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  from gpt2_lora_jax import config as config_lib
  flat_keys = []

  def walk(d, prefix=""):
    for k, v in d.items():
      if isinstance(v, dict) and v:
        walk(v, f"{prefix}{k}.")
      else:
        flat_keys.append(prefix + k)
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny_config", TINY_CONFIG)
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  walk(tiny.get_config().to_dict())
  assert sorted(re.match(r"([\w.]+) = ", l).group(1) for l in lines) == sorted(flat_keys)
  # Values are the overridden ones; comments are config.py's own, read from its source.
  source = open(config_lib.__file__).read()
  line = next(l for l in lines if l.startswith("train.steps = "))
  assert line.split("  #")[0].strip() == "train.steps = 7"
  eval_every = next(l for l in lines if l.startswith("train.eval_every = "))
  comment = eval_every.split("  # ", 1)[1]
  assert f"c.train.eval_every = 200  # {comment}\n" in source


def test_comma_separated_data_files(tmp_path):
  from gpt2_lora_jax import data
  from gpt2_lora_jax.config import default_config
  paths = []
  for name in ("a.jsonl", "b.jsonl"):
    (tmp_path / name).write_text('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello"}\n')
    paths.append(str(tmp_path / name))
  cfg = default_config().data
  cfg.source = "files"
  cfg.train_files = (",".join(paths),)  # what --config.data.train_files=a.jsonl,b.jsonl gives
  assert [name for name, _ in data._inputs(cfg, "train")] == paths


def test_progress_lines_without_a_terminal(tmp_path, capsys):
  from gpt2_lora_jax import metrics
  writer = metrics.MetricsWriter(str(tmp_path), total_steps=100, start_step=0)
  assert writer._bar is None  # pytest's stderr is not a terminal
  writer.write(10, "train", {"loss": 2.5, "tokens_per_s": 1234.0}, progress=True)
  writer.write(11, "train", {"loss": 2.4}, progress=False)  # not a log_every step: no line
  first = capsys.readouterr().err.strip().splitlines()
  assert first == ["step 10/100 (10%) | loss 2.5000 | 1,234 tokens/s"]
  # The ETA extrapolates from the first line: 10 steps took 9 s, 80 remain -> 72 s.
  line = writer.progress_line(20, {"loss": 2.25, "tokens_per_s": 1000.0}, writer._first_logged[0] + 9.0)
  assert line == "step 20/100 (20%) | loss 2.2500 | 1,000 tokens/s | ETA 1m12s"
  writer.close()
  assert len(metrics.read(os.path.join(tmp_path, metrics.METRICS_FILE))) == 2  # every step is recorded


def test_hub_fetches_one_weight_format():
  from gpt2_lora_jax import hub
  wanted = ["config.json", "model.safetensors"]
  gpt2_repo = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"]
  assert hub.weight_patterns(wanted, gpt2_repo) == ["config.json", "model.safetensors"]
  old_repo = ["config.json", "pytorch_model.bin", "vocab.json"]
  assert hub.weight_patterns(wanted, old_repo) == ["config.json", "pytorch_model.bin"]
  tokenizer_only = ["tokenizer.json", "vocab.json"]
  assert hub.weight_patterns(tokenizer_only, old_repo) == tokenizer_only


def test_offline_hub_error_does_not_suggest_going_offline(monkeypatch):
  from gpt2_lora_jax import hub
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(hub.HubUnreachableError) as e:
    hub.resolve("someone/not-in-the-cache", ["config.json"], what="GPT-2 model", flag="model.name")
  assert "set HF_HUB_OFFLINE=1" not in str(e.value) and "model.name" in str(e.value)


def test_an_unreachable_hub_fails_at_the_first_attempt(tmp_path):
  """A hub that never answers (here a local server that closes every connection unanswered, as a
  dead network or proxy would) gets one connection, not huggingface_hub's 6 attempts over 23 s, and
  the user sees the one-line error only (issue 23: 22 lines of retries first)."""
  import socket
  import threading
  server = socket.create_server(("127.0.0.1", 0))
  connections = []

  def accept():
    while True:
      try:
        conn, _ = server.accept()
      except OSError:  # the server was closed: the test is over
        return
      connections.append(1)
      conn.close()

  threading.Thread(target=accept, daemon=True).start()
  env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
  env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.getsockname()[1]}", NO_PROXY="127.0.0.1",
             HF_HOME=str(tmp_path / "hf"))
  code = ("from gpt2_lora_jax import hub\n"
          "try:\n  hub.resolve('openai-community/gpt2', ['config.json'], what='GPT-2 model', flag='--config.model.name')\n"
          "except hub.HubUnreachableError as e:\n  print(e)")
  try:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=120)
  finally:
    server.close()
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(connections) == 1
  # The server's close reaches the client as a closed connection or, when its request was already
  # sent, as a reset: which one depends on timing (both seen here, the second under load).
  assert result.stderr == "" and re.match(r"could not fetch GPT-2 model 'openai-community/gpt2' from the Hugging "
                                          r"Face hub \((RemoteProtocolError|ReadError)", result.stdout), result.stdout


def test_runs_keep_compiled_programs_in_the_persistent_cache(tmp_path):
  """By default under ~/.cache (HOME moved here; JAX_COMPILATION_CACHE_DIR, which conftest sets, is
  removed to see the default): a run leaves its compiled programs there."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  default = tmp_path / "home" / ".cache" / "gpt2_lora_jax" / "jax_compilation_cache"
  result = subprocess.run(
      [sys.executable, "-m", "gpt2_lora_jax.main", f"--config={TINY_CONFIG}", "--mode=train",
       f"--workdir={tmp_path / 'run'}", "--config.train.steps=1", "--config.train.eval_every=0",
       "--config.optim.warmup_steps=0"], capture_output=True, text=True, cwd=REPO, timeout=300,
      env={**env, "HOME": str(tmp_path / "home"), "JAX_PLATFORMS": "cpu",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert default.is_dir() and len(list(default.iterdir())) >= 1


def test_the_compilation_cache_flag_moves_or_turns_off_the_cache(tmp_path, monkeypatch):
  import jax
  from gpt2_lora_jax import main
  keys = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
          "jax_remove_custom_partitioning_ptr_from_cache_key")
  saved = {k: jax.config.values[k] for k in keys}
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/from/the/environment")
  try:
    main.use_compilation_cache(main.DEFAULT_COMPILATION_CACHE, given=False)  # the variable wins
    assert jax.config.values["jax_compilation_cache_dir"] == saved["jax_compilation_cache_dir"]
    main.use_compilation_cache(str(tmp_path / "elsewhere"), given=True)
    assert jax.config.values["jax_compilation_cache_dir"] == str(tmp_path / "elsewhere")
    assert jax.config.values["jax_remove_custom_partitioning_ptr_from_cache_key"]
    main.use_compilation_cache("", given=True)
    assert jax.config.values["jax_enable_compilation_cache"] is False
  finally:
    for k, v in saved.items():
      jax.config.update(k, v)
