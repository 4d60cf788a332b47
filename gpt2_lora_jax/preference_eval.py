"""What a comparison of trained models (evaluate.compare) measures beyond answers and rewards.

preference.json: the held-out (chosen, rejected) pairs (preference.build on the held-out sample) with
each pair's source row, subset and reply lengths in tokens, and every model's summed log-probability
of both replies; stats.preference_summary turns them into accuracies with intervals, length-
normalised accuracies, implicit-reward accuracies and paired tests.

drift.jsonl: the DPO paper's view of reward against KL (Rafailov et al. 2023, Fig. 2). For every two
models (later, earlier) and every prompt, the later model's sampled answer is scored under both:
log pi_later(answer | prompt) - log pi_earlier(answer | prompt), summed over the answer's tokens
(its end-of-text too when the sampler stopped on it). Its mean over prompts estimates the KL
divergence of the earlier model's answers from the later's, because the answers are the later
model's own samples. Both models are scored at the sampling temperature (logits / eval.temperature;
greedy answers are scored at temperature 1 and are no sample, so the mean is then only a log-ratio),
so the estimate is KL between the distributions the answers were drawn from; top_k / top_p
truncation is not applied in the scoring (the report says when they were set). stats.drift_summary
sets it beside the later model's reward gain over the earlier.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_lora_jax import data, packing, sharding
from gpt2_lora_jax import loss as loss_lib

EOT_ID = packing.PAD_ID  # GPT-2's end-of-text


def local_mesh():
  """Where evaluate.restore_finetuned placed the trees: the run's devices, or this process's first
  device when there are several processes (each evaluates alone)."""
  devices = jax.devices() if jax.process_count() == 1 else jax.local_devices()[:1]
  return sharding.make_mesh(-1, 1, devices=devices)


def preference_logps(config, exp, named: list, cache_dir: str) -> dict:
  """preference.json's content: the held-out pairs and each model's log-probs of both replies."""
  from gpt2_lora_jax import dpo, preference
  ecfg = config.eval
  pairs, summary = preference.build(config.data, exp.tokenizer, "eval", ecfg.batch_size, cache_dir, log=None)
  _, subsets, _ = data.read_inputs(config.data, "eval")
  at = (pairs.pair_packed_row, pairs.pair_slot)  # pair p's (packed row, slot): pair order
  logps = {name: dpo.reference_logps(model, {}, params, pairs, local_mesh(), ecfg.batch_size, local=True)[at]
           for name, model, params in named}  # (pairs, 2) each
  return {"pairs": pairs.num_pairs, "rows": pairs.pair_rows.tolist(),
          "subsets": [subsets[r] for r in pairs.pair_rows],
          "reply_tokens": pairs.pair_reply_tokens.tolist(),
          "logps": {name: lp.tolist() for name, lp in logps.items()},
          "data": {k: summary[k] for k in ("rows_read", "rows_used", "rows_truncated", "rows_skipped",
                                            "cut_because_paired", "subsets", "max_length")}}


@functools.partial(jax.jit, static_argnames=("model", "num_slots", "inverse_temperature"))
def _slot_logps(model, params, batch, num_slots: int, inverse_temperature: float):
  """(B, S) log-prob of each slot's tokens (reply_index), logits scaled by inverse_temperature.

  The head is linear in the final hidden state (and its adapter, if any, too; no dropout here), so
  scaling the hidden state scales the logits.
  """
  h_BTD = model.apply({"params": params}, batch["inputs"], position_ids=batch["positions"],
                      segment_ids=batch["segment_ids"], deterministic=True, return_hidden=True)
  cfg = model.config
  spec = loss_lib.HeadSpec(vocab_size=cfg.vocab_size, tied=cfg.tie_word_embeddings, dtype=cfg.dtype,
                           lora_scale=float(model.lora_scale or 0.0), deterministic=True)
  h_BTD = h_BTD * jnp.asarray(inverse_temperature, h_BTD.dtype)
  logp_BT = loss_lib.token_logps(h_BTD, loss_lib.head_from_params(params, cfg.tie_word_embeddings),
                                 batch["targets"], spec)
  onehot_BTS = (batch["reply_index"][..., None] == jnp.arange(num_slots)).astype(jnp.float32)
  return jnp.einsum("bt,bts->bs", logp_BT, onehot_BTS)


def answer_logps(model, params, prompt_ids: list, answer_ids: list, *, temperature: float,
                 batch_size: int, max_segments: int = 32) -> np.ndarray:
  """(n,) log pi(answer | prompt) summed over the answer's tokens, at `temperature` (0: 1).

  Sequences (prompt + answer) are packed into rows of the model's n_positions, each in its own
  segment (packing.pack), so each is scored as it would be alone.
  """
  n_positions = model.config.n_positions
  segments, masks = [], []
  for p, a in zip(prompt_ids, answer_ids):
    ids = np.asarray(list(p) + list(a), np.int32)
    mask = np.zeros(len(ids) - 1, bool)
    mask[len(p) - 1:] = True  # targets ids[1:]: the answer's tokens
    segments.append(ids)
    masks.append(mask)
  if not segments:
    return np.zeros(0)
  packed = packing.pack(segments, masks, range(len(segments)), n_positions, True, max_segments)
  slot = np.zeros(len(segments), np.int64)  # a segment's place in its row
  for r in np.unique(packed.conversation_packed_row):
    members = np.flatnonzero(packed.conversation_packed_row == r)
    slot[members[np.argsort(packed.conversation_start[members])]] = np.arange(len(members))
  num_slots = int(slot.max()) + 1
  reply_index = np.full(packed.inputs.shape, -1, np.int32)
  for k in range(len(segments)):
    r, start, L = packed.conversation_packed_row[k], packed.conversation_start[k], packed.conversation_length[k]
    reply_index[r, start:start + L][packed.loss_mask[r, start:start + L]] = slot[k]
  mesh = local_mesh()
  out = np.zeros((packed.num_rows, num_slots), np.float32)
  inverse_temperature = 1.0 / temperature if temperature > 0 else 1.0
  for first, batch in zip(range(0, packed.num_rows, batch_size), packing.eval_batches(packed, batch_size)):
    rows = np.arange(first, first + batch_size)
    batch["reply_index"] = np.where((rows < packed.num_rows)[:, None],
                                    reply_index[np.minimum(rows, packed.num_rows - 1)], -1).astype(np.int32)
    logps = _slot_logps(model, params, sharding.global_batch(batch, mesh), num_slots, inverse_temperature)
    n = min(batch_size, packed.num_rows - first)
    out[first:first + n] = sharding.fetch_to_host(logps)[:n]
  return out[packed.conversation_packed_row, slot]


def drift_rows(config, exp, named: list, ids: list, prompts: list, results_of: dict) -> list[dict]:
  """drift.jsonl's rows: for every (later, earlier) pair of `named` and every prompt, the later
  model's answer scored under both models (module docstring)."""
  ecfg = config.eval
  most = exp.gpt2_config.n_positions - ecfg.max_new_tokens
  prompt_ids = [data.fit_prompt_token_ids(exp.tokenizer, p, most)[0] for p in prompts]  # as sampled
  rows = []
  for j, (later, later_model, later_params) in enumerate(named):
    if j == 0:
      continue
    answers = [r["tokens"] + ([EOT_ID] if r["stop_reason"] == "eos" else []) for r in results_of[later]]
    score = lambda model, params: answer_logps(model, params, prompt_ids, answers,
                                               temperature=ecfg.temperature, batch_size=ecfg.batch_size)
    own = score(later_model, later_params)
    for earlier, earlier_model, earlier_params in named[:j]:
      other = score(earlier_model, earlier_params)
      rows += [{"id": pid, "model": later, "reference": earlier, "logp_model": float(a),
                "logp_reference": float(b), "n_tokens": len(t), "temperature": ecfg.temperature,
                "top_k": ecfg.top_k, "top_p": ecfg.top_p}
               for pid, a, b, t in zip(ids, own, other, answers)]
  return rows
