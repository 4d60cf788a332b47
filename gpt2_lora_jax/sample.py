"""Sampling answers from GPT-2: a jitted prefill + decode loop over a functional KV cache.

Two levels:

  generate_tokens(model, params, prompt_ids_BP, prompt_mask_BP, ...)  ids in, ids out (jitted)
  generate(model, params, tokenizer, prompts, ...)                    text in, answers out

Prompts are padded to a bucket length P (a power of two, capped at n_positions -
max_new_tokens) so jit compiles once per bucket, not per prompt.

Cache layout: each row's prompt occupies KV-cache slots 0 .. len_b - 1 (its real tokens moved to
the front, padding after them), and decode step i writes row b's token at slot len_b + i, a
per-row slot (model.write_cache scatters it). Positions equal slots. Row b's valid keys are then
always a prefix of its cache, slots [0, kv_length_b), so per-row kv lengths describe the whole
mask (model.GPT2's kv_lengths): the prefill's query t sees slots s <= t with s < len_b, decode
step i sees s < len_b + i + 1. Slots past a row's length (prompt padding, zeros) are never seen,
so a padded prompt yields exactly the tokens it would alone. On an NVIDIA GPU these masks run on
cuDNN as jax.nn.dot_product_attention(key_value_seq_lengths=...) (attention.py, path
cudnn_lengths); on CPU and TPU, and wherever cuDNN falls back, XLA attention with the same mask
built from the lengths. The prefill computes logits only at each row's last prompt token.

Randomness is per prompt, not per batch: row r draws its token i with fold_in(fold_in(seed,
row_id), i), so an answer depends on (seed, prompt index, prompt) and not on which prompts
share its batch or on the batch size.

Stopping: end-of-text stops a row inside the while_loop, and the loop exits when every row is
done. Stop strings are matched on decoded text on the host between chunks of `chunk_size`
steps (a row whose text holds a stop string is marked done, so the loop can exit early), and
the answer is cut exactly before the first stop string at the end.

`model` is a model.GPT2: one built with a LoRA scale runs adapters factored, a plain one runs
merged params (the fast path). Modules are hashable dataclasses, so it is a static jit arg.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_lora_jax.model import init_kv_cache
from gpt2_lora_jax.errors import UserError

EOT_ID = 50256  # GPT-2's end of text, also used as padding
STOP_REASONS = ("stop_string", "eos", "max_new_tokens")


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn. temperature 0 is greedy; top_k 0 and top_p 1 disable those."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
      raise UserError(f"bad sampling settings {self}: need temperature >= 0, top_k >= 0, "
                       "0 < top_p <= 1")


def sample_logits(logits_BV, keys_B, sampling: Sampling):
  """Next token per row (B,) from logits (B, V); keys_B: one PRNG key per row."""
  logits_BV = logits_BV.astype(jnp.float32)
  if sampling.temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / sampling.temperature
  if sampling.top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]  # (B, 1) smallest value kept
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if sampling.top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep a token while the mass before it is < top_p: the most likely token always stays.
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    cutoff_B1 = jnp.min(jnp.where(mass_before_BV < sampling.top_p, sorted_BV, jnp.inf), axis=-1,
                        keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _prefill(model, params, prompt_ids_BP, prompt_mask_BP, row_keys_B, max_new_tokens: int,
             sampling: Sampling):
  """Runs the prompts through the model once and draws the first new token; returns loop state."""
  B, P = prompt_ids_BP.shape
  # Each row's real tokens to its first slots, in order (stable sort: real before padding).
  order_BP = jnp.argsort(prompt_mask_BP == 0, axis=-1, stable=True)
  ids_BP = jnp.take_along_axis(prompt_ids_BP, order_BP, axis=-1)
  prompt_len_B = prompt_mask_BP.astype(jnp.int32).sum(-1)
  cache = init_kv_cache(model.config, B, P + max_new_tokens)
  hidden_BPD, cache = model.apply(
      {"params": params}, ids_BP, position_ids=jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P)),
      kv_cache=cache, cache_index=0, kv_lengths=prompt_len_B, return_hidden=True)
  last_B1D = jnp.take_along_axis(hidden_BPD, (prompt_len_B - 1)[:, None, None], axis=1)
  logits_B1V = model.apply({"params": params}, last_B1D, method="logits")
  return dict(
      step=jnp.zeros((), jnp.int32),  # tokens generated so far
      logits_BV=logits_B1V[:, 0].astype(jnp.float32),  # next-token logits
      cache=cache,
      prompt_len_B=prompt_len_B,  # decode step i writes row b at slot prompt_len_B[b] + i
      tokens_BN=jnp.zeros((B, max_new_tokens), jnp.int32),
      done_B=jnp.zeros((B,), bool),
      eos_B=jnp.zeros((B,), bool),  # the row stopped at end-of-text
      row_keys_B=row_keys_B)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6), donate_argnums=(2,))
def _decode(model, params, state, until, sampling: Sampling, eos_id: Optional[int], pad_id: int):
  """Draws tokens until `until` of them exist or every row is done (a lax.while_loop)."""
  B, N = state["tokens_BN"].shape

  def cond(s):
    return (s["step"] < jnp.minimum(until, N)) & ~jnp.all(s["done_B"])

  def body(s):
    i = s["step"]
    keys_B = jax.vmap(lambda k: jax.random.fold_in(k, i))(s["row_keys_B"])
    token_B = sample_logits(s["logits_BV"], keys_B, sampling)
    token_B = jnp.where(s["done_B"], pad_id, token_B)
    tokens_BN = jax.lax.dynamic_update_slice(s["tokens_BN"], token_B[:, None], (0, i))
    is_eos_B = (token_B == eos_id) & ~s["done_B"] if eos_id is not None else jnp.zeros_like(s["done_B"])
    # Feed the new token at the row's slot len + i (also its position); it sees slots [0, len + i].
    slot_B = s["prompt_len_B"] + i
    logits_B1V, cache = model.apply({"params": params}, token_B[:, None], position_ids=slot_B[:, None],
                                    kv_cache=s["cache"], cache_index=slot_B, kv_lengths=slot_B + 1)
    return {**s, "step": i + 1, "logits_BV": logits_B1V[:, 0].astype(jnp.float32), "cache": cache,
            "tokens_BN": tokens_BN, "done_B": s["done_B"] | is_eos_B, "eos_B": s["eos_B"] | is_eos_B}

  return jax.lax.while_loop(cond, body, state)


def generate_tokens(model, params, prompt_ids_BP, prompt_mask_BP, *, max_new_tokens: int,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    row_ids: Optional[Sequence[int]] = None, eos_id: Optional[int] = EOT_ID,
                    pad_id: int = EOT_ID, chunk_size: Optional[int] = None,
                    should_stop: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> dict:
  """Continues padded prompts by up to max_new_tokens tokens.

  prompt_ids_BP / prompt_mask_BP: (B, P) int; mask 1 on real tokens (at least one per row), 0 on
  padding on either side (each row's real tokens go to its first cache slots, in order).
  row_ids (B,): what each row's random stream is keyed on (default 0..B-1), see module doc.
  eos_id: a row stops after drawing it (None: never stop on a token).
  pad_id: written into a row's remaining slots once it is done.
  should_stop: host callback, called every chunk_size steps with the tokens so far (B, i) and
    returning (B,) bool of rows to stop (stop strings); rows it flags are done from then on.
  Returns {'tokens': (B, N) int32 numpy, 'num_steps': steps run, 'eos': (B,) bool,
  'stopped': (B,) bool rows flagged by should_stop}. A row's tokens after it is done are pad_id.
  """
  sampling = Sampling(float(temperature), int(top_k), float(top_p))
  prompt_ids_BP = jnp.asarray(prompt_ids_BP, jnp.int32)
  prompt_mask_BP = jnp.asarray(prompt_mask_BP, jnp.int32)
  B = prompt_ids_BP.shape[0]
  if not np.all(np.asarray(prompt_mask_BP).sum(-1) > 0):
    raise ValueError("every prompt row needs at least one real token (prompt_mask_BP is 0 on a whole row)")
  row_ids = np.arange(B) if row_ids is None else np.asarray(row_ids)
  base_key = jax.random.PRNGKey(seed)
  row_keys_B = jax.vmap(lambda r: jax.random.fold_in(base_key, r))(jnp.asarray(row_ids, jnp.uint32))
  state = _prefill(model, params, prompt_ids_BP, prompt_mask_BP, row_keys_B, max_new_tokens, sampling)
  chunk = max_new_tokens if chunk_size is None or should_stop is None else chunk_size
  stopped_B = np.zeros((B,), bool)
  step = 0
  while step < max_new_tokens:
    state = _decode(model, params, state, jnp.int32(step + chunk), sampling, eos_id, pad_id)
    step, done_B = int(state["step"]), np.asarray(state["done_B"])
    if done_B.all():
      break
    if should_stop is not None and step < max_new_tokens:
      newly_B = np.asarray(should_stop(np.asarray(state["tokens_BN"][:, :step]))) & ~done_B
      if newly_B.any():
        stopped_B |= newly_B
        state["done_B"] = jnp.asarray(done_B | newly_B)
  return {"tokens": np.asarray(state["tokens_BN"]), "num_steps": step,
          "eos": np.asarray(state["eos_B"]), "stopped": stopped_B}


def bucket_length(n: int, cap: int, min_bucket: int = 16) -> int:
  """The smallest power of two >= n (at least min_bucket), never above cap."""
  return min(cap, max(min_bucket, 1 << max(n - 1, 0).bit_length()))


def cut_answer(text: str, stop_strings: Sequence[str]):
  """(text before the earliest stop string, whether one was found)."""
  hits = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
  return (text[:min(hits)], True) if hits else (text, False)


def generate(model, params, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128,
             temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0,
             stop_strings: Sequence[str] = ("\n\nHuman:",), seed: int = 0, batch_size: int = 32,
             eos_id: Optional[int] = EOT_ID, chunk_size: int = 32, min_bucket: int = 16,
             encode: Optional[Callable[[str, int], tuple]] = None,
             progress: Optional[Callable[[int, int], None]] = None) -> list[dict]:
  """Samples one answer per prompt, in the prompts' order.

  Each result: {'answer': text cut exactly before the first stop string (or at end-of-text),
  'tokens': generated ids the answer came from (up to the one completing the stop string;
  end-of-text excluded), 'n_answer_tokens': GPT-2 tokens in `answer` (re-encoded),
  'stop_reason': 'stop_string' | 'eos' | 'max_new_tokens', 'prompt_tokens': prompt tokens fed,
  'prompt_tokens_cut': tokens cut from the prompt's start to fit n_positions - max_new_tokens,
  'truncated': whether any were}. sum(r['truncated'] for r in results) is the count to report.
  encode(prompt, most tokens) -> (ids, tokens cut): tokenises and fits a prompt. Evaluation passes
  data.fit_prompt_token_ids, which tokenises exactly as training did and cuts whole turns from the
  left as training does. Default: the plain tokenizer, cut token by token from the left.
  progress: called with (prompts done, prompts in all) after each batch.
  """
  n_positions = model.config.n_positions
  max_prompt = n_positions - max_new_tokens
  if max_prompt < 1:
    raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                     f"n_positions={n_positions}")
  stop_strings = tuple(s for s in stop_strings if s)
  if encode is None:
    def encode(prompt, most):
      ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
      return ids[max(0, len(ids) - most):], max(0, len(ids) - most)  # keep the end of the dialogue
  encoded, tokens_cut = map(list, zip(*(encode(p, max_prompt) for p in prompts))) if prompts else ([], [])
  if any(len(ids) > max_prompt for ids in encoded):
    raise AssertionError(f"encode returned a prompt longer than {max_prompt} tokens")
  if any(len(ids) == 0 for ids in encoded):
    empty = [i for i, ids in enumerate(encoded) if not ids]
    raise ValueError(f"prompts {empty[:10]} are empty; every prompt needs at least one token")

  def decode_text(ids):
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

  def should_stop(tokens_BI):
    return np.array([cut_answer(decode_text(row[row != eos_id] if eos_id is not None else row),
                                stop_strings)[1] for row in tokens_BI])

  # Sorting by length puts similar prompts together: fewer padded tokens, fewer large buckets.
  order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
  results: list[Optional[dict]] = [None] * len(prompts)
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    idx_padded = idx + [idx[0]] * (batch_size - len(idx))  # fixed batch shape: repeat a prompt
    P = bucket_length(max(len(encoded[i]) for i in idx), max_prompt, min_bucket)
    pad_id = EOT_ID if eos_id is None else eos_id  # never a token an answer keeps
    ids_BP = np.full((batch_size, P), pad_id, np.int32)
    mask_BP = np.zeros((batch_size, P), np.int32)
    for r, i in enumerate(idx_padded):  # right-padded: the layout of the cache (module doc)
      n = len(encoded[i])
      ids_BP[r, :n] = encoded[i]
      mask_BP[r, :n] = 1
    out = generate_tokens(model, params, ids_BP, mask_BP, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          row_ids=idx_padded, eos_id=eos_id, pad_id=pad_id,
                          chunk_size=chunk_size, should_stop=should_stop if stop_strings else None)
    for r, i in enumerate(idx):
      results[i] = _finish_row(out["tokens"][r], eos_id, stop_strings, decode_text, tokenizer)
      results[i].update(prompt_tokens=len(encoded[i]), prompt_tokens_cut=tokens_cut[i],
                        truncated=tokens_cut[i] > 0)
    if progress is not None:
      progress(start + len(idx), len(prompts))
  return results


def _finish_row(tokens_N, eos_id, stop_strings, decode_text, tokenizer) -> dict:
  """Cuts one row's tokens at end-of-text and its text exactly before the first stop string."""
  tokens = [int(t) for t in tokens_N]
  reason = "max_new_tokens"
  if eos_id is not None and eos_id in tokens:
    tokens, reason = tokens[:tokens.index(eos_id)], "eos"
  answer, hit = cut_answer(decode_text(tokens), stop_strings)
  if hit:
    reason = "stop_string"
    # Keep the ids up to the one that completes the stop string (the shortest prefix that holds it).
    k = next(k for k in range(1, len(tokens) + 1) if cut_answer(decode_text(tokens[:k]), stop_strings)[1])
    tokens = tokens[:k]
  n_answer = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) if answer else 0
  return {"answer": answer, "tokens": tokens, "n_answer_tokens": n_answer, "stop_reason": reason}
