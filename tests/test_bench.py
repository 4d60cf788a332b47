"""The benchmark harness end to end at a tiny size (CPU), and the FLOP formula against a hand count.

No test asserts a duration: only that times are positive and that derived fields follow from them.
"""
import json
import math

import jax
import numpy as np
import pytest

from gpt2_lora_jax import flops, lora
from gpt2_lora_jax.bench import harness
from gpt2_lora_jax import model as gpt2_model

D, L, H, T, B, V, R = 64, 2, 4, 32, 2, 50257, 8  # width, layers, heads, seq, batch, vocab, rank
NEW_TOKENS = 8
TINY_FLAGS = [f"--n_layer={L}", f"--n_embd={D}", f"--n_head={H}", f"--batch_size={B}", f"--seq_len={T}",
              "--warmup_steps=1", "--timed_steps=2", "--matmul_n=256", "--num_devices=2",
              "--decode_batch_sizes=1,2", f"--decode_new_tokens={NEW_TOKENS}", "--decode_prompt_len=16",
              "--decode_repeats=1", "--score_pairs=4", "--score_words=20", "--compare=peft",
              "--no_compile"]  # torch.compile is minutes on CPU; the GPU check runs it


def hand_count(rank: int, vocab=V, width=D, layers=L, seq=T) -> float:
  """FLOPs per trained token, written out: 2 per weight forward, 2 more backward for the
  activation gradient, 2 more when the weight trains; attention 4*T*D per layer forward, x3."""
  per_layer_weights = (width * 3 * width      # attn/c_attn (D, 3D)
                       + width * width        # attn/c_proj (D, D)
                       + width * 4 * width    # mlp/c_fc (D, 4D)
                       + 4 * width * width)   # mlp/c_proj (4D, D)   = 12 D^2
  head = width * vocab  # the tied lm_head (D, V); the embedding lookup itself is free
  base = layers * per_layer_weights + head
  attention = 4 * seq * width * layers * 3  # scores + weighted sum over the full T x T square
  if rank == 0:  # full fine-tuning: every weight trains
    return 6 * base + attention
  adapters_per_layer = (rank * (width + 3 * width)     # c_attn: A (D, r) + B (r, 3D)
                        + rank * (width + width)       # attn c_proj
                        + rank * (width + 4 * width)   # c_fc
                        + rank * (4 * width + width))  # mlp c_proj   = 16 r D
  return 4 * base + 6 * layers * adapters_per_layer + attention  # frozen base: no weight grads


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """One CLI run (in-process main) with every part and the PEFT comparison; returns (json, md)."""
  out_dir = tmp_path_factory.mktemp("bench_results")
  assert harness.main(TINY_FLAGS + [f"--out_dir={out_dir}", "--tag=test"]) == 0
  json_files = list(out_dir.glob("bench_cpu_*.json"))
  md_files = list(out_dir.glob("bench_cpu_*.md"))
  assert len(json_files) == 1 and len(md_files) == 1, list(out_dir.iterdir())
  return json.loads(json_files[0].read_text()), md_files[0].read_text()


def _is_fraction_or_none(x):
  return x is None or (isinstance(x, float) and 0.0 < x)


def test_train_result_has_every_field(cli_run):
  result, _ = cli_run
  assert result["device"]["platform"] == "cpu" and result["device"]["device_kind"]
  assert result["config"]["batch_size"] == B and result["config"]["lora_targets"] == ["c_attn", "c_proj", "c_fc"]
  assert result["matmul"]["n"] == 256 and result["matmul"]["flops_per_s"] > 0
  row = result["train"]["jax"]
  expected = {"step_time_s", "step_times_s", "tokens_per_s", "flops_per_token", "flops_per_step",
              "xla_cost_flops_per_step", "achieved_flops_per_s_per_device", "peak_flops_spec", "mfu_spec",
              "mfu_matmul", "peak_bytes_in_use", "memory_analysis", "compile_s", "final_loss",
              "trainable_params", "total_params", "num_devices", "dtype", "param_dtype"}
  assert expected <= set(row), expected - set(row)
  assert row["step_time_s"] > 0 and len(row["step_times_s"]) == 2
  assert math.isclose(row["tokens_per_s"], B * T / row["step_time_s"], rel_tol=1e-9)
  assert row["dtype"] == "float32" and row["num_devices"] == 2
  assert row["peak_flops_spec"] is None and row["mfu_spec"] is None  # no spec peak for a CPU
  assert _is_fraction_or_none(row["mfu_matmul"])
  assert math.isclose(row["mfu_matmul"], row["achieved_flops_per_s_per_device"] / result["matmul"]["flops_per_s"])
  assert row["peak_bytes_in_use"] is None  # CPU devices keep no allocator statistics
  mem = row["memory_analysis"]
  assert {"temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"} <= set(mem)
  assert mem["argument_size_in_bytes"] > 0
  assert row["compile_s"] > 0 and np.isfinite(row["final_loss"])
  assert row["flops_per_token"]["total"] == hand_count(R)
  assert row["flops_per_step"] == hand_count(R) * B * T
  # XLA's own count agrees with the formula to a few percent (it adds softmax, norms, the loss).
  assert abs(row["xla_cost_flops_per_step"] / row["flops_per_step"] - 1) < 0.25
  assert row["trainable_params"] == 16 * R * D * L


def test_peft_comparison_row_and_ratio(cli_run):
  result, markdown = cli_run
  jax_row, peft_row = result["train"]["jax"], result["train"]["peft_eager"]
  assert "error" not in peft_row, peft_row.get("error")
  assert "peft_compile" not in result["train"]  # --no_compile
  assert peft_row["step_time_s"] > 0 and peft_row["compute"] == "fp32"
  assert math.isclose(peft_row["tokens_per_s"], B * T / peft_row["step_time_s"], rel_tol=1e-9)
  assert peft_row["trainable_params"] == jax_row["trainable_params"]  # the same adapters
  assert peft_row["total_params"] == jax_row["total_params"]
  assert _is_fraction_or_none(peft_row["mfu_matmul"]) and peft_row["mfu_spec"] is None
  ratio = peft_row["jax_over_this_tokens_per_s"]
  assert math.isclose(ratio, jax_row["tokens_per_s"] / peft_row["tokens_per_s"])
  table_row = next(line for line in markdown.splitlines() if line.startswith("| peft_eager |"))
  assert table_row.rstrip(" |").endswith(f"{ratio:.2f}")
  assert "JAX / this tok/s" in markdown and "| jax |" in markdown


def test_decode_and_score(cli_run):
  result, markdown = cli_run
  for impl in ("jax_sampler", "hf_generate"):
    rows = result["decode"][impl]
    assert [r["batch_size"] for r in rows] == [1, 2], rows
    for r in rows:
      assert r["new_tokens"] == NEW_TOKENS  # end-of-text never cut a row short
      assert r["seconds"] > 0
      assert math.isclose(r["tokens_per_s"], r["batch_size"] * NEW_TOKENS / r["seconds"])
  assert result["decode"]["jax_sampler"][0]["jax_over_hf_tokens_per_s"] > 0
  score = result["score"]
  assert "error" not in score, score.get("error")
  assert score["pairs"] == 4 and score["sequences_per_s"] > 0 and score["mean_tokens"] > 0
  assert "| jax_sampler | 2 |" in markdown and "sequences/s" in markdown


def test_full_fine_tuning_run_and_flops():
  result = harness.run_benchmark(n_layer=L, n_embd=D, n_head=H, vocab_size=512, batch_size=B, seq_len=T,
                               lora_rank=0, warmup_steps=1, timed_steps=1, matmul_n=128, num_devices=1,
                               parts=("train",), out_dir="")
  row = result["train"]["jax"]
  assert "files" not in result and list(result["train"]) == ["jax"]
  assert row["trainable_params"] == row["total_params"]
  assert row["flops_per_token"]["total"] == hand_count(0, vocab=512)


@pytest.mark.parametrize("rank", [0, R])
def test_flop_formula_matches_hand_count(rank):
  config = gpt2_model.GPT2Config(n_layer=L, n_embd=D, n_head=H, vocab_size=V)
  params = gpt2_model.param_shapes(config)
  cfg = lora.LoraConfig(rank=rank, targets=("c_attn", "c_proj", "c_fc"))
  params = lora.add(params, cfg, jax.random.PRNGKey(0)) if rank else params
  counted = flops.train_flops_per_token(params, lora.labels(params, cfg), L, D, T)
  assert counted["total"] == hand_count(rank)
  base = L * 12 * D * D + D * V
  adapters = L * 16 * R * D if rank else 0
  assert counted["forward"] == 2 * base + 2 * adapters + 4 * T * D * L  # 2 FLOPs per weight forward
  # LoRA at this size saves about a third of full fine-tuning's work (frozen weight gradients dropped).
  if rank:
    assert counted["total"] < hand_count(0)


def test_cli_flags_parse():
  cfg = harness.parse_args(["--preset=gpt2-xl", "--batch_size=8", "--lora_targets=c_attn,c_fc",
                          "--parts=train,decode", "--decode_batch_sizes=1,64", "--no_compile",
                          "--no_segment_ids", "--lora_alpha=32"])
  assert cfg.preset == "gpt2-xl" and cfg.batch_size == 8 and cfg.lora_alpha == 32.0
  assert cfg.lora_targets == ("c_attn", "c_fc") and cfg.parts == ("train", "decode")
  assert cfg.decode_batch_sizes == (1, 64)
  assert cfg.torch_compile is False and cfg.segment_ids is False
  with pytest.raises(ValueError, match="parts"):
    harness.BenchConfig(parts=("train", "speed"))


def test_user_setting_is_what_configs_gpt2_hh_runs():
  """bench.settings reads configs/gpt2_hh.py without ml_collections: it must agree with the loaded config."""
  import importlib.util
  import pathlib
  from gpt2_lora_jax.bench import settings
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "gpt2_hh.py"
  spec = importlib.util.spec_from_file_location("gpt2_hh_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for size in module.RECIPE:
    c = module.get_config(size)
    assert settings.user_settings(size) == {
        "lora_rank": c.lora.rank, "lora_alpha": c.lora.alpha, "lora_dropout": c.lora.dropout,
        "lora_dropout_rng": c.lora.dropout_rng, "lora_fused_matmul": c.lora.fused_matmul,
        "lora_targets": tuple(c.lora.targets), "scan_layers": c.model.scan_layers, "remat": c.model.remat,
        "attention": c.model.attention_impl, "dtype": c.model.dtype, "param_dtype": c.model.base_param_dtype}
  cfg = harness.BenchConfig(preset="gpt2-xl", setting="user", lora_rank=4)
  assert cfg.lora_rank == 16 and cfg.remat == "auto" and cfg.scan_layers  # the setting wins
  cfg = harness.BenchConfig(setting="like_peft", lora_rank=4, remat="full")
  assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.remat, cfg.scan_layers) == (8, 16.0, 0.0, "none", False)


# --- the benchmark's setup: its random init, and what it compiles before the first step -------------

def expected_init(path, shape, lora_cfg):
  """How each leaf should be drawn, written out: normal(0.02) for kernels and the token embedding
  (Hugging Face's initializer_range), normal(0.01) for the position embedding (OpenAI's GPT-2), layer
  norms at scale 1 and bias 0, linear biases 0; LoRA A (in, r) U(+-1/sqrt(in)) as PEFT's
  kaiming_uniform(a=sqrt(5)) or N(0, 1/r^2) ('gaussian'), B 0."""
  name = path[-1]
  if name == "lora_b" or name == "bias":
    return ("zeros", None)
  if name == "scale":
    return ("ones", None)
  if name == "lora_a":
    return ("uniform", 1 / math.sqrt(shape[-2])) if lora_cfg.init == "kaiming_uniform" else ("normal", 1 / lora_cfg.rank)
  return ("normal", 0.01 if path[0] == "wpe" else 0.02)


def test_benchmark_init_draws_every_leaf_as_the_model_and_lora_do():
  """run_setup's one-program init (every kind of leaf drawn once for all blocks): the tree of
  model.init_params + lora.add (paths, shapes, dtypes), stacked or per layer with the same values, and
  each leaf's statistics against expected_init: zeros and ones exactly; a normal leaf's sample sd
  within 5 standard errors (std / sqrt(2 n)) and mean within 5 std / sqrt(n); a uniform leaf inside
  its bound, its max |a| within the bound's last 10/n, its sd within 5 standard errors of
  bound / sqrt(3) (relative error 1 / sqrt(5 n)); blocks drawn independently (correlation of two
  blocks' values within 5 / sqrt(n))."""
  from flax import traverse_util
  from gpt2_lora_jax import stacking
  from gpt2_lora_jax.bench import run_setup
  import dataclasses
  cfg = harness.BenchConfig(n_layer=3, n_embd=64, n_head=4, vocab_size=512, lora_rank=8, side="jax", out_dir="")
  config = run_setup.gpt2_config(cfg).replace(param_dtype="bfloat16")
  lora_cfg = run_setup._lora_config(cfg)
  assert lora_cfg.init == "kaiming_uniform"
  per_layer = run_setup._init_with_adapters(config, lora_cfg, 0, False)
  stacked = run_setup._init_with_adapters(config, lora_cfg, 0, True)
  want = jax.eval_shape(lambda: lora.add(gpt2_model.init_params(config, jax.random.PRNGKey(0)), lora_cfg,
                                         jax.random.PRNGKey(1)))
  shape_of = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shape_of(per_layer) == shape_of(want)
  assert jax.tree.all(jax.tree.map(np.array_equal, stacking.unstack_layers(stacked), per_layer))
  for path, value in traverse_util.flatten_dict(stacked).items():
    x = np.asarray(value, np.float64)
    kind, scale = expected_init(path, x.shape, lora_cfg)
    n = x.size
    if kind in ("zeros", "ones"):
      assert np.all(x == (0.0 if kind == "zeros" else 1.0)), path
    elif kind == "normal":
      assert abs(x.std() / scale - 1) < 5 / np.sqrt(2 * n), (path, x.std(), scale)
      assert abs(x.mean()) < 5 * scale / np.sqrt(n), (path, x.mean())
    else:
      assert np.abs(x).max() <= scale and np.abs(x).max() > scale * (1 - 10 / n), (path, np.abs(x).max(), scale)
      assert abs(x.std() / (scale / np.sqrt(3)) - 1) < 5 / np.sqrt(5 * n), (path, x.std(), scale)
    if path[0] == "h" and kind != "zeros" and kind != "ones":
      a, b = x[0].ravel(), x[1].ravel()
      assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size), path
  gaussian = dataclasses.replace(lora_cfg, init="gaussian")  # the other A init: its rule (drawn as above)
  a = jax.ShapeDtypeStruct((3, 64, 8), np.float32)
  assert run_setup.init_rule(gaussian)(("h", "attn", "c_attn", "lora_a"), a) == expected_init(("lora_a",), a.shape, gaussian)


# The programs XLA compiles while the benchmark sets up a run (run_setup.train_setup, then the path
# label of run_setup.attention_path), whatever the depth or the blocks' layout:
SETUP_PROGRAMS = sorted([
    "jit(_init_with_adapters)",  # base + adapters, one program (weights.draw_params)
    "jit(<lambda>)", "jit(<lambda>)",  # sharding.put: the trainable leaves, then the frozen ones
    "jit(convert_element_type)",  # optax.tree_map_params runs Adam's init eagerly: its int32 count
    "jit(init_fn)",  # the optimizer state (train.init_state)
    "jit(stage)", "jit(_threefry_seed)",  # jax.random.PRNGKey(seed) of the step's RNG, run eagerly
])


@pytest.mark.parametrize("n_layer, scan", [(2, True), (4, False)])
def test_setup_compiles_a_fixed_set_of_programs(simulated_gpu, n_layer, scan):
  """On a simulated H200 with attention 'auto' (packed rows take cuDNN's packed layout), setting up a
  benchmark case compiles SETUP_PROGRAMS and nothing else: no operation runs op by op outside jit (the
  path label once built the packed layout eagerly, an XLA program per operation: the H200's 30 s
  setup). jax's caches are cleared first, so programs of earlier tests count again."""
  from gpt2_lora_jax.bench import run_setup
  simulated_gpu()
  cfg = harness.BenchConfig(n_layer=n_layer, n_embd=64, n_head=4, batch_size=2, seq_len=64, side="jax", num_devices=1,
                            out_dir="", segments="hh", max_segments=4, attention="auto", scan_layers=scan,
                            dtype="bfloat16", param_dtype="bfloat16")
  jax.clear_caches()
  with run_setup.compiled_programs() as programs:
    run = run_setup.train_setup(cfg)
    path = run_setup.attention_path(run.config, cfg, run.host_batch["segment_ids"])
  assert path == "cudnn_packed"
  assert sorted(programs) == SETUP_PROGRAMS
  with run_setup.compiled_programs() as programs:  # what the label cost before: the mask, eagerly
    gpt2_model.layer_mask(run.config, cfg.seq_len, cfg.seq_len, None, run.host_batch["segment_ids"])
  assert "jit(cumsum)" in programs and len(programs) > len(SETUP_PROGRAMS), programs


def test_case_phases_record_errors_and_timeouts(tmp_path, monkeypatch):
  """A phase that raises with an empty message and one that never returns are both recorded, and
  the summary folds them into one status per case; a cut-short last line is counted, not read."""
  import threading
  from gpt2_lora_jax.bench import records as record_log, summary as run_summary
  log = tmp_path / "preflight.jsonl"
  monkeypatch.setenv("GPU_CHECK_RECORDS", str(log))
  monkeypatch.setenv("GPU_CHECK_STAGE", "preflight")

  def empty_assert(_):
    raise AssertionError()  # str(e) == ""

  never = threading.Event()
  ok = [("lower", lambda _: (1, {"dots": 3})), ("compile", lambda v: (v + 1, {}))]
  assert record_log.run_phases("preflight", "good", ok, 30.0)["status"] == "ok"
  assert record_log.run_phases("preflight", "bad", ok[:1] + [("compile", empty_assert)], 30.0)["status"] == \
      "error in compile: AssertionError"
  assert record_log.run_phases("preflight", "hangs", [("compile", lambda _: never.wait())], 0.2)["status"] == \
      "timeout in compile"
  never.set()
  with open(log, "a") as f:
    f.write('{"stage": "preflight", "kind": "prefl')  # a line a SIGKILL cut short
  records, bad = record_log.read(str(log))
  assert bad == 1 and [(r["case"], r["phase"]) for r in records] == [
      ("good", "lower"), ("good", "compile"), ("bad", "lower"), ("bad", "error"), ("hangs", "timeout")]
  assert records[0]["dots"] == 3 and records[3]["error"] == "AssertionError" and records[3]["in_phase"] == "compile"
  rows = {r["case"]: r for r in run_summary.fold_cases(records, "preflight")}
  assert rows["good"]["status"] == "stopped after compile"  # no second step was recorded
  assert rows["bad"]["status"] == "error in compile: AssertionError" and rows["bad"]["lower_s"] >= 0
  assert rows["hangs"]["status"].startswith("timeout in compile")
  summary = run_summary.summarize(str(tmp_path), "run", ["preflight"])  # reads tmp_path/*.jsonl
  assert summary["unreadable_record_lines"] == 1
  met = {t["target"].split()[1]: t["met"] for t in summary["targets"]}
  assert met == {"good": False, "bad": False, "hangs": False}  # none ran a step; a hung path fails
  assert summary["stages"] == [{"stage": "preflight", "status": "not run (yet)", "seconds": 0.0, "limit_s": 0.0}]


def test_gpu_check_modules_import_neither_ml_collections_nor_datasets():
  """The GPU machine has neither package: the script's modules must not import them at import time."""
  import subprocess
  import sys
  code = ("import sys; import gpt2_lora_jax.bench.harness, gpt2_lora_jax.bench.peft_peer, "
          "gpt2_lora_jax.bench.report, gpt2_lora_jax.bench.attention_check, gpt2_lora_jax.reward, "
          "gpt2_lora_jax.bench.preflight, gpt2_lora_jax.bench.xla_attention, gpt2_lora_jax.bench.summary, "
          "gpt2_lora_jax.bench.records, gpt2_lora_jax.bench.settings, gpt2_lora_jax.bench.torch_runner, "
          "gpt2_lora_jax.bench.dpo_step; "
          "bad = {'ml_collections', 'datasets'} & set(sys.modules); assert not bad, bad")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_hh_like_rows_follow_the_packer_and_the_quantiles():
  from gpt2_lora_jax.bench import attention_check
  lengths = attention_check.hh_like_lengths(np.random.default_rng(0), 20000, 1024)
  assert abs(np.median(lengths) - 133) <= 3 and abs(np.percentile(lengths, 90) - 340) <= 8
  seg = attention_check.hh_like_segment_ids(0, 16, 1024, 32)
  assert seg.shape == (16, 1024) and seg.max() <= 32
  for row in seg:  # ids 1..n from the start, then padding 0 at the end only
    runs = row[np.r_[True, row[1:] != row[:-1]]]
    n = row.max()
    np.testing.assert_array_equal(runs[:n], np.arange(1, n + 1))
    assert list(runs[n:]) in ([], [0])
