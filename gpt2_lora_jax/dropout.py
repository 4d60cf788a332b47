"""LoRA dropout's keep-masks: 16-bit random values, four from each threefry hash.

    apply(x, rate, key, rng='packed') -> x * keep / P(keep), the adapters' dropout (training only)
    keep_mask(key, shape, rate)       -> bool mask, P(keep) = 1 - round(rate * 2^16) / 2^16

Why not jax.random.bernoulli (flax's nn.Dropout): with jax_threefry_partitionable (jax's default
since 0.5) every mask element costs one whole threefry2x32 hash (two 32-bit words, of which
bernoulli keeps 32 bits and then only compares them with a threshold). Here each hash's two words
give four 16-bit values, so a mask costs a quarter of the hashes. A rate is rounded to a multiple
of 2^-16 (0.05 -> 3277 / 65536 = 0.0500031) and the kept values are scaled by the rounded P(keep),
so E[apply(x)] = x exactly.

The counter of word w of a mask is its flat index (the high word 0), as jax's partitionable
threefry counts elements: a mask is the same function of its global index however the array is
sharded, so 1, 4 or 8 devices give the same bits (tests/test_dropout.py). Element j of the last
axis takes 16-bit value j % 4 of word j // 4 of its row (low half of the first word, high half,
low half of the second, high half).

The hash words pass an optimization barrier before they are split: a fusion that computed the
hash inside the per-element consumer would compute it four times, once per 16-bit value.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import random as jex_random

RNGS = ("packed", "bernoulli")
_LEVELS = 1 << 16


def keep_threshold(rate: float) -> int:
  """Values below this (of 2^16) are dropped: round(rate * 2^16)."""
  return int(round(float(rate) * _LEVELS))


def keep_probability(rate: float, rng: str = "packed") -> float:
  """P(keep) of the mask for `rate`: 1 - keep_threshold(rate) / 2^16 ('packed'), 1 - rate
  ('bernoulli')."""
  return 1.0 - (keep_threshold(rate) / _LEVELS if rng == "packed" else float(rate))


def _key_words(key):
  """The two uint32 words of a threefry key (a raw uint32[2] key or a typed threefry key)."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    impl = jax.random.key_impl(key)
    if "threefry" not in str(impl):
      raise ValueError(f"packed dropout needs a threefry2x32 key, got a {impl} key: set "
                       "model.lora_dropout_rng='bernoulli' for other PRNG implementations")
    key = jax.random.key_data(key)
  key = jnp.asarray(key, jnp.uint32)
  if key.shape != (2,):
    raise ValueError(f"packed dropout needs a threefry2x32 key of shape (2,), got {key.shape}")
  return key[0], key[1]


def _flat_iota(shape) -> jax.Array:
  """uint32 flat index of every element of `shape` (row-major), built from per-axis iotas so the
  SPMD partitioner can split it like any elementwise array."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  return index


def uniform16(key, shape) -> jax.Array:
  """uint16-valued (held as uint32) uniform random values of `shape`, four per threefry hash."""
  shape = tuple(int(d) for d in shape)
  if not shape:
    raise ValueError("uniform16 needs at least one axis")
  words = -(-shape[-1] // 4)
  word_shape = shape[:-1] + (words,)
  if math.prod(word_shape) >= 2 ** 32:
    raise ValueError(f"a dropout mask of shape {shape} needs more than 2^32 hash words")
  k1, k2 = _key_words(key)
  counts = _flat_iota(word_shape)
  w1, w2 = jex_random.threefry2x32_p.bind(k1, k2, jnp.zeros_like(counts), counts)
  w1, w2 = lax.optimization_barrier((w1, w2))
  lo = jnp.uint32(0xFFFF)
  values = jnp.stack([w1 & lo, w1 >> 16, w2 & lo, w2 >> 16], axis=-1)  # (..., words, 4)
  return values.reshape(shape[:-1] + (4 * words,))[..., :shape[-1]]


def keep_mask(key, shape, rate: float) -> jax.Array:
  """bool mask of `shape`: True with probability keep_probability(rate)."""
  return uniform16(key, shape) >= jnp.uint32(keep_threshold(rate))


def apply(x, rate: float, key, rng: str = "packed"):
  """Inverted dropout of x: x * keep / P(keep), in x's dtype. rng: 'packed' (keep_mask) or
  'bernoulli' (jax.random.bernoulli, one hash per element, as flax's nn.Dropout)."""
  if rate <= 0.0:
    return x
  return jnp.where(mask(key, x.shape, rate, rng), x / keep_probability(rate, rng), jnp.zeros((), x.dtype))


def mask(key, shape, rate: float, rng: str = "packed") -> jax.Array:
  """The keep-mask `apply` uses: keep_mask ('packed') or jax.random.bernoulli ('bernoulli')."""
  if rng == "packed":
    return keep_mask(key, shape, rate)
  if rng == "bernoulli":
    return jax.random.bernoulli(key, 1.0 - rate, shape)
  raise ValueError(f"lora dropout rng={rng!r}: choose one of {RNGS}")
