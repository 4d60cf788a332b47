"""Which attention kernel runs, and the packed-row layout cuDNN needs: segment ids -> lengths, offsets.

Four paths compute softmax(q k^T / sqrt(K) + mask) v for model.Attention:

  xla           jax.nn.dot_product_attention(implementation='xla') with the dense boolean mask
                of model.make_attention_mask (or is_causal): the reference, and the only path on
                CPU and TPU. Holds [B, H, T, S] fp32 scores.
  cudnn_causal  jax.nn.dot_product_attention(is_causal=True, implementation='cudnn'): rows
                without segments or padding (T == S), e.g. the benchmark with --no_segment_ids.
  cudnn_packed  cuDNN's packed ("ragged") layout through jax._src.cudnn.fused_attention_stablehlo.
                dot_product_attention: per row, the lengths (B, M) and start offsets (B, M + 1) of
                its M segments, mask PADDING_CAUSAL (causal inside each segment). No dense mask.
  cudnn_mask    jax.nn.dot_product_attention(mask=..., implementation='cudnn'): the dense mask
                turned into an additive bias. Up to jax 0.11.0 its backward pass also computes
                a full [B, H, T, T] bias gradient (jax CHANGELOG, jax-ml/jax#34685).

`select_path` picks one from plain inputs (backend, compute capability, cuDNN and jax version,
dtype, head size, what the mask is), so the choice is testable anywhere; `platform()` reads them
from the running process and, where the packed layout would be used, first checks it against XLA
on a small batch. Packed rows fall back cudnn_packed -> cudnn_mask -> xla, each fallback
logged once with its reason. Facts behind the rules (jax 0.10.2 / 0.11 source, cuDNN docs):
cuDNN's fused attention takes bf16/fp16 only and needs compute capability 8.0+ (cuDNN frontend
"Attention" support matrix); jax checks head size <= 128 (<= 256 on 9.0+) and a multiple of 8,
requires 9.0+ for the packed layout, and refuses an odd sequence length for a bias in training;
jax's own packed-layout test requires cuDNN 9.6.0+.

Packed layout (what the cuDNN call expects, as in jax's test_sdpa_packed_layout): segment m of row
b covers [offsets[b, m], offsets[b, m] + seqlens[b, m]); unused entries are -1, and offsets carry
only segment starts (jax appends the end itself). Positions no segment covers get no defined
output, so `segment_layout` treats every run of equal ids as a segment, trailing padding (id 0)
included: every position of a row is covered. A row with more runs than M cannot be described;
its attention output is set to NaN (a loud failure in the loss, never a silent wrong answer).
The packer (packing.py) caps conversations per row so this does not happen: M = cap + 1.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

PATHS = ("xla", "cudnn_causal", "cudnn_packed", "cudnn_mask")
MASK_KINDS = ("causal", "segments", "dense")  # no mask; packed segment ids; any other mask
MIN_CUDNN_PACKED = 90600  # jax's packed-layout test skips below cuDNN 9.6.0
FIRST_JAX_WITHOUT_MASK_DBIAS = (0, 11, 1)  # jax CHANGELOG: boolean masks stop computing dbias

log = logging.getLogger(__name__)
_logged: set = set()


def _log_once(message: str):
  if message not in _logged:
    _logged.add(message)
    log.warning(message)


@dataclasses.dataclass(frozen=True)
class Platform:
  """What the choice of kernel depends on, read from the running process (see platform())."""
  backend: str  # 'cpu', 'gpu', 'tpu'
  cuda: bool = False  # an NVIDIA GPU (a ROCm GPU is also backend 'gpu')
  compute_capability: tuple = ()  # e.g. (9, 0) for H100/H200
  cudnn_version: int = 0  # e.g. 90800 for 9.8.0; 0 when none is found
  jax_version: tuple = ()
  packed_api: bool = False  # the private packed entry point has the arguments used here
  packed_problem: str = ""  # why the packed layout is unusable here, when a probe found out


def _version_tuple(text: str) -> tuple:
  return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


def _packed_api_available() -> bool:
  try:
    import inspect
    from jax._src.cudnn import fused_attention_stablehlo as fas
    params = inspect.signature(fas.dot_product_attention).parameters
    return {"q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "mask_type", "scale"} <= set(params) \
        and hasattr(fas.MaskType, "PADDING_CAUSAL")
  except (ImportError, AttributeError, ValueError, TypeError):
    return False


def probe_packed_layout(path: str = "cudnn_packed") -> str:
  """Runs `path` once on two small packed rows (forward and backward) against XLA with the dense
  segment mask; '' when they agree, else what went wrong. A wrong mask changes outputs by O(1);
  the bound, 0.05 (1 + |reference|), is bf16 rounding with room to spare."""
  B, T, H, K = 2, 64, 2, 64
  seg = np.zeros((B, T), np.int32)
  seg[0, :20], seg[0, 20:50], seg[1, :] = 1, 2, 1  # two conversations + padding; one full row
  dense = (seg[:, None, :, None] == seg[:, None, None, :]) & np.tril(np.ones((T, T), bool))
  rng = np.random.default_rng(0)
  try:
    with jax.ensure_compile_time_eval():  # also when first called while a step is being traced
      q, k, v, g = (jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.bfloat16) for _ in range(4))

      def fwd_bwd(mask):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask), q, k, v)
        return (out, *vjp(g))

      got = jax.jit(fwd_bwd)(build_mask(path, jnp.asarray(dense), jnp.asarray(seg), 2))
      want = jax.jit(fwd_bwd)(Mask("xla", jnp.asarray(dense)))
      for name, a, b in zip(("output", "dq", "dk", "dv"), got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if not np.all(np.abs(a - b) <= 0.05 * (1 + np.abs(b))):
          return f"its {name} differs from XLA's by up to {np.max(np.abs(a - b)):.3g} on a test batch"
  except Exception as e:  # a kernel this GPU, cuDNN or jax refuses
    return f"it failed on a test batch: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return ""


@functools.lru_cache(maxsize=1)
def platform() -> Platform:
  """The running process's backend and, on NVIDIA GPUs, compute capability and cuDNN version.

  Where the packed layout would be chosen, it is first run once on a test batch and compared with
  XLA (probe_packed_layout); if that fails, packed rows fall back as when it is unavailable.
  """
  device = jax.devices()[0]
  jax_version = _version_tuple(jax.__version__)
  if device.platform != "gpu":
    return Platform(device.platform, jax_version=jax_version)
  try:
    from jax import extend as jax_extend  # (an `import jax.extend` here would make `jax` local)
    platform_version = jax_extend.backend.get_backend().platform_version
  except (ImportError, AttributeError):
    platform_version = getattr(device.client, "platform_version", "")
  cuda = "cuda" in platform_version.lower()
  capability = tuple(int(x) for x in str(getattr(device, "compute_capability", "0.0")).split("."))
  cudnn_version = 0
  if cuda:
    try:
      from jax._src.cudnn import fused_attention_stablehlo as fas
      cudnn_version = int(fas.check_cudnn_version())
    except (ImportError, RuntimeError, AttributeError):
      cudnn_version = 0
  plat = Platform("gpu", cuda, capability, cudnn_version, jax_version, _packed_api_available())
  if plat.packed_api and cuda and capability >= (9, 0) and cudnn_version >= MIN_CUDNN_PACKED:
    problem = probe_packed_layout()
    if problem:
      plat = dataclasses.replace(plat, packed_api=False, packed_problem=problem)
  return plat


def select_path(impl: str, kind: str, plat: Platform, dtype, head_dim: int, seq_len: int,
                segment_cap: int, log_fallbacks: bool = True) -> str:
  """The attention path for one call: see the module docstring. Pure apart from logging.

  impl: GPT2Config.attention_impl ('xla', 'cudnn', 'auto'); kind: one of MASK_KINDS;
  seq_len: query length T (cuDNN refuses an odd T with a bias in training); segment_cap: the
  most segments a packed row holds (GPT2Config.max_segments_per_row; 0 = no cap, which leaves the
  packed layout's table unsized).
  """
  if kind not in MASK_KINDS:
    raise ValueError(f"mask kind {kind!r}: choose one of {MASK_KINDS}")
  note = _log_once if log_fallbacks else (lambda message: None)
  if impl == "xla":
    return "xla"
  if plat.backend != "gpu" or not plat.cuda:
    if impl == "cudnn":
      note(f"attention_impl='cudnn' on {plat.backend}: XLA attention (cuDNN runs on NVIDIA GPUs only)")
    return "xla"
  # From here: an NVIDIA GPU and impl 'cudnn' or 'auto'.
  reason = None
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    reason = f"compute dtype {jnp.dtype(dtype).name} (cuDNN attention takes bfloat16/float16)"
  elif plat.compute_capability < (8, 0):
    reason = f"compute capability {plat.compute_capability} (cuDNN flash attention needs 8.0+)"
  elif head_dim % 8 or head_dim > (256 if plat.compute_capability >= (9, 0) else 128):
    reason = f"head size {head_dim} (cuDNN needs a multiple of 8, at most 128; 256 on 9.0+)"
  elif kind == "dense":
    # The sampler's masks (left-padded prompts over KV-cache slots) are not key prefixes, so
    # cuDNN's per-row q/kv lengths cannot express them.
    return "xla"
  if reason:
    note(f"attention: XLA instead of cuDNN: {reason}")
    return "xla"
  if kind == "causal":
    return "cudnn_causal"
  # Packed segments: the packed layout, else cuDNN with the dense mask, else XLA.
  if segment_cap < 1:
    why = "no segment cap (data.max_segments_per_row=0) to size the packed layout's table"
  elif not plat.packed_api:
    why = plat.packed_problem or "this jax has no packed-layout entry point with q/kv offsets"
  elif plat.compute_capability < (9, 0):
    why = f"compute capability {plat.compute_capability} (the packed layout needs 9.0+)"
  elif plat.cudnn_version < MIN_CUDNN_PACKED:
    why = f"cuDNN {plat.cudnn_version} (the packed layout is tested from 9.6.0)"
  else:
    return "cudnn_packed"
  if seq_len % 2:
    note(f"attention: XLA for packed rows: {why}; cuDNN with a mask needs an even length, got {seq_len}")
    return "xla"
  dbias = (" (its backward computes a full bias gradient on this jax)"
           if plat.jax_version < FIRST_JAX_WITHOUT_MASK_DBIAS else "")
  note(f"attention: cuDNN with a dense mask for packed rows{dbias}: {why}")
  return "cudnn_mask"


def mask_kind(T: int, S: int, attention_mask, segment_ids, query_offset) -> str:
  """'causal' (no mask needed), 'segments' (packed rows, no cache, no padding mask) or 'dense'."""
  if attention_mask is None and segment_ids is None and T == S and \
      isinstance(query_offset, int) and query_offset == 0:
    return "causal"
  if segment_ids is not None and attention_mask is None and T == S and \
      isinstance(query_offset, int) and query_offset == 0:
    return "segments"
  return "dense"


# --- packed layout ----------------------------------------------------------------------------

def segment_layout(segment_ids_BT, max_segments: int):
  """Runs of equal segment ids -> (seqlens (B, M), offsets (B, M + 1), overflow (B,)), int32/bool.

  M = max_segments. Each maximal run of one id is a segment (trailing padding, id 0, is one too),
  so the segments tile the row. Entries past a row's run count are -1. overflow[b] is True when
  row b has more than M runs (its layout is then incomplete; see the module docstring).
  """
  segment_ids_BT = jnp.asarray(segment_ids_BT)
  B, T = segment_ids_BT.shape
  M = max_segments
  starts_BT = jnp.concatenate([jnp.ones((B, 1), bool),
                               segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  run_BT = jnp.cumsum(starts_BT, axis=1, dtype=jnp.int32) - 1  # which run each position is in
  n_runs_B = run_BT[:, -1] + 1
  in_run_BMT = run_BT[:, None, :] == jnp.arange(M, dtype=jnp.int32)[None, :, None]
  seqlens_BM = jnp.sum(in_run_BMT, axis=-1, dtype=jnp.int32)
  starts_BM = jnp.min(jnp.where(in_run_BMT, jnp.arange(T, dtype=jnp.int32), T), axis=-1)
  used_BM = jnp.arange(M)[None, :] < n_runs_B[:, None]
  seqlens_BM = jnp.where(used_BM, seqlens_BM, -1)
  offsets_BM1 = jnp.concatenate([jnp.where(used_BM, starts_BM, -1),
                                 jnp.full((B, 1), -1, jnp.int32)], axis=1)
  return seqlens_BM, offsets_BM1, n_runs_B > M


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
  """What every layer's attention needs, built once per forward pass (GPT2.__call__).

  path: the chosen kernel (static); dense_B1TS: the boolean mask (None when causal);
  seqlens_BM / offsets_BM1 / overflow_B: the packed layout (cudnn_packed only).
  """
  path: str = dataclasses.field(metadata=dict(static=True))
  dense_B1TS: Optional[jax.Array] = None
  seqlens_BM: Optional[jax.Array] = None
  offsets_BM1: Optional[jax.Array] = None
  overflow_B: Optional[jax.Array] = None


def build_mask(path: str, dense_B1TS, segment_ids_BT, max_segments: int) -> Mask:
  """The Mask for `path`: the dense mask for xla / cudnn_mask, the layout for cudnn_packed."""
  if path == "cudnn_packed":
    # One more slot than conversations: trailing padding is a segment of its own.
    return Mask(path, None, *segment_layout(segment_ids_BT, max_segments + 1))
  return Mask(path, dense_B1TS if path in ("xla", "cudnn_mask") else None)


def attend(q_BTHK, k_BSHK, v_BSHK, mask: Mask):
  """softmax(q k^T / sqrt(K) + mask) v through mask.path; (B, T, H, K) like q."""
  if mask.path == "xla":
    if mask.dense_B1TS is None:
      return jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, is_causal=True, implementation="xla")
    return jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, mask=mask.dense_B1TS, implementation="xla")
  if mask.path == "cudnn_causal":
    return jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, is_causal=True, implementation="cudnn")
  if mask.path == "cudnn_mask":
    return jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, mask=mask.dense_B1TS, implementation="cudnn")
  if mask.path == "cudnn_packed":
    from jax._src.cudnn import fused_attention_stablehlo as fas
    out = fas.dot_product_attention(
        q_BTHK, k_BSHK, v_BSHK, None, None, mask.seqlens_BM, mask.seqlens_BM, mask.offsets_BM1,
        mask.offsets_BM1, scale=float(1.0 / np.sqrt(q_BTHK.shape[-1])),
        mask_type=fas.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
    return jnp.where(mask.overflow_B[:, None, None, None], jnp.nan, out).astype(out.dtype)
  raise ValueError(f"attention path {mask.path!r}: choose one of {PATHS}")
