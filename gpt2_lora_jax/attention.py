"""Which attention kernel runs, and the packed-row layout cuDNN needs: segment ids -> lengths, offsets.

Five paths compute softmax(q k^T / sqrt(K) + mask) v for model.Attention:

  xla           xla_attention: two einsums with fp32 accumulation and an fp32 softmax over the
                dense boolean mask of model.make_attention_mask (causal when there is none), no
                forced dot algorithm; equal to jax.nn.dot_product_attention(implementation='xla')
                (tests/test_attention.py). The reference, the only path on CPU and TPU, and where
                every fallback ends. Holds [B, H, T, S] fp32 scores.
  cudnn_causal  jax.nn.dot_product_attention(is_causal=True, implementation='cudnn'): rows
                without segments or padding (T == S), e.g. the benchmark with --no_segment_ids.
  cudnn_packed  cuDNN's packed ("ragged") layout through jax._src.cudnn.fused_attention_stablehlo.
                dot_product_attention: per row, the lengths (B, M) and start offsets (B, M + 1) of
                its M segments, mask PADDING_CAUSAL (causal inside each segment). No dense mask.
  cudnn_mask    jax.nn.dot_product_attention(mask=..., implementation='cudnn'): the dense mask
                turned into an additive bias. Up to jax 0.11.0 its backward pass also computes
                a full [B, H, T, T] bias gradient (jax CHANGELOG, jax-ml/jax#34685).
  cudnn_lengths jax.nn.dot_product_attention(key_value_seq_lengths=..., implementation='cudnn'):
                the sampler's KV cache (mask kind 'lengths', below). No dense mask.
  pallas        flash.segment_attention: jax's Pallas (Triton) flash-attention kernels with the
                (B, T) segment ids, causal (rows with or without segments; attention_impl='pallas').

Mask kind 'lengths' (the sampler, sample.py): a KV cache filled from slot 0, each row's valid keys
a prefix, slots [0, kv_lengths[b]); query t of a chunk sits at slot query_offset + t and sees key
slot s iff s <= query_offset + t and s < kv_lengths[b] (lengths_mask, the XLA path's mask). cuDNN
expresses two cases of it exactly, so only these are kind 'lengths' (others are 'dense'):
  prefill  a chunk written from slot 0 (query_offset the int 0): s <= t and s < min(kv_lengths, T).
           Keys past slot T - 1 are never seen, so cuDNN gets the first T slots only (T == S) with
           is_causal and key_value_seq_lengths: with T == S jax's causal mask (tril, top-left) and
           a bottom-right one are the same, and every query row is computed (query_seq_lengths
           unset: jax passes T for each row), so no output is left undefined.
  decode   one query (T == 1): s < min(kv_lengths, query_offset + 1), key_value_seq_lengths only
           (no causal mask: a causal mask with T == 1 would mean s <= 0 top-left).
Every query sees at least one key when kv_lengths >= 1 (the sampler's prompts hold >= 1 token).

`select_path` picks one from plain inputs (backend, compute capability, cuDNN and jax version,
dtype, head size, what the mask is), so the choice is testable anywhere; `platform()` reads them
from the running process. Before a cuDNN path is chosen the first time, `probe(path)` runs it on a
small batch (forward and backward) against XLA, once per process, and remembers the answer; a
path that fails falls back. Packed rows fall back cudnn_packed -> cudnn_mask -> xla, causal rows
cudnn_causal -> xla, each fallback logged once with its reason; attention_impl='xla' consults
nothing. A cuDNN call that jax refuses while tracing a step also falls back to XLA (logged once).
Facts behind the rules (jax 0.10.2 / 0.11 source, cuDNN docs):
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

import concurrent.futures
import dataclasses
import functools
import logging
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_lora_jax.errors import describe_exception

PATHS = ("xla", "cudnn_causal", "cudnn_packed", "cudnn_mask", "cudnn_lengths", "pallas")
# no mask; packed segment ids; a KV cache whose valid keys are per-row prefixes; any other mask
MASK_KINDS = ("causal", "segments", "lengths", "dense")
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
  compute_capability: tuple = ()  # e.g. (9, 0) for H100/H200; () where there is none (ROCm)
  cudnn_version: int = 0  # e.g. 90800 for 9.8.0; 0 when none is found
  jax_version: tuple = ()
  packed_api: bool = False  # the private packed entry point has the arguments used here


def _version_tuple(text: str) -> tuple:
  return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


def _compute_capability(device) -> tuple:
  """(major, minor) of an NVIDIA device; () for anything else (ROCm reports e.g. 'gfx90a')."""
  try:
    return tuple(int(x) for x in str(getattr(device, "compute_capability", "")).split("."))
  except ValueError:
    return ()


def _packed_api_available() -> bool:
  try:
    import inspect
    from jax._src.cudnn import fused_attention_stablehlo as fas
    params = inspect.signature(fas.dot_product_attention).parameters
    return {"q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "mask_type", "scale"} <= set(params) \
        and hasattr(fas.MaskType, "PADDING_CAUSAL")
  except (ImportError, AttributeError, ValueError, TypeError):
    return False


@functools.lru_cache(maxsize=1)
def platform() -> Platform:
  """The running process's backend and, on NVIDIA GPUs, compute capability and cuDNN version.

  Reads facts only; whether a cuDNN kernel really runs here is probe()'s question, asked the first
  time a path would be chosen.
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
  cuda = "cuda" in str(platform_version).lower()
  if not cuda:  # ROCm: no cuDNN, and its device names are not CUDA compute capabilities
    return Platform("gpu", False, (), 0, jax_version, False)
  cudnn_version = 0
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fas
    cudnn_version = int(fas.check_cudnn_version())
  except Exception:  # no cuDNN found, or a jax whose check moved or raises otherwise
    cudnn_version = 0
  return Platform("gpu", True, _compute_capability(device), cudnn_version, jax_version,
                  _packed_api_available())


# --- the probe: does a cuDNN path really run here? ----------------------------------------------

PROBE_SHAPE = (2, 64, 2, 64)  # B, T, H, K of the test batch
PROBE_SEGMENTS = 2  # conversations a probe row holds at most
PROBE_CACHE_SLOTS = 96  # S of the cudnn_lengths probe: a KV cache longer than its T = 64 queries


def probe_inputs(path: str) -> tuple:
  """The probe's test batch as host arrays: q, k, v, output cotangent (bf16), segment ids (B, T)
  and the dense mask (B, 1, T, T) that `path` must reproduce. For cudnn_causal every row is one
  segment (causal only); otherwise two conversations + padding in row 0 and one full row 1.
  For cudnn_lengths: q (B, T, H, K), k, v (B, S, H, K) and, per row, the keys of a prefill
  (kv lengths 20 and T) and the cache slot of a decode query (37 and S - 1)."""
  B, T, H, K = PROBE_SHAPE
  if path == "cudnn_lengths":
    S = PROBE_CACHE_SLOTS
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, T, H, K)).astype(jnp.bfloat16)
    k, v = (rng.standard_normal((B, S, H, K)).astype(jnp.bfloat16) for _ in range(2))
    return q, k, v, np.array([20, T], np.int32), np.array([37, S - 1], np.int32)
  seg = np.ones((B, T), np.int32)
  if path != "cudnn_causal":
    seg[0, :20], seg[0, 20:50], seg[0, 50:] = 1, 2, 0
  dense = (seg[:, None, :, None] == seg[:, None, None, :]) & np.tril(np.ones((T, T), bool))
  rng = np.random.default_rng(0)
  q, k, v, g = (rng.standard_normal((B, T, H, K)).astype(jnp.bfloat16) for _ in range(4))
  return q, k, v, g, seg, dense


def probe_lowered(path: str, lowering_platforms: Optional[tuple] = None, reference: bool = False):
  """The probe's program for `path` (attention forward + backward on probe_inputs, every input a
  jit argument) traced and lowered; for another platform than this process's with
  lowering_platforms, e.g. ('cuda',) in the tests. Works while another function is being traced.
  reference: the same program on the XLA path (what the probe compares with). cudnn_lengths
  serves the sampler, which never differentiates: its program is a prefill and a decode, forward."""
  kernel_path = "xla" if reference else path

  def prefill_and_decode(q, k, v, prefill_lengths_B, decode_slots_B):  # cudnn_lengths
    T, S = q.shape[1], k.shape[1]
    prefill = build_lengths_mask(kernel_path, T, S, prefill_lengths_B, 0)
    decode = build_lengths_mask(kernel_path, 1, S, decode_slots_B + 1, decode_slots_B)
    return attend(q, k, v, prefill, fallback=False), attend(q[:, -1:], k, v, decode, fallback=False)

  def fwd_bwd(q, k, v, g, seg, dense):
    mask = (Mask("cudnn_causal") if kernel_path == "cudnn_causal"
            else build_mask(kernel_path, dense, seg, PROBE_SEGMENTS))  # pallas: the ids

    kernel = lambda q, k, v: attend(q, k, v, mask, fallback=False)  # a refusal is the answer
    out, vjp = jax.vjp(kernel, q, k, v)
    return (out, *vjp(g))

  program = prefill_and_decode if path == "cudnn_lengths" else fwd_bwd
  traced = jax.jit(program).trace(*probe_inputs(path))
  return traced.lower() if lowering_platforms is None else traced.lower(lowering_platforms=lowering_platforms)


def _run_probe(path: str) -> str:
  inputs = probe_inputs(path)
  got = probe_lowered(path).compile()(*inputs)
  want = probe_lowered(path, reference=True).compile()(*inputs)
  names = ("prefill output", "decode output") if path == "cudnn_lengths" else ("output", "dq", "dk", "dv")
  for name, a, b in zip(names, got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if not np.all(np.abs(a - b) <= 0.05 * (1 + np.abs(b))):
      return f"its {name} differs from XLA's by up to {np.max(np.abs(a - b)):.3g} on a test batch"
  return ""


_probe_results: dict = {}


def probe(path: str) -> str:
  """'' when `path` runs here (forward and backward on a small batch) and agrees with XLA, else why
  not. Run once per path and process, the answer kept (a failure too). A wrong mask changes outputs
  by O(1); the bound, 0.05 (1 + |reference|), is bf16 rounding with room to spare.

  It runs in a thread of its own: thread-local tracing state is then empty, so the probe executes
  eagerly even when first asked while a train step is being traced. Any exception (an empty
  message, an AssertionError from jax's lowering, XlaRuntimeError, NotImplementedError) is an
  answer, never raised.
  """
  if path not in _probe_results:
    try:
      with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="attention-probe") as pool:
        problem = pool.submit(_run_probe, path).result()
    except Exception as e:  # a kernel this GPU, cuDNN or jax refuses
      problem = f"it failed on a test batch: {describe_exception(e)}"
    _probe_results[path] = problem
  return _probe_results[path]


def select_path(impl: str, kind: str, plat: Platform, dtype, head_dim: int, seq_len: int,
                segment_cap: int, log_fallbacks: bool = True,
                probe: Optional[Callable[[str], str]] = None) -> str:
  """The attention path for one call: see the module docstring. Pure apart from logging and `probe`.

  impl: GPT2Config.attention_impl ('xla', 'cudnn', 'auto'); kind: one of MASK_KINDS;
  seq_len: query length T (cuDNN refuses an odd T with a bias in training); segment_cap: the
  most segments a packed row holds (GPT2Config.max_segments_per_row; 0 = no cap, which leaves the
  packed layout's table unsized). probe(path) -> '' or why `path` does not run here (see probe());
  None: every path the facts allow runs.
  """
  if kind not in MASK_KINDS:
    raise ValueError(f"mask kind {kind!r}: choose one of {MASK_KINDS}")
  note = _log_once if log_fallbacks else (lambda message: None)
  if impl == "xla":
    return "xla"
  if plat.backend != "gpu" or not plat.cuda:
    if impl in ("cudnn", "pallas"):
      note(f"attention_impl={impl!r} on {plat.backend}: XLA attention (its kernels run on NVIDIA GPUs only)")
    return "xla"
  probed = lambda path: "" if probe is None else probe(path)
  if impl == "pallas" and kind in ("segments", "causal"):
    from gpt2_lora_jax import flash
    problem = flash.supported(seq_len, head_dim) or probed("pallas")
    if not problem:
      return "pallas"
    note(f"attention: cuDNN/XLA instead of Pallas flash attention: {problem}")
  # From here: an NVIDIA GPU and impl 'cudnn' or 'auto'.
  reason = None
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    reason = f"compute dtype {jnp.dtype(dtype).name} (cuDNN attention takes bfloat16/float16)"
  elif plat.compute_capability < (8, 0):
    reason = f"compute capability {plat.compute_capability} (cuDNN flash attention needs 8.0+)"
  elif head_dim % 8 or head_dim > (256 if plat.compute_capability >= (9, 0) else 128):
    reason = f"head size {head_dim} (cuDNN needs a multiple of 8, at most 128; 256 on 9.0+)"
  elif kind == "dense":
    # E.g. left-padded prompts over KV-cache slots: the valid keys are not prefixes, so cuDNN's
    # per-row q/kv lengths cannot express them.
    return "xla"
  if reason:
    note(f"attention: XLA instead of cuDNN: {reason}")
    return "xla"
  single = {"causal": ("cudnn_causal", "cuDNN's causal kernel"),
            "lengths": ("cudnn_lengths", "cuDNN with per-row kv lengths (the sampler)")}
  if kind in single:  # one cuDNN path, else XLA
    path, name = single[kind]
    problem = probed(path)
    if not problem:
      return path
    note(f"attention: XLA instead of {name}: {problem}")
    return "xla"
  # Packed segments: the packed layout, else cuDNN with the dense mask, else XLA.
  if segment_cap < 1:
    why = "no segment cap (data.max_segments_per_row=0) to size the packed layout's table"
  elif not plat.packed_api:
    why = "this jax has no packed-layout entry point with q/kv offsets"
  elif plat.compute_capability < (9, 0):
    why = f"compute capability {plat.compute_capability} (the packed layout needs 9.0+)"
  elif plat.cudnn_version < MIN_CUDNN_PACKED:
    why = f"cuDNN {plat.cudnn_version} (the packed layout is tested from 9.6.0)"
  else:
    why = probed("cudnn_packed")
    if not why:
      return "cudnn_packed"
  if seq_len % 2:
    note(f"attention: XLA for packed rows: {why}; cuDNN with a mask needs an even length, got {seq_len}")
    return "xla"
  problem = probed("cudnn_mask")
  if problem:
    note(f"attention: XLA for packed rows: {why}; cuDNN with a mask: {problem}")
    return "xla"
  dbias = (" (its backward computes a full bias gradient on this jax)"
           if plat.jax_version < FIRST_JAX_WITHOUT_MASK_DBIAS else "")
  note(f"attention: cuDNN with a dense mask for packed rows{dbias}: {why}")
  return "cudnn_mask"


def mask_kind(T: int, S: int, attention_mask, segment_ids, query_offset, kv_lengths=None) -> str:
  """'causal' (no mask needed), 'segments' (packed rows, no cache, no padding mask), 'lengths'
  (kv_lengths alone, for a chunk written from slot 0 (query_offset the int 0) or one query; see
  the module docstring) or 'dense'."""
  if kv_lengths is not None:
    if attention_mask is not None or segment_ids is not None:
      raise ValueError("kv_lengths describes the whole mask: pass no attention_mask or segment_ids with it")
    from_start = isinstance(query_offset, int) and query_offset == 0
    return "lengths" if T == 1 or from_start else "dense"
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
  seqlens_BM / offsets_BM1 / overflow_B: the packed layout, and segment_ids_BT for XLA should
  cuDNN refuse it while tracing (cudnn_packed only); kv_lengths_B and causal: key slot s is
  seen iff s < kv_lengths_B[b] (and s <= t when causal), cudnn_lengths only.
  """
  path: str = dataclasses.field(metadata=dict(static=True))
  dense_B1TS: Optional[jax.Array] = None
  seqlens_BM: Optional[jax.Array] = None
  offsets_BM1: Optional[jax.Array] = None
  overflow_B: Optional[jax.Array] = None
  segment_ids_BT: Optional[jax.Array] = None
  kv_lengths_B: Optional[jax.Array] = None
  causal: bool = dataclasses.field(default=False, metadata=dict(static=True))


def build_mask(path: str, dense_B1TS, segment_ids_BT, max_segments: int) -> Mask:
  """The Mask for `path`: the dense mask for xla / cudnn_mask, the layout for cudnn_packed."""
  if path == "pallas":  # the kernel takes the ids; rows without segments are one segment each
    return Mask(path, segment_ids_BT=None if segment_ids_BT is None else jnp.asarray(segment_ids_BT))
  if path == "cudnn_packed":
    # One more slot than conversations: trailing padding is a segment of its own.
    return Mask(path, None, *segment_layout(segment_ids_BT, max_segments + 1),
                segment_ids_BT=jnp.asarray(segment_ids_BT))
  return Mask(path, dense_B1TS if path in ("xla", "cudnn_mask") else None)


def lengths_mask(T: int, S: int, kv_lengths_B, query_offset=0):
  """(B, 1, T, S) bool, mask kind 'lengths': query t sits at key slot query_offset + t (an int,
  a scalar or per row (B,)) and sees slot s iff s <= query_offset + t and s < kv_lengths_B[b]."""
  kv_lengths_B = jnp.asarray(kv_lengths_B, jnp.int32)
  offset_B11 = jnp.reshape(jnp.asarray(query_offset, jnp.int32), (-1, 1, 1))
  q_slot_BT1 = jnp.arange(T, dtype=jnp.int32)[None, :, None] + offset_B11
  k_slot_11S = jnp.arange(S, dtype=jnp.int32)[None, None, :]
  return ((k_slot_11S <= q_slot_BT1) & (k_slot_11S < kv_lengths_B[:, None, None]))[:, None]


def build_lengths_mask(path: str, T: int, S: int, kv_lengths_B, query_offset=0) -> Mask:
  """The Mask of kind 'lengths' for `path`: lengths_mask for xla; for cudnn_lengths the per-row
  kv lengths it equals (see the module docstring: a chunk from slot 0, or T == 1)."""
  if path != "cudnn_lengths":
    return Mask(path, lengths_mask(T, S, kv_lengths_B, query_offset))
  kv_lengths_B = jnp.asarray(kv_lengths_B, jnp.int32)
  if T == 1:  # s <= offset and s < kv_length
    return Mask(path, kv_lengths_B=jnp.minimum(kv_lengths_B, jnp.asarray(query_offset, jnp.int32) + 1))
  if not (isinstance(query_offset, int) and query_offset == 0):
    raise ValueError("cudnn_lengths takes one query or a chunk written from slot 0 (mask_kind)")
  return Mask(path, kv_lengths_B=jnp.minimum(kv_lengths_B, T), causal=True)  # s <= t < T


def xla_attention(q_BTHK, k_BSHK, v_BSHK, mask_B1TS=None):
  """softmax(q k^T / sqrt(K) + mask) v in plain einsums; mask None means causal (T == S).

  Inputs stay in their dtype (bf16 on accelerators) and both matmuls accumulate in fp32 through
  preferred_element_type; the softmax runs in fp32 and its probabilities are cast back to v's dtype,
  as jax.nn.dot_product_attention(implementation='xla') computes. Unlike that function, no dot
  algorithm is forced (it pins BF16_BF16_F32 on bf16 inputs, see jax-ml/jax#24047): XLA picks
  the matmul as for any other bf16 dot.
  """
  B, T, H, K = q_BTHK.shape
  S = k_BSHK.shape[1]
  scores_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK, preferred_element_type=jnp.float32)
  scores_BHTS = scores_BHTS * np.float32(1.0 / np.sqrt(K))
  if mask_B1TS is None:
    mask_B1TS = jnp.tril(jnp.ones((T, S), bool))[None, None]
  # The large negative jax uses: exp() of it is 0 and a row never holds only -inf.
  scores_BHTS = jnp.where(mask_B1TS, scores_BHTS, np.float32(-0.7 * np.finfo(np.float32).max))
  probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(v_BSHK.dtype)
  out_BTHK = jnp.einsum("bhts,bshk->bthk", probs_BHTS, v_BSHK, preferred_element_type=jnp.float32)
  return out_BTHK.astype(q_BTHK.dtype)


def _segment_mask(segment_ids_BT):
  """(B, 1, T, T): causal inside each run of equal ids, as make_attention_mask builds for packed rows."""
  seg = jnp.asarray(segment_ids_BT)
  T = seg.shape[1]
  return (seg[:, None, :, None] == seg[:, None, None, :]) & jnp.tril(jnp.ones((T, T), bool))[None, None]


def lengths_attention(mask: Mask, q_BTHK, k_BSHK, v_BSHK, implementation: str = "cudnn"):
  """The cudnn_lengths call: jax.nn.dot_product_attention with per-row kv lengths (and causal for
  a chunk from slot 0, given only the first T key slots). implementation='xla' runs the same call
  on jax's XLA implementation (the tests' check of its arguments)."""
  if mask.causal:  # a chunk from slot 0 sees only the first T slots: cuDNN gets T == S
    T = q_BTHK.shape[1]
    k_BSHK, v_BSHK = k_BSHK[:, :T], v_BSHK[:, :T]
  return jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, is_causal=mask.causal,
                                      key_value_seq_lengths=mask.kv_lengths_B,
                                      implementation=implementation)


def _cudnn(mask: Mask, q_BTHK, k_BSHK, v_BSHK):
  if mask.path == "pallas":
    from gpt2_lora_jax import flash
    seg = mask.segment_ids_BT
    seg = jnp.ones(q_BTHK.shape[:2], jnp.int32) if seg is None else seg
    return flash.segment_attention(q_BTHK, k_BSHK, v_BSHK, seg)
  if mask.path == "cudnn_lengths":
    return lengths_attention(mask, q_BTHK, k_BSHK, v_BSHK)
  if mask.path == "cudnn_causal":
    return jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, is_causal=True, implementation="cudnn")
  if mask.path == "cudnn_mask":
    return jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, mask=mask.dense_B1TS, implementation="cudnn")
  from jax._src.cudnn import fused_attention_stablehlo as fas
  out = fas.dot_product_attention(
      q_BTHK, k_BSHK, v_BSHK, None, None, mask.seqlens_BM, mask.seqlens_BM, mask.offsets_BM1,
      mask.offsets_BM1, scale=float(1.0 / np.sqrt(q_BTHK.shape[-1])),
      mask_type=fas.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
  return jnp.where(mask.overflow_B[:, None, None, None], jnp.nan, out).astype(out.dtype)


def attend(q_BTHK, k_BSHK, v_BSHK, mask: Mask, fallback: bool = True):
  """softmax(q k^T / sqrt(K) + mask) v through mask.path; (B, T, H, K) like q.

  A cuDNN path that jax refuses while tracing (an exception of any kind) falls back to XLA with the
  same mask, logged once with the exception's type and message; fallback=False raises instead
  (the probe and the attention check measure the kernel itself, never XLA under its name).
  """
  if mask.path not in PATHS:
    raise ValueError(f"attention path {mask.path!r}: choose one of {PATHS}")
  if mask.path == "xla":
    return xla_attention(q_BTHK, k_BSHK, v_BSHK, mask.dense_B1TS)
  if not fallback:
    return _cudnn(mask, q_BTHK, k_BSHK, v_BSHK)
  try:
    return _cudnn(mask, q_BTHK, k_BSHK, v_BSHK)
  except Exception as e:  # e.g. NotImplementedError or a version check of jax's cuDNN wrapper
    _log_once(f"attention: XLA instead of {mask.path}: jax refused it: {describe_exception(e)}")
  dense = mask.dense_B1TS
  if mask.path in ("cudnn_packed", "pallas") and mask.segment_ids_BT is not None:
    dense = _segment_mask(mask.segment_ids_BT)
  elif mask.path == "cudnn_lengths":  # its kv lengths already hold the query slot's bound
    T, S = q_BTHK.shape[1], k_BSHK.shape[1]
    dense = lengths_mask(T, S, mask.kv_lengths_B, 0 if mask.causal else S)
  return xla_attention(q_BTHK, k_BSHK, v_BSHK, dense)
