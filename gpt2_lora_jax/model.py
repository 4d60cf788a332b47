"""GPT-2 as a Flax module: the network of Hugging Face's GPT2LMHeadModel, readable in one sitting.

Parameter tree (names follow Hugging Face's so the weight mapping is one table, see weights.py):

    wte/embedding (V, D)        wpe/embedding (P, D)
    h_{i}/ln_1/{scale,bias}     h_{i}/attn/c_attn/{kernel (D, 3D), bias}
    h_{i}/attn/c_proj/{kernel (D, D), bias}
    h_{i}/ln_2/{scale,bias}     h_{i}/mlp/c_fc/{kernel (D, 4D), bias}   h_{i}/mlp/c_proj/{kernel (4D, D), bias}
    ln_f/{scale,bias}           lm_head/kernel (D, V) only when the head is untied

LoRA is a parameter-tree transform (lora.py): it adds `lora_a` (in, r) and `lora_b` (r, out) leaves
next to a kernel. `Linear` notices them and adds s * dropout(x) A B to its output, factored, so the
full-size W + s A B never exists inside a train step. Adapters on `lm_head` live at lm_head/lora_{a,b}
and add s (h A) B to the logits while the head stays tied to the embedding.

With config.scan_layers the blocks' parameters are stacked instead: h/ln_1/scale (L, D),
h/attn/c_attn/kernel (L, D, 3D), ... (and h/.../lora_a (L, in, r)); stacking.py converts between the
two layouts, and the KV cache is then one {'k', 'v'} pair of (L, B, S, H, K) buffers.

Shapes: B batch, T query length, S key length (T, or the KV-cache length), D width, H heads,
K head size, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2_lora_jax import attention
from gpt2_lora_jax import dropout as dropout_lib
from gpt2_lora_jax import fused_lora
from gpt2_lora_jax.errors import UserError

# Width, depth and heads of the four released GPT-2 sizes.
PRESETS = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
}

ATTENTION_IMPLS = ("xla", "cudnn", "auto", "pallas")
REMAT_POLICIES = ("none", "full", "dots")
# Standard deviations of the random init: Hugging Face's initializer_range (0.02) for every kernel and
# the token embedding; 0.01 for the position embedding, as OpenAI's GPT-2 code draws it.
INIT_STD = 0.02
WPE_INIT_STD = 0.01


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """Architecture (the fields of Hugging Face's GPT2Config that matter) plus how to run it."""
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  layer_norm_epsilon: float = 1e-5
  tie_word_embeddings: bool = True  # lm_head shares the token embedding, as released GPT-2 does
  # How to run it (not part of a checkpoint):
  dtype: str = "float32"  # compute dtype: float32 on CPU tests, bfloat16 on accelerators
  param_dtype: str = "float32"  # dtype of freshly initialised parameters
  # 'xla' (the reference; always on CPU/TPU), 'cudnn' (cuDNN kernels on NVIDIA GPUs: packed rows
  # through its packed layout), 'auto' (cuDNN where it applies) or 'pallas' (Pallas flash
  # attention with segment ids for training rows on NVIDIA GPUs, cuDNN for the rest); attention.py.
  attention_impl: str = "xla"
  # Segments (conversations) a packed row may hold: sizes cuDNN's packed layout; the packer
  # enforces it (data.max_segments_per_row). 0: no cap (packed rows then never use that layout).
  max_segments_per_row: int = 32
  # LoRA dropout's random bits (dropout.py): 'packed' (four 16-bit values per threefry hash) or
  # 'bernoulli' (flax's nn.Dropout: one hash per element).
  lora_dropout_rng: str = "packed"
  # x @ [W | A] as one matmul where an adapter's input is x itself (no dropout, or deterministic):
  # fused_lora.py. Off by default until a GPU measures it (bench/levers.py: like_peft_fused).
  lora_fused_matmul: bool = False
  remat: str = "none"  # rematerialise each block: 'none', 'full' or 'dots' (save matmul outputs)
  # Run the blocks as one nn.scan over stacked layer parameters (tree key 'h', leaves (L, ...)):
  # compile time stops growing with depth. Checkpoint formats stay per layer (stacking.py).
  scan_layers: bool = False

  def __post_init__(self):
    if self.n_embd % self.n_head:
      raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise UserError(f"attention_impl={self.attention_impl!r}: choose one of {ATTENTION_IMPLS}")
    if self.lora_dropout_rng not in dropout_lib.RNGS:
      raise UserError(f"lora_dropout_rng={self.lora_dropout_rng!r}: choose one of {dropout_lib.RNGS}")
    if self.remat not in REMAT_POLICIES:
      raise UserError(f"remat={self.remat!r}: choose one of {REMAT_POLICIES}")
    if self.max_segments_per_row < 0:
      raise ValueError(f"max_segments_per_row={self.max_segments_per_row}: must be >= 0 "
                       "(--config.data.max_segments_per_row sets it)")

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  def replace(self, **kw) -> "GPT2Config":
    return dataclasses.replace(self, **kw)

  @classmethod
  def preset(cls, name: str, **kw) -> "GPT2Config":
    if name not in PRESETS:
      raise UserError(f"unknown GPT-2 size {name!r}: choose one of {sorted(PRESETS)}")
    return cls(**{**PRESETS[name], **kw})

  # --- Hugging Face config.json -------------------------------------------------------------
  @classmethod
  def from_hf_dict(cls, d: dict, **kw) -> "GPT2Config":
    """Reads a Hugging Face GPT-2 config.json; refuses variants this module does not implement."""
    unsupported = []
    act = d.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      unsupported.append(f"activation_function={act!r} (only the tanh GELU 'gelu_new')")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
      if d.get(flag):
        unsupported.append(f"{flag}=True")
    if not d.get("scale_attn_weights", True):
      unsupported.append("scale_attn_weights=False")
    if d.get("n_inner") not in (None, 4 * d.get("n_embd", 768)):
      unsupported.append(f"n_inner={d['n_inner']} (only 4 * n_embd)")
    if unsupported:
      raise UserError("unsupported GPT-2 config: " + "; ".join(unsupported))
    return cls(
        vocab_size=d.get("vocab_size", 50257),
        n_positions=d.get("n_positions", d.get("n_ctx", 1024)),
        n_embd=d.get("n_embd", 768),
        n_layer=d.get("n_layer", 12),
        n_head=d.get("n_head", 12),
        layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=d.get("tie_word_embeddings", True),
        **kw,
    )

  def to_hf_dict(self) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": self.vocab_size,
        "n_positions": self.n_positions,
        "n_ctx": self.n_positions,
        "n_embd": self.n_embd,
        "n_layer": self.n_layer,
        "n_head": self.n_head,
        "n_inner": None,
        "layer_norm_epsilon": self.layer_norm_epsilon,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "initializer_range": 0.02,
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "scale_attn_weights": True,
        "use_cache": True,
    }

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _dtype(name: str):
  return jnp.dtype(name)


class Linear(nn.Module):
  """GPT-2's Conv1D: y = x W + b with W stored (in, out); plus LoRA when the tree holds adapters."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_scale: Optional[float] = None
  lora_dropout: float = 0.0
  lora_dropout_rng: str = "packed"
  lora_fused_matmul: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    kernel = self.param("kernel", nn.initializers.normal(INIT_STD), (x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    x = x.astype(self.dtype)
    if (self.lora_fused_matmul and self.has_variable("params", "lora_a")
        and (self.lora_dropout == 0.0 or deterministic)):  # the adapter reads x itself: one matmul
      a, b = (self.get_variable("params", n).astype(self.dtype) for n in ("lora_a", "lora_b"))
      return fused_lora.linear(x, kernel.astype(self.dtype), bias.astype(self.dtype), a, b,
                               _lora_scale(self))
    y = jnp.dot(x, kernel.astype(self.dtype)) + bias.astype(self.dtype)
    return y + lora_delta(self, x, deterministic)


def _lora_scale(module: nn.Module) -> float:
  """The module's LoRA scale; an error when its parameters hold adapters but it was built without."""
  if module.lora_scale is None:
    raise ValueError(
        f"parameters at {'/'.join(module.scope.path)} hold LoRA adapters but the model was built "
        "without a LoRA scale: build it with gpt2_lora_jax.lora.make_model(config, lora_config)")
  return module.lora_scale


def lora_delta(module: nn.Module, x, deterministic: bool):
  """s * dropout(x) A B when `module`'s parameters hold lora_a/lora_b, else 0. Never forms A B."""
  if not module.has_variable("params", "lora_a"):
    return 0.0
  _lora_scale(module)
  a = module.get_variable("params", "lora_a").astype(module.dtype)  # (in, r)
  b = module.get_variable("params", "lora_b").astype(module.dtype)  # (r, out)
  if module.lora_dropout > 0.0 and module.lora_dropout_rng == "bernoulli":  # flax's, as it was
    x = nn.Dropout(module.lora_dropout, name="lora_dropout")(x, deterministic=deterministic)
  elif module.lora_dropout > 0.0 and not deterministic:
    x = dropout_lib.apply(x, module.lora_dropout, module.make_rng("dropout"), module.lora_dropout_rng)
  return (jnp.dot(x, a) @ b) * jnp.asarray(module.lora_scale, module.dtype)


class LMHead(nn.Module):
  """Logits = h E^T with the tied embedding E (or an own kernel when untied), + LoRA if present."""
  vocab_size: int
  tied: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_scale: Optional[float] = None
  lora_dropout: float = 0.0
  lora_dropout_rng: str = "packed"

  @nn.compact
  def __call__(self, h_BTD, embedding_VD, deterministic: bool = True):
    h_BTD = h_BTD.astype(self.dtype)
    if self.tied:
      logits = jnp.einsum("btd,vd->btv", h_BTD, embedding_VD.astype(self.dtype))
    else:
      kernel = self.param("kernel", nn.initializers.normal(INIT_STD), (h_BTD.shape[-1], self.vocab_size),
                          self.param_dtype)
      logits = jnp.dot(h_BTD, kernel.astype(self.dtype))
    return logits + lora_delta(self, h_BTD, deterministic)


class Attention(nn.Module):
  config: GPT2Config
  lora_scale: Optional[float] = None
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x_BTD, mask: attention.Mask, kv_cache=None, cache_index=None, deterministic=True):
    cfg = self.config
    dense = lambda n, name: Linear(n, _dtype(cfg.dtype), _dtype(cfg.param_dtype), self.lora_scale,
                                   self.lora_dropout, cfg.lora_dropout_rng, cfg.lora_fused_matmul, name=name)
    B, T, D = x_BTD.shape
    qkv = dense(3 * D, "c_attn")(x_BTD, deterministic)
    q, k, v = (t.reshape(B, T, cfg.n_head, cfg.head_dim) for t in jnp.split(qkv, 3, axis=-1))
    new_cache = None
    if kv_cache is not None:  # write this chunk's keys/values at [cache_index, cache_index + T)
      k = write_cache(kv_cache["k"], k.astype(kv_cache["k"].dtype), cache_index)
      v = write_cache(kv_cache["v"], v.astype(kv_cache["v"].dtype), cache_index)
      new_cache = {"k": k, "v": v}
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    out = attention.attend(q, k, v, mask)  # the kernel chosen once per forward pass (layer_mask)
    out = dense(D, "c_proj")(out.reshape(B, T, D), deterministic)
    return out, new_cache


def write_cache(cache_BSHK, chunk_BTHK, cache_index):
  """cache_BSHK with chunk_BTHK written at slots [cache_index, cache_index + T): one slot for all
  rows (an int or a scalar), or per row (a (B,) vector: row b's at cache_index[b], a scatter)."""
  if jnp.ndim(cache_index) == 1:
    write_row = lambda c_SHK, x_THK, i: jax.lax.dynamic_update_slice(c_SHK, x_THK, (i, 0, 0))
    return jax.vmap(write_row)(cache_BSHK, chunk_BTHK, jnp.asarray(cache_index, jnp.int32))
  return jax.lax.dynamic_update_slice(cache_BSHK, chunk_BTHK, (0, cache_index, 0, 0))


class MLP(nn.Module):
  config: GPT2Config
  lora_scale: Optional[float] = None
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x_BTD, deterministic=True):
    cfg = self.config
    dense = lambda n, name: Linear(n, _dtype(cfg.dtype), _dtype(cfg.param_dtype), self.lora_scale,
                                   self.lora_dropout, cfg.lora_dropout_rng, cfg.lora_fused_matmul, name=name)
    h = dense(4 * cfg.n_embd, "c_fc")(x_BTD, deterministic)
    h = jax.nn.gelu(h, approximate=True)  # GPT-2's 'gelu_new'
    return dense(cfg.n_embd, "c_proj")(h, deterministic)


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
  config: GPT2Config
  lora_scale: Optional[float] = None
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x_BTD, mask_B1TS, kv_cache=None, cache_index=None, deterministic=True):
    cfg = self.config
    ln = lambda name: nn.LayerNorm(cfg.layer_norm_epsilon, dtype=_dtype(cfg.dtype),
                                   param_dtype=_dtype(cfg.param_dtype), name=name)
    a, new_cache = Attention(cfg, self.lora_scale, self.lora_dropout, name="attn")(
        ln("ln_1")(x_BTD), mask_B1TS, kv_cache, cache_index, deterministic)
    x_BTD = x_BTD + a
    x_BTD = x_BTD + MLP(cfg, self.lora_scale, self.lora_dropout, name="mlp")(ln("ln_2")(x_BTD), deterministic)
    return x_BTD, new_cache


def make_attention_mask(T: int, S: int, attention_mask=None, segment_ids=None, query_offset=0):
  """Boolean (B|1, 1, T, S) mask: causal, keys marked valid, same segment. None if only causal.

  attention_mask (B, S): 1 for real tokens, 0 for padding (over the cache slots when decoding).
  segment_ids (B, T): packed conversations; a token attends only inside its own segment.
  query_offset: the key slot of the first query (the cache index when decoding).
  Every query may attend to itself, so a padding query never sees an all-masked row.
  """
  if attention_mask is None and segment_ids is None and query_offset == 0 and T == S:
    return None
  q_pos = jnp.arange(T)[:, None] + query_offset  # (T, 1)
  k_pos = jnp.arange(S)[None, :]  # (1, S)
  mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
  if attention_mask is not None:
    mask = mask & (attention_mask[:, None, None, :] > 0)
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return mask | (k_pos == q_pos)[None, None]


def choose_attention(config: GPT2Config, T: int, kind: str = "segments") -> str:
  """The attention path for T queries of mask `kind` (attention.MASK_KINDS; 'segments': packed
  training rows), with the probes that choice needs run now (once per process; train.run calls it
  before compiling a step so that their time is measured apart)."""
  if config.attention_impl == "xla":  # 'xla' asks nothing of the platform
    return "xla"
  return attention.select_path(config.attention_impl, kind, attention.platform(), config.dtype,
                               config.head_dim, T, config.max_segments_per_row, probe=attention.probe)


def layer_path(config: GPT2Config, T: int, S: int, attention_mask=None, segment_ids=None,
               query_offset=0, kv_lengths=None) -> str:
  """The attention path (attention.PATHS) layer_mask chooses for these inputs. Reads only which
  inputs are given (and the platform), never their values: no array operation runs, so a caller
  outside jit (the benchmark's label of the path) compiles nothing."""
  return choose_attention(config, T, attention.mask_kind(T, S, attention_mask, segment_ids, query_offset,
                                                          kv_lengths))


def layer_mask(config: GPT2Config, T: int, S: int, attention_mask=None, segment_ids=None,
               query_offset=0, kv_lengths=None) -> attention.Mask:
  """What every layer's attention gets: the kernel for this call and the mask in its form.

  The dense mask of make_attention_mask (XLA, the reference) or, for packed rows on cuDNN's packed
  layout, per-row segment lengths and offsets instead (attention.py chooses and explains). With
  kv_lengths (B,) (a KV cache filled from slot 0, the sampler's): key slot s is seen by query t
  iff s <= query_offset + t and s < kv_lengths[b] (attention.lengths_mask), as per-row kv lengths
  on cuDNN where they express it.
  """
  path = layer_path(config, T, S, attention_mask, segment_ids, query_offset, kv_lengths)
  if kv_lengths is not None:
    return attention.build_lengths_mask(path, T, S, kv_lengths, query_offset)
  dense = None
  if path in ("xla", "cudnn_mask"):
    dense = make_attention_mask(T, S, attention_mask, segment_ids, query_offset)
  return attention.build_mask(path, dense, segment_ids, config.max_segments_per_row)


class GPT2(nn.Module):
  """GPT2LMHeadModel. apply({'params': p}, input_ids) -> logits (B, T, V).

  Optional inputs: attention_mask (B, T) with 0 at padding; position_ids (B, T) (default 0..T-1,
  as Hugging Face's forward); segment_ids (B, T) for packed rows (attention stays in a segment);
  kv_cache (from init_kv_cache) with cache_index: then attention_mask covers the cache slots (B, S)
  and the call returns (logits, new_kv_cache). cache_index is where the chunk is written: one slot
  for all rows, or per row (B,). kv_lengths (B,) instead of attention_mask: row b's valid keys are
  cache slots [0, kv_lengths[b]) and query t (at slot cache_index + t) sees those up to its own
  (the sampler's layout, sample.py; on cuDNN as per-row kv lengths, attention.py).
  return_hidden=True returns the final hidden states instead of logits (for a chunked loss);
  GPT2.logits turns them into logits.
  """
  config: GPT2Config
  lora_scale: Optional[float] = None  # set by lora.make_model when the tree carries adapters
  lora_dropout: float = 0.0

  def setup(self):
    cfg = self.config
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    init = nn.initializers.normal(INIT_STD)
    self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, dtype=dt, param_dtype=pdt)
    self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=nn.initializers.normal(WPE_INIT_STD),
                        dtype=dt, param_dtype=pdt)
    block = Block
    if cfg.remat != "none":
      policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "dots"
                else jax.checkpoint_policies.nothing_saveable)
      # Under scan, CSE across iterations cannot undo the remat, so it need not be prevented.
      block = nn.remat(Block, policy=policy, static_argnums=(5,), prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      # Carry: x. Scanned: the layer's parameters, dropout RNG and KV cache. Broadcast: the mask,
      # the cache index and `deterministic`.
      self.h = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                       in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast), length=cfg.n_layer)(
                           cfg, self.lora_scale, self.lora_dropout)
    else:
      self.h = [block(cfg, self.lora_scale, self.lora_dropout) for _ in range(cfg.n_layer)]
    self.ln_f = nn.LayerNorm(cfg.layer_norm_epsilon, dtype=dt, param_dtype=pdt)
    self.lm_head = LMHead(cfg.vocab_size, cfg.tie_word_embeddings, dt, pdt, self.lora_scale,
                          self.lora_dropout, cfg.lora_dropout_rng)

  def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None,
               kv_cache=None, cache_index=None, deterministic=True, return_hidden=False,
               kv_lengths=None):
    B, T = input_ids.shape
    if position_ids is None:
      offset = 0 if cache_index is None else jnp.reshape(jnp.asarray(cache_index), (-1, 1))
      position_ids = jnp.broadcast_to(jnp.arange(T)[None] + offset, (B, T))
    if kv_cache is None:
      mask = layer_mask(self.config, T, T, attention_mask, segment_ids, kv_lengths=kv_lengths)
    else:
      S = (kv_cache["k"].shape[2] if self.config.scan_layers else kv_cache[0]["k"].shape[1])
      mask = layer_mask(self.config, T, S, attention_mask, segment_ids, query_offset=cache_index,
                        kv_lengths=kv_lengths)
    x = self.wte(input_ids) + self.wpe(position_ids)
    if self.config.scan_layers:
      x, new_cache = self.h(x, mask, kv_cache, cache_index, deterministic)
    else:
      new_cache = []
      for i, block in enumerate(self.h):
        x, c = block(x, mask, None if kv_cache is None else kv_cache[i], cache_index, deterministic)
        new_cache.append(c)
    h = self.ln_f(x)
    out = h if return_hidden else self.logits(h, deterministic)
    return out if kv_cache is None else (out, new_cache)

  def logits(self, h_BTD, deterministic=True):
    return self.lm_head(h_BTD, self.wte.embedding, deterministic)



def init_kv_cache(config: GPT2Config, batch_size: int, max_length: int, dtype=None):
  """Per-layer {'k', 'v'} buffers of shape (B, S, H, K), zero-filled; with config.scan_layers one
  {'k', 'v'} pair of (L, B, S, H, K) buffers (the layer axis is scanned)."""
  dtype = _dtype(config.dtype) if dtype is None else dtype
  shape = (batch_size, max_length, config.n_head, config.head_dim)
  if config.scan_layers:
    shape = (config.n_layer,) + shape
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.n_layer)]


def init_params(config: GPT2Config, rng) -> dict:
  """Random GPT-2 parameters (normal(0.02), as Hugging Face initialises linears and embeddings).

  Always the per-layer tree (h_0 ... h_{L-1}), whatever config.scan_layers says: the layout of
  checkpoints, exports and adapters; stacking.stack_layers turns it into what a scanned model takes.
  """
  ids = jnp.zeros((1, 1), jnp.int32)
  return GPT2(config.replace(scan_layers=False)).init(rng, ids)["params"]


def param_shapes(config: GPT2Config) -> dict:
  """The per-layer parameter tree as ShapeDtypeStructs, computed without allocating anything."""
  return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
