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


def test_the_packed_layout_probe_passes_a_correct_kernel_and_names_a_failing_one():
  """platform() runs probe_packed_layout('cudnn_packed') on a GPU before choosing it; here the
  probe itself is checked: XLA against XLA agrees, even while a step is being traced; a kernel
  that cannot run is reported, not raised."""
  assert attention.probe_packed_layout("xla") == ""
  seen = []
  jax.jit(lambda x: seen.append(attention.probe_packed_layout("xla")) or x)(jnp.ones(2))
  assert seen == [""]
  problem = attention.probe_packed_layout("cudnn_causal")  # no cuDNN on CPU
  assert problem.startswith("it failed on a test batch:"), problem
