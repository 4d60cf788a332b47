"""The 'pallas' attention path (flash.py): jax's Pallas flash-attention kernels with segment ids.

On this CPU the kernels run in Pallas' interpreter (interpret=True), against the XLA reference with
model.make_attention_mask's mask, forward and all three gradients, on one device and split over a
4-device mesh; the train step with attention_impl='pallas' is lowered for CUDA on a simulated
H100/H200 and must hold Triton calls and no cuDNN call."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_lora_jax import attention, flash, sharding
from gpt2_lora_jax import model as gpt2_model
from test_gpu_lowering import T as LOWER_T, cuda, gpt2_config, train_program


def packed_ids(B, T, seed=0):
  """Rows of 1-4 conversations of random lengths, then padding (id 0), as the packer lays them out."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((B, T), np.int32)
  for b in range(B):
    cuts = np.sort(rng.choice(np.arange(8, T - 8), rng.integers(1, 4), replace=False))
    end = int(rng.integers(T // 2, T + 1))
    bounds = [0, *[c for c in cuts if c < end], end]
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
      seg[b, s:e] = i + 1
  return seg


def reference(q, k, v, seg):
  T = q.shape[1]
  return attention.xla_attention(q, k, v, gpt2_model.make_attention_mask(T, T, None, jnp.asarray(seg)))


def fwd_bwd(fn, q, k, v, g):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(g))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_matches_xla_forward_and_gradients(dtype, tol):
  B, T, H, K = 2, 256, 2, 64
  rng = np.random.default_rng(1)
  q, k, v, g = (jnp.asarray(rng.standard_normal((B, T, H, K)), dtype) for _ in range(4))
  seg = packed_ids(B, T)
  got = fwd_bwd(lambda q, k, v: flash.segment_attention(q, k, v, seg, interpret=True), q, k, v, g)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  want = fwd_bwd(lambda q, k, v: reference(q, k, v, seg), f32(q), f32(k), f32(v), f32(g))
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert a.dtype == dtype, name
    err = float(jnp.max(jnp.abs(f32(a) - b)) / (1 + jnp.max(jnp.abs(b))))
    assert err < tol, (name, err)


def test_split_over_a_mesh_equals_one_device_and_gathers_nothing():
  devices = jax.devices()
  if len(devices) < 4:
    pytest.skip("needs 4 CPU devices (conftest sets 8)")
  mesh = sharding.make_mesh(devices=devices[:4])
  B, T, H, K = 8, 128, 2, 64
  rng = np.random.default_rng(2)
  q, k, v, g = (rng.standard_normal((B, T, H, K)).astype(np.float32) for _ in range(4))
  seg = packed_ids(B, T, seed=3)

  def program(q, k, v, g, seg):
    return fwd_bwd(lambda q, k, v: flash.segment_attention(q, k, v, seg, interpret=True), q, k, v, g)
  rows = sharding.batch_sharding(mesh)
  args = [jax.device_put(x, rows) for x in (q, k, v, g, seg)]
  split = jax.jit(sharding.traced_on(mesh, program))
  text = split.lower(*args).as_text()
  assert not re.search(r"all[-_]gather|all[-_]to[-_]all", text)
  assert "shard_map" in text or "sdy.manual_computation" in text
  got = split(*args)
  want = jax.jit(program)(q, k, v, g, seg)
  for a, b in zip(got, want):
    assert a.sharding.spec == rows.spec
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-6)


def cuda_platform():
  return attention.Platform("gpu", True, (9, 0), 90800, attention._version_tuple(jax.__version__), True)


def test_select_path():
  gpu, cpu = cuda_platform(), attention.Platform("cpu")
  pick = lambda impl, kind, plat=gpu, T=1024, probe=None: attention.select_path(
      impl, kind, plat, "bfloat16", 64, T, 32, log_fallbacks=False, probe=probe)
  assert pick("pallas", "segments") == "pallas"
  assert pick("pallas", "causal") == "pallas"
  assert pick("pallas", "lengths") == "cudnn_lengths"  # the sampler keeps cuDNN
  assert pick("pallas", "segments", T=1000) == "cudnn_packed"  # not a multiple of the block
  assert pick("pallas", "segments", probe=lambda p: "broken" if p == "pallas" else "") == "cudnn_packed"
  assert pick("pallas", "segments", plat=cpu) == "xla"
  assert pick("auto", "segments") == "cudnn_packed"
  assert flash.supported(1024, 64) == "" and flash.supported(96, 64) == ""
  assert "multiple" in flash.supported(1000, 64)


def test_build_mask_and_attend_route_the_ids(monkeypatch):
  """attend() on a 'pallas' Mask calls the kernel with the row's ids (ones without segments)."""
  seen = {}

  def fake(q, k, v, seg, interpret=False):
    seen["seg"] = np.asarray(seg)
    return q
  monkeypatch.setattr(flash, "segment_attention", fake)
  q = jnp.ones((2, 8, 1, 8))
  seg = np.array([[1, 1, 2, 2, 2, 0, 0, 0], [1] * 8], np.int32)
  attention.attend(q, q, q, attention.build_mask("pallas", None, seg, 4), fallback=False)
  np.testing.assert_array_equal(seen["seg"], seg)
  attention.attend(q, q, q, attention.build_mask("pallas", None, None, 4), fallback=False)
  np.testing.assert_array_equal(seen["seg"], np.ones((2, 8), np.int32))


@pytest.mark.parametrize("devices", [1, 8])
def test_train_step_lowers_for_cuda_with_triton_and_no_cudnn(simulated_gpu, devices):
  if len(jax.devices()) < devices:
    pytest.skip(f"needs {devices} CPU devices")
  simulated_gpu()
  step, args, _ = train_program(gpt2_config("pallas", scan=False, remat="none"), 1, devices)
  text = cuda(step, *args).as_text()
  n_layer = gpt2_config("pallas").n_layer
  # Per layer: the forward (with the softmax statistics; jax's jitted mha, so a call of one shared
  # function), the backward's dO.O pass and the backward (three results: dq, dk, dv).
  assert len(re.findall(r"call @mha\(", text)) == n_layer
  assert len(re.findall(r":2 = stablehlo\.custom_call @__gpu\$xla\.gpu\.triton", text)) == 1  # in @mha
  assert len(re.findall(r":3 = stablehlo\.custom_call @__gpu\$xla\.gpu\.triton", text)) == n_layer
  assert len(re.findall(r"= stablehlo\.custom_call @__gpu\$xla\.gpu\.triton", text)) == 1 + 2 * n_layer
  assert not re.findall(r"__cudnn\$\w+", text)
  assert "algorithm = <" not in text
  if devices > 1:  # each kernel runs on its device's rows: mapped by shard_map, nothing gathered
    assert len(re.findall(r"sdy\.manual_computation", text)) == 2 * n_layer  # forward, backward
    assert not re.search(r"all[-_]gather", text)
  assert LOWER_T % flash.BLOCK == 0


def test_probe_lowers_for_cuda(simulated_gpu):
  """The probe of 'pallas' (forward and backward on the probe batch) is a Triton program."""
  simulated_gpu()
  text = attention.probe_lowered("pallas", lowering_platforms=("cuda",)).as_text()
  assert re.findall(r":3 = stablehlo\.custom_call @__gpu\$xla\.gpu\.triton", text)
  assert not re.findall(r"__cudnn\$\w+", text)
  ref = attention.probe_lowered("pallas", lowering_platforms=("cuda",), reference=True).as_text()
  assert "triton" not in ref
