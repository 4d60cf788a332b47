"""The attention dispatcher and the packed layout (segment ids -> lengths, offsets), on CPU.

cuDNN cannot run here: the layout is checked by rebuilding a dense mask from it (written below,
independently of the code under test) and comparing with the segment-causal mask; the choice of
kernel is checked from plain inputs per backend. benchmarks/gpu_check.sh compares the cuDNN
kernels themselves with XLA on a GPU.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_lora_jax import attention, packing
from gpt2_lora_jax import model as gpt2_model


def segment_causal_mask(segment_ids_BT):
  """(B, T, T): query t sees key s iff s <= t and both carry the same id (padding 0 included)."""
  seg = np.asarray(segment_ids_BT)
  T = seg.shape[1]
  causal = np.tril(np.ones((T, T), bool))
  return (seg[:, :, None] == seg[:, None, :]) & causal[None]


def mask_from_layout(seqlens_BM, offsets_BM1, T):
  """(B, T, T) rebuilt from the layout as cuDNN reads it: causal inside each listed segment."""
  seqlens, offsets = np.asarray(seqlens_BM), np.asarray(offsets_BM1)
  out = np.zeros((seqlens.shape[0], T, T), bool)
  for b in range(seqlens.shape[0]):
    for m in range(seqlens.shape[1]):
      if seqlens[b, m] < 0:
        assert offsets[b, m] == -1
        continue
      o, n = offsets[b, m], seqlens[b, m]
      out[b, o:o + n, o:o + n] = np.tril(np.ones((n, n), bool))
  return out


def random_rows(rng, B, T, max_conversations):
  """Packed-style rows: conversations 1..n of random lengths from the start, then padding (0)."""
  rows = np.zeros((B, T), np.int32)
  for b in range(B):
    n = int(rng.integers(0, max_conversations + 1))
    cuts = np.sort(rng.choice(np.arange(1, T + 1), size=n, replace=False)) if n else []
    if n and rng.random() < 0.3:
      cuts[-1] = T  # a row filled exactly: no padding run
    start = 0
    for segment, end in enumerate(cuts, start=1):
      rows[b, start:end] = segment
      start = end
  return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layout_rebuilds_the_segment_causal_mask(seed):
  rng = np.random.default_rng(seed)
  B, T, M = 12, 48, 6
  seg = random_rows(rng, B, T, max_conversations=M + 3)  # some rows exceed the table
  seqlens, offsets, overflow = jax.jit(attention.segment_layout, static_argnums=1)(seg, M)
  assert seqlens.shape == (B, M) and offsets.shape == (B, M + 1)
  assert seqlens.dtype == jnp.int32 and offsets.dtype == jnp.int32
  assert np.all(np.asarray(offsets)[:, -1] == -1)  # starts only: jax appends the end itself
  runs = np.array([1 + np.count_nonzero(np.diff(r)) for r in seg])
  np.testing.assert_array_equal(np.asarray(overflow), runs > M)
  assert overflow.any() and not overflow.all()  # both kinds of row occur
  fits = ~np.asarray(overflow)
  # Every position of a row that fits is in exactly one segment (padding is a segment too) ...
  np.testing.assert_array_equal(np.where(np.asarray(seqlens) > 0, seqlens, 0).sum(1)[fits], T)
  # ... and the segments give exactly the segment-causal mask, which the XLA path uses.
  want = segment_causal_mask(seg)
  got = mask_from_layout(seqlens, offsets, T)
  np.testing.assert_array_equal(got[fits], want[fits])
  xla_mask = np.asarray(gpt2_model.make_attention_mask(T, T, segment_ids=jnp.asarray(seg)))[:, 0]
  np.testing.assert_array_equal(xla_mask, want)


def test_packer_rows_fit_the_layout_the_model_sizes():
  """Rows packed under a cap of C need C + 1 segments (the padding run): the model's table."""
  rng = np.random.default_rng(3)
  lengths = rng.integers(2, 14, size=60)  # many short conversations: the cap binds
  cap, T = 4, 64
  ids = [np.arange(n + 1, dtype=np.int32) for n in lengths]
  packed = packing.pack(ids, [np.ones(n, bool) for n in lengths], list(range(len(ids))), T,
                        max_segments=cap)
  assert packed.segments_per_row.max() == cap
  seg = packed.segment_ids.astype(np.int32)
  config = gpt2_model.GPT2Config(max_segments_per_row=cap)
  seqlens, offsets, overflow = attention.segment_layout(seg, config.max_segments_per_row + 1)
  assert not np.asarray(overflow).any()
  np.testing.assert_array_equal(mask_from_layout(seqlens, offsets, T), segment_causal_mask(seg))


H100 = attention.Platform("gpu", cuda=True, compute_capability=(9, 0), cudnn_version=90800,
                          jax_version=(0, 11, 0), packed_api=True)
A100 = attention.Platform("gpu", cuda=True, compute_capability=(8, 0), cudnn_version=90800,
                          jax_version=(0, 11, 0), packed_api=True)
BF16 = jnp.bfloat16


@pytest.mark.parametrize("impl, kind, plat, dtype, head_dim, T, expected", [
    ("cudnn", "segments", attention.Platform("cpu"), BF16, 64, 1024, "xla"),  # CPU: always XLA
    ("auto", "causal", attention.Platform("cpu"), BF16, 64, 1024, "xla"),
    ("auto", "segments", attention.Platform("tpu"), BF16, 64, 1024, "xla"),
    ("cudnn", "segments", H100, BF16, 64, 1024, "cudnn_packed"),
    ("auto", "segments", H100, jnp.float16, 64, 1024, "cudnn_packed"),
    ("auto", "causal", H100, BF16, 64, 1024, "cudnn_causal"),
    ("auto", "dense", H100, BF16, 64, 1024, "xla"),  # the sampler's left-padded cache masks
    ("xla", "segments", H100, BF16, 64, 1024, "xla"),  # asked for
    ("cudnn", "segments", H100, jnp.float32, 64, 1024, "xla"),  # cuDNN takes half types only
    ("cudnn", "segments", H100, BF16, 60, 1024, "xla"),  # head size not a multiple of 8
    ("cudnn", "segments", H100, BF16, 160, 1024, "cudnn_packed"),  # <= 256 on 9.0+
    ("cudnn", "causal", A100, BF16, 160, 1024, "xla"),  # <= 128 before 9.0
    ("cudnn", "segments", A100, BF16, 64, 1024, "cudnn_mask"),  # packed layout needs 9.0+
    ("cudnn", "segments", A100, BF16, 64, 1023, "xla"),  # a bias needs an even length
    ("cudnn", "segments", attention.Platform("gpu", True, (9, 0), 90500, (0, 11, 0), True), BF16, 64,
     1024, "cudnn_mask"),  # cuDNN before 9.6.0
    ("cudnn", "segments", attention.Platform("gpu", True, (9, 0), 90800, (0, 11, 0), False), BF16,
     64, 1024, "cudnn_mask"),  # no packed entry point in this jax
    ("cudnn", "causal", attention.Platform("gpu", True, (7, 0), 90800, (0, 11, 0), True), BF16, 64,
     1024, "xla"),  # V100: no cuDNN flash attention
    ("cudnn", "segments", attention.Platform("gpu", False, (9, 0), 0, (0, 11, 0), True), BF16, 64,
     1024, "xla"),  # a ROCm GPU
])
def test_dispatcher_picks_the_expected_path(impl, kind, plat, dtype, head_dim, T, expected):
  assert attention.select_path(impl, kind, plat, dtype, head_dim, T, 32, log_fallbacks=False) == expected


def test_no_segment_cap_leaves_the_packed_layout_unused():
  assert attention.select_path("cudnn", "segments", H100, BF16, 64, 1024, 0, log_fallbacks=False) == "cudnn_mask"


def test_fallbacks_are_logged_once_with_their_reason(caplog):
  plat = attention.Platform("gpu", True, (8, 6), 90100, (0, 10, 2), True)
  with caplog.at_level(logging.WARNING, logger=attention.__name__):
    for _ in range(3):
      assert attention.select_path("cudnn", "segments", plat, BF16, 64, 512, 32) == "cudnn_mask"
  messages = [r.getMessage() for r in caplog.records]
  assert len(messages) == 1, messages
  assert "dense mask" in messages[0] and "(8, 6)" in messages[0] and "bias gradient" in messages[0]


def test_mask_kind():
  seg = jnp.ones((2, 8), jnp.int32)
  assert attention.mask_kind(8, 8, None, None, 0) == "causal"
  assert attention.mask_kind(8, 8, None, seg, 0) == "segments"
  assert attention.mask_kind(8, 16, jnp.ones((2, 16)), None, 0) == "dense"  # prefill over a cache
  assert attention.mask_kind(1, 16, jnp.ones((2, 16)), None, jnp.int32(5)) == "dense"  # decode
  assert attention.mask_kind(8, 8, jnp.ones((2, 8)), seg, 0) == "dense"


def test_cudnn_request_on_cpu_runs_the_xla_reference():
  """attention_impl='cudnn' on CPU: the same logits as 'xla', packed rows included (bf16)."""
  config = gpt2_model.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4,
                                 dtype="bfloat16")
  params = gpt2_model.init_params(config, jax.random.PRNGKey(0))
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 64)
  seg = jnp.asarray([[1] * 5 + [2] * 9 + [0] * 2, [1] * 16])
  run = lambda impl: jax.jit(gpt2_model.GPT2(config.replace(attention_impl=impl)).apply)(
      {"params": params}, ids, segment_ids=seg)
  assert attention.platform().backend == "cpu"
  assert gpt2_model.layer_mask(config.replace(attention_impl="cudnn"), 16, 16, None, seg).path == "xla"
  np.testing.assert_array_equal(np.asarray(run("cudnn"), np.float32), np.asarray(run("xla"), np.float32))


def test_layout_of_a_batch_sharded_over_the_mesh():
  """Rows split over 8 devices (as train batches are) give the layout of the unsplit batch."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  assert jax.device_count() >= 8
  seg = random_rows(np.random.default_rng(5), 16, 40, max_conversations=5)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = jax.device_put(jnp.asarray(seg), NamedSharding(mesh, P("data")))
  got = jax.jit(attention.segment_layout, static_argnums=1)(sharded, 7)
  want = attention.segment_layout(jnp.asarray(seg), 7)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  assert len(got[0].sharding.device_set) == 8


def reference_attention(q, k, v, mask):
  """jax's own XLA attention: the reference the project's einsum attention must equal."""
  if mask is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_xla_attention_equals_jax_reference_forward_and_backward(dtype, masked):
  rng = np.random.default_rng(7)
  B, T, H, K = 2, 24, 3, 16
  q, k, v, g = (jnp.asarray(rng.standard_normal((B, T, H, K)), dtype) for _ in range(4))
  seg = jnp.asarray(random_rows(rng, B, T, max_conversations=3))
  mask = jnp.asarray(segment_causal_mask(seg))[:, None] if masked else None

  def fwd_bwd(f):
    out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, mask), q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *vjp(g))]

  got = fwd_bwd(attention.xla_attention)
  want = fwd_bwd(reference_attention)
  # Measured on this CPU: fp32 differs by at most 4.8e-7 (values up to 3.8); bf16 is bit-equal.
  for a, b in zip(got, want):
    if dtype == jnp.float32:
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    else:
      np.testing.assert_array_equal(a, b)


def test_xla_attention_forces_no_dot_algorithm():
  """jax.nn.dot_product_attention pins BF16_BF16_F32 on bf16 dots; the project's path does not."""
  q = jnp.zeros((1, 8, 2, 8), jnp.bfloat16)

  def fwd_bwd(f):
    return lambda q: jax.vjp(lambda q: f(q, q, q, None), q)[1](q)

  assert "algorithm" in jax.jit(fwd_bwd(reference_attention)).lower(q).as_text()  # what it replaces
  text = jax.jit(fwd_bwd(attention.xla_attention)).lower(q).as_text()
  assert "algorithm" not in text
  assert "bf16" in text and "f32" in text  # bf16 operands, fp32 accumulation


def test_probe_agrees_for_xla_and_answers_failures_without_raising(monkeypatch):
  """probe() runs a kernel once per path against XLA: XLA agrees with itself even when first asked
  while a step is being traced; a kernel that raises (empty message included) is an answer, kept."""
  monkeypatch.setattr(attention, "_probe_results", {})
  assert attention.probe("xla") == ""
  seen = []
  jax.jit(lambda x: seen.append(attention.probe("cudnn_mask")) or x)(jnp.ones(2))
  assert seen[0].startswith("it failed on a test batch:"), seen  # no cuDNN on this CPU

  calls = []
  for error in (AssertionError(), NotImplementedError("not on this GPU"), RuntimeError("\n\n"),
                jax.errors.JaxRuntimeError("INTERNAL: cuDNN error\ndetails")):
    monkeypatch.setattr(attention, "_probe_results", {})

    def refuse(mask, q, k, v, error=error):
      calls.append(mask.path)
      raise error

    monkeypatch.setattr(attention, "_cudnn", refuse)
    for _ in range(3):
      problem = attention.probe("cudnn_packed")
    assert problem.startswith(f"it failed on a test batch: {type(error).__name__}: "), problem
    first_line = str(error).strip().split("\n")[0]
    assert problem.endswith(first_line or "(no message)"), problem
  assert calls == ["cudnn_packed"] * 4  # once per error kind: a failed probe is remembered


def test_a_wrong_kernel_fails_the_probe(monkeypatch):
  monkeypatch.setattr(attention, "_probe_results", {})
  # A kernel that ignores the segment mask (causal only) is wrong on the probe's packed row.
  monkeypatch.setattr(attention, "_cudnn", lambda mask, q, k, v: attention.xla_attention(q, k, v, None))
  assert attention.probe("cudnn_packed").startswith("its output differs from XLA's")


@pytest.mark.parametrize("problems, kind, expected", [
    ({}, "segments", "cudnn_packed"),
    ({"cudnn_packed": "it failed on a test batch: AssertionError: (no message)"}, "segments", "cudnn_mask"),
    ({"cudnn_packed": "x", "cudnn_mask": "y"}, "segments", "xla"),
    ({"cudnn_causal": "z"}, "causal", "xla"),
    ({"cudnn_packed": "x"}, "causal", "cudnn_causal"),
])
def test_a_failed_probe_falls_back(problems, kind, expected, caplog):
  attention._logged.clear()
  asked = []
  probe = lambda path: asked.append(path) or problems.get(path, "")
  with caplog.at_level(logging.WARNING, logger=attention.__name__):
    for _ in range(2):
      assert attention.select_path("auto", kind, H100, BF16, 64, 1024, 32, probe=probe) == expected
  logged = [r.getMessage() for r in caplog.records]
  assert len(logged) == (1 if problems.get({"segments": "cudnn_packed", "causal": "cudnn_causal"}[kind])
                         else 0), logged
  for problem in problems.values():
    if logged and problem in ("x", "z"):
      assert problem in logged[0]


def test_xla_impl_never_consults_the_platform(monkeypatch):
  def broken():
    raise AssertionError("platform() must not run for attention_impl='xla'")
  monkeypatch.setattr(attention, "platform", broken)
  config = gpt2_model.GPT2Config(n_embd=32, n_layer=1, n_head=4, dtype="bfloat16")
  seg = jnp.ones((2, 8), jnp.int32)
  assert gpt2_model.layer_mask(config, 8, 8, None, seg).path == "xla"


def test_rocm_is_not_read_as_cuda(monkeypatch):
  """A ROCm GPU reports names such as 'gfx90a', which are not CUDA compute capabilities."""
  class Device:
    platform, compute_capability = "gpu", "gfx90a"

  class Backend:
    platform_version = "rocm 6.2"

  from jax import extend as jax_extend
  monkeypatch.setattr(attention.jax, "devices", lambda *a: [Device()])
  monkeypatch.setattr(jax_extend.backend, "get_backend", lambda *a: Backend())
  attention.platform.cache_clear()
  try:
    plat = attention.platform()
  finally:
    attention.platform.cache_clear()
  assert plat == attention.Platform("gpu", False, (), 0, plat.jax_version, False)
  assert attention.select_path("cudnn", "segments", plat, BF16, 64, 1024, 32, log_fallbacks=False) == "xla"


def test_a_cudnn_call_refused_while_tracing_falls_back_to_xla(monkeypatch, caplog):
  def refuse(mask, q, k, v):
    raise NotImplementedError()
  monkeypatch.setattr(attention, "_cudnn", refuse)
  attention._logged.clear()
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 8)), jnp.float32) for _ in range(3))
  seg = jnp.asarray(random_rows(rng, 2, 16, max_conversations=3))
  want = reference_attention(q, k, v, jnp.asarray(segment_causal_mask(seg))[:, None])
  with caplog.at_level(logging.WARNING, logger=attention.__name__):
    for path in ("cudnn_packed", "cudnn_mask", "cudnn_causal"):
      mask = attention.build_mask(path, jnp.asarray(segment_causal_mask(seg))[:, None], seg, 4)
      got = jax.jit(attention.attend)(q, k, v, mask)
      ref = want if path != "cudnn_causal" else reference_attention(q, k, v, None)
      np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-6)
  messages = [r.getMessage() for r in caplog.records]
  assert len(messages) == 3 and all("NotImplementedError: (no message)" in m for m in messages), messages


def test_the_probe_lowers_for_cuda_inside_a_trace(simulated_gpu):
  """The H200 crash: the probe lowered cuDNN's packed layout inside ensure_compile_time_eval, which
  turned jax's iotas into constants that custom_partitioning refuses (an AssertionError with an empty
  message). The probe's program now lowers for CUDA with the cuDNN calls, also mid-trace."""
  simulated_gpu()
  expected = {"cudnn_packed": "__cudnn$fmhaSoftmax", "cudnn_mask": "__cudnn$fmhaScaleBiasSoftmax",
              "cudnn_causal": "__cudnn$fmhaSoftmax"}
  for path, call in expected.items():
    text = attention.probe_lowered(path, ("cuda",)).as_text()
    assert call in text and call + "Backward" in text, path
  texts = []
  jax.jit(lambda x: texts.append(attention.probe_lowered("cudnn_packed", ("cuda",)).as_text()) or x)(
      jnp.ones(2))
  assert "__cudnn$fmhaSoftmax" in texts[0]
  with pytest.raises(AssertionError):  # the old way, kept here as the reproduction
    with jax.ensure_compile_time_eval():
      attention.probe_lowered("cudnn_packed", ("cuda",))


@pytest.mark.parametrize("config_file, arg", [("gpt2_hh.py", "gpt2-xl"), ("seed_study.py", None),
                                              ("dpo_hh.py", "gpt2")])
def test_the_configs_users_run_on_gpus_take_the_gpu_kernels(config_file, arg):
  import importlib.util
  from conftest import REPO
  spec = importlib.util.spec_from_file_location("cfg", REPO / "configs" / config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  assert config.model.attention_impl == "auto"


# --- the sampler's KV cache: mask kind 'lengths', path cudnn_lengths -----------------------------

def cache_mask(T, S, kv_lengths, offsets):
  """(B, T, S) from the definition: query t of row b sits at slot offsets[b] + t and sees slot s
  iff s <= offsets[b] + t and s < kv_lengths[b]."""
  out = np.zeros((len(kv_lengths), T, S), bool)
  for b, (n, o) in enumerate(zip(kv_lengths, offsets)):
    for t in range(T):
      out[b, t, :max(0, min(n, o + t + 1))] = True
  return out


def lengths_as_cudnn_reads_them(mask, T, S):
  """(B, T, S) from a cudnn_lengths Mask as jax documents the call: keys s < kv_length; with
  is_causal also s <= t (only the first T slots are passed then, so slots >= T are unseen)."""
  kv = np.asarray(mask.kv_lengths_B)
  s_, t_ = np.arange(S)[None, None, :], np.arange(T)[None, :, None]
  seen = s_ < kv[:, None, None]
  return seen & (s_ <= t_) & (s_ < T) if mask.causal else np.broadcast_to(seen, (len(kv), T, S))


def test_the_cache_masks_are_kv_lengths():
  """The sampler's prefill (a chunk from slot 0) and decode (one query per row at its own slot)
  masks, as cudnn_lengths states them and as the XLA path builds them, equal the definition."""
  T, S = 12, 20
  kv_prefill = np.array([1, 7, 12, 5], np.int32)
  slots = np.array([1, 13, 19, 6], np.int32)  # decode: row b's query at its own slot
  short = np.maximum(slots - 4, 1)  # kv lengths short of the query's own slot
  for T_, kv, offset, offsets in ((T, kv_prefill, 0, [0] * 4), (1, slots + 1, slots, slots),
                                  (1, short, slots, slots)):
    want = cache_mask(T_, S, kv, offsets)
    assert want.any(-1).all() or T_ == 1  # every prefill query sees a key
    cudnn = attention.build_lengths_mask("cudnn_lengths", T_, S, jnp.asarray(kv), offset)
    assert cudnn.dense_B1TS is None and cudnn.causal == (T_ > 1)
    np.testing.assert_array_equal(lengths_as_cudnn_reads_them(cudnn, T_, S), want)
    xla = attention.build_lengths_mask("xla", T_, S, jnp.asarray(kv), offset)
    np.testing.assert_array_equal(np.asarray(xla.dense_B1TS)[:, 0], want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_cudnn_lengths_call_equals_xla_attention_on_the_cache_mask(dtype):
  """The exact call cudnn_lengths makes (per-row kv lengths, causal on the first T slots), run on
  jax's XLA implementation, equals the project's XLA attention with the dense cache mask, and an
  attend() whose cuDNN call is refused while tracing falls back to the same numbers."""
  rng = np.random.default_rng(4)
  B, T, S, H, K = 3, 10, 24, 2, 16
  q = jnp.asarray(rng.standard_normal((B, T, H, K)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((B, S, H, K)), dtype) for _ in range(2))
  prefill_kv, slots = jnp.asarray([1, 6, 10], jnp.int32), jnp.asarray([3, 17, 23], jnp.int32)
  for q_, T_, kv, offset in ((q, T, prefill_kv, 0), (q[:, -1:], 1, slots + 1, slots)):
    mask = attention.build_lengths_mask("cudnn_lengths", T_, S, kv, offset)
    as_called = lambda m, q, k, v: attention.lengths_attention(m, q, k, v, implementation="xla")
    got = jax.jit(as_called)(mask, q_, k, v)
    dense = jnp.asarray(cache_mask(T_, S, kv, np.broadcast_to(offset, B)))[:, None]
    want = jax.jit(attention.xla_attention)(q_, k, v, dense)
    # Measured on this CPU: fp32 differs by at most 3.0e-7 (values up to 2.9); bf16 is bit-equal.
    if dtype == jnp.float32:
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)
    else:
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    fell_back = jax.jit(attention.attend)(q_, k, v, mask)  # no cuDNN here: jax refuses, XLA runs
    np.testing.assert_array_equal(np.asarray(fell_back), np.asarray(want))


def test_the_dispatcher_puts_the_cache_masks_on_cudnn_on_gpus_only(caplog):
  seg, kv = jnp.ones((2, 8), jnp.int32), jnp.ones((2,), jnp.int32)
  assert attention.mask_kind(8, 24, None, None, 0, kv) == "lengths"  # prefill from slot 0
  assert attention.mask_kind(1, 24, None, None, jnp.asarray([3, 9]), kv) == "lengths"  # decode
  assert attention.mask_kind(8, 24, None, None, jnp.int32(4), kv) == "dense"  # a later chunk
  with pytest.raises(ValueError, match="kv_lengths"):
    attention.mask_kind(8, 8, None, seg, 0, kv)
  pick = lambda impl, plat, dtype=BF16, head_dim=64, probe=None: attention.select_path(
      impl, "lengths", plat, dtype, head_dim, 1, 32, log_fallbacks=False, probe=probe)
  assert pick("auto", H100) == pick("cudnn", H100) == pick("cudnn", A100) == "cudnn_lengths"
  assert pick("auto", H100, dtype=jnp.float16) == "cudnn_lengths"
  assert pick("xla", H100) == "xla"
  for plat in (attention.Platform("cpu"), attention.Platform("tpu"),
               attention.Platform("gpu", False, (), 0, (0, 11, 0), False)):  # CPU, TPU, ROCm
    assert pick("auto", plat) == pick("cudnn", plat) == "xla"
  assert pick("auto", H100, dtype=jnp.float32) == "xla" and pick("auto", H100, head_dim=60) == "xla"
  attention._logged.clear()
  problem = "it failed on a test batch: NotImplementedError: (no message)"
  failed = lambda path: problem if path == "cudnn_lengths" else ""
  with caplog.at_level(logging.WARNING, logger=attention.__name__):
    for _ in range(2):
      assert attention.select_path("auto", "lengths", H100, BF16, 64, 1, 32, probe=failed) == "xla"
  logged = [r.getMessage() for r in caplog.records]
  assert len(logged) == 1 and "kv lengths" in logged[0] and "NotImplementedError" in logged[0], logged


def test_the_cudnn_lengths_probe(monkeypatch):
  """Run here it fails without raising (no cuDNN), and it tells the call cudnn_lengths makes (run
  on XLA) from one that ignores the lengths. Its program lowers for CUDA to a prefill (causal + kv
  lengths) and a decode (kv lengths) cuDNN call, forward only (next test)."""
  monkeypatch.setattr(attention, "_probe_results", {})
  assert attention.probe("cudnn_lengths").startswith("it failed on a test batch:")
  monkeypatch.setattr(attention, "_probe_results", {})
  monkeypatch.setattr(attention, "_cudnn", lambda mask, q, k, v: attention.lengths_attention(
      mask, q, k, v, implementation="xla"))
  assert attention.probe("cudnn_lengths") == ""
  monkeypatch.setattr(attention, "_probe_results", {})
  monkeypatch.setattr(attention, "_cudnn", lambda mask, q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=mask.causal, implementation="xla"))  # the lengths dropped
  assert attention.probe("cudnn_lengths").startswith("its prefill output differs from XLA's")


def test_the_cudnn_lengths_probe_lowers_for_cuda(simulated_gpu):
  simulated_gpu()
  text = attention.probe_lowered("cudnn_lengths", ("cuda",)).as_text()
  import re
  assert re.findall(r"__cudnn\$\w+", text) == ["__cudnn$fmhaSoftmax"] * 2
  assert sorted(re.findall(r'mask_type\\22: \\22(\w+)\\22', text)) == ["PADDING", "PADDING_CAUSAL"]


@pytest.mark.parametrize("error, expected", [
    (AssertionError(), "AssertionError: (no message)"),
    (RuntimeError("\n  \n"), "RuntimeError: (no message)"),
    (ValueError("\nsecond line first\nthird"), "ValueError: second line first"),
])
def test_describe_exception_never_raises_on_empty_messages(error, expected):
  from gpt2_lora_jax.errors import describe_exception
  assert describe_exception(error) == expected
