"""sample.py against independent references: transformers' greedy generate, a no-cache loop, the
left-padded sampler the cache layout replaced, and the programs it lowers to for a GPU."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_hf_gpt2
from gpt2_lora_jax import sample, stacking, weights
from gpt2_lora_jax.model import GPT2, init_kv_cache

SMALL_VOCAB = 1000  # small head: fast, and no end-of-text id (50256) that could stop a row
NEW_TOKENS = 36


def make_varied_hf_gpt2(out_dir, **kw):
  """make_hf_gpt2 with every weight matrix and embedding x10 (std 0.2), saved again.

  With conftest's scales the biases (std 0.1) swamp this tiny model's residual stream (embeddings
  std 0.02): its greedy answer is one token repeated, whatever the prompt (measured: token 779 at
  every step of every row here; ' killed killed ...' with the real vocabulary), which no test of
  positions or masks can see through. x10: 12 to 22 distinct tokens in 24 greedy steps per row
  (3 prompt sets x 8 rows, 1000-token vocabulary)."""
  import torch
  hf = make_hf_gpt2(out_dir, **kw)
  with torch.no_grad():
    for p in hf.parameters():
      if p.ndim == 2:
        p.mul_(10.0)
  hf.save_pretrained(out_dir)
  return hf


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
  """(torch model, flax module, params) of one random-weight GPT-2 with a 1000-token vocabulary."""
  d = str(tmp_path_factory.mktemp("small_vocab_gpt2"))
  hf = make_varied_hf_gpt2(d, vocab_size=SMALL_VOCAB, seed=1)
  config, params = weights.load_pretrained(d)
  return hf, GPT2(config), params


@pytest.fixture(scope="module")
def varied_full_model(tmp_path_factory):
  """Flax module + params of a GPT-2 with the real vocabulary whose answers vary (text-level tests)."""
  d = str(tmp_path_factory.mktemp("varied_gpt2"))
  make_varied_hf_gpt2(d, seed=2)
  config, params = weights.load_pretrained(d)
  return GPT2(config), params


@pytest.fixture(scope="module")
def full_model(tiny_hf_dir):
  """Flax module + params of the tiny GPT-2 with the real vocabulary (for text-level tests)."""
  config, params = weights.load_pretrained(tiny_hf_dir)
  return GPT2(config), params


def left_padded(prompts, pad_id=0):
  """(ids (B, P), mask (B, P)) numpy arrays with every prompt right-aligned."""
  P = max(len(p) for p in prompts)
  ids = np.full((len(prompts), P), pad_id, np.int32)
  mask = np.zeros((len(prompts), P), np.int32)
  for r, p in enumerate(prompts):
    ids[r, P - len(p):], mask[r, P - len(p):] = p, 1
  return ids, mask


def random_prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(1, SMALL_VOCAB, n)) for n in lengths]


def test_greedy_matches_transformers_generate(small_model):
  import torch
  hf, model, params = small_model
  ids, mask = left_padded(random_prompts([3, 11, 7, 16]))
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                      attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=False,
                      max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0,
                      eos_token_id=None)
  ref = ref[:, ids.shape[1]:].numpy()
  assert ref.shape == (4, NEW_TOKENS)
  out = sample.generate_tokens(model, params, ids, mask, max_new_tokens=NEW_TOKENS, eos_id=None, pad_id=0)
  np.testing.assert_array_equal(out["tokens"], ref)
  assert out["num_steps"] == NEW_TOKENS


def naive_greedy(model, params, prompts, n_new):
  """Recomputes the whole (unpadded) sequence for every new token, one prompt at a time.

  The sequence is right-padded to one fixed length so the forward compiles once; causal
  attention means the padding after the last real token changes nothing before it.
  """
  L = max(len(p) for p in prompts) + n_new
  forward = jax.jit(lambda ids: model.apply({"params": params}, ids))
  out = []
  for p in prompts:
    seq = list(p)
    for _ in range(n_new):
      logits = forward(jnp.asarray([seq + [0] * (L - len(seq))], jnp.int32))
      seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    out.append(seq[len(p):])
  return np.array(out)


def test_kv_cache_matches_full_recompute(small_model):
  _, model, params = small_model
  prompts = random_prompts([5, 12, 1], seed=3)
  ids, mask = left_padded(prompts)
  # An extra bucket of padding on the left must not change anything either.
  ids = np.pad(ids, ((0, 0), (4, 0)))
  mask = np.pad(mask, ((0, 0), (4, 0)))
  out = sample.generate_tokens(model, params, ids, mask, max_new_tokens=12, eos_id=None, pad_id=0)
  np.testing.assert_array_equal(out["tokens"], naive_greedy(model, params, prompts, 12))


def test_top_k_1_and_tiny_top_p_equal_greedy(small_model):
  _, model, params = small_model
  ids, mask = left_padded(random_prompts([4, 9], seed=5))
  kw = dict(max_new_tokens=10, eos_id=None, pad_id=0)
  greedy = sample.generate_tokens(model, params, ids, mask, **kw)["tokens"]
  top_k = sample.generate_tokens(model, params, ids, mask, temperature=1.0, top_k=1, seed=3, **kw)
  top_p = sample.generate_tokens(model, params, ids, mask, temperature=1.0, top_p=1e-6, seed=4, **kw)
  np.testing.assert_array_equal(top_k["tokens"], greedy)
  np.testing.assert_array_equal(top_p["tokens"], greedy)


def test_top_k_and_top_p_restrict_the_support():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  top_p = sample.sample_logits(logits, keys, sample.Sampling(1.0, 0, 0.7))  # 0.5 + 0.3 >= 0.7
  assert set(np.asarray(top_p).tolist()) == {0, 1}
  top_k = sample.sample_logits(logits, keys, sample.Sampling(1.0, 3, 1.0))
  assert set(np.asarray(top_k).tolist()) == {0, 1, 2}


def test_eos_stops_rows_and_exits_the_loop_early(small_model):
  _, model, params = small_model
  # Make token 7 win every step: a zero final-norm scale leaves logits = ln_f.bias . E_v.
  params = jax.tree_util.tree_map(lambda x: x, params)
  params["ln_f"] = {"scale": jnp.zeros_like(params["ln_f"]["scale"]),
                    "bias": params["wte"]["embedding"][7] * 50.0}
  ids, mask = left_padded(random_prompts([3, 6], seed=7))
  out = sample.generate_tokens(model, params, ids, mask, max_new_tokens=20, eos_id=7, pad_id=0)
  assert out["num_steps"] == 1 and out["eos"].all()
  np.testing.assert_array_equal(out["tokens"][:, 0], [7, 7])
  np.testing.assert_array_equal(out["tokens"][:, 1:], 0)


def test_lora_model_with_zero_adapters_gives_the_base_tokens(small_model):
  _, model, params = small_model
  ids, mask = left_padded(random_prompts([4, 8], seed=9))
  kw = dict(max_new_tokens=8, eos_id=None, pad_id=0)
  base = sample.generate_tokens(model, params, ids, mask, **kw)["tokens"]
  lora_params = jax.tree_util.tree_map(lambda x: x, params)
  c_attn = dict(lora_params["h_0"]["attn"]["c_attn"])
  D = c_attn["kernel"].shape[0]
  c_attn["lora_a"] = jax.random.normal(jax.random.PRNGKey(0), (D, 4))
  c_attn["lora_b"] = jnp.zeros((4, 3 * D))  # B = 0: the adapted model equals the base
  lora_params["h_0"] = {**lora_params["h_0"], "attn": {**lora_params["h_0"]["attn"], "c_attn": c_attn}}
  lora_model = GPT2(model.config, lora_scale=2.0)
  got = sample.generate_tokens(lora_model, lora_params, ids, mask, **kw)["tokens"]
  np.testing.assert_array_equal(got, base)


def test_stop_strings_cut_exactly(full_model, tokenizer):
  model, params = full_model
  prompts = ["Human: hello there\n\nAssistant:", "Human: what is two plus two?\n\nAssistant:"]
  kw = dict(max_new_tokens=24, temperature=0.0, batch_size=2, chunk_size=8)
  free = sample.generate(model, params, tokenizer, prompts, stop_strings=(), **kw)
  assert all(r["stop_reason"] == "max_new_tokens" and len(r["tokens"]) == 24 for r in free)
  text = free[1]["answer"]
  stop = text[12:15]  # a stop string from the middle of row 1's text, wherever tokens split it
  expected = text[:text.find(stop)]
  cut = sample.generate(model, params, tokenizer, prompts, stop_strings=("never appears", stop), **kw)
  assert cut[1]["answer"] == expected
  assert cut[1]["stop_reason"] == "stop_string"
  decoded = tokenizer.decode(cut[1]["tokens"])
  assert stop in decoded and stop not in tokenizer.decode(cut[1]["tokens"][:-1])
  if stop not in free[0]["answer"]:
    assert cut[0] == free[0]
  assert sample.cut_answer("a\n\nHuman: b\n\nHuman:", ["\n\nHuman:"]) == ("a", True)
  assert sample.cut_answer("no stop", ["\n\nHuman:"]) == ("no stop", False)


def test_sampling_is_seeded_and_independent_of_batching(full_model, tokenizer):
  model, params = full_model
  prompts = ["Human: hi\n\nAssistant:", "Human: tell me a story about a cat\n\nAssistant:",
             "Human: ok\n\nAssistant:"]
  kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, stop_strings=())
  a = sample.generate(model, params, tokenizer, prompts, seed=1, batch_size=4, **kw)
  b = sample.generate(model, params, tokenizer, prompts, seed=1, batch_size=2, **kw)
  c = sample.generate(model, params, tokenizer, prompts, seed=2, batch_size=4, **kw)
  assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
  assert [r["answer"] for r in a] == [r["answer"] for r in b]
  assert [r["tokens"] for r in a] != [r["tokens"] for r in c]


def test_long_prompts_are_left_truncated_and_counted(full_model, tokenizer):
  model, params = full_model  # n_positions = 128
  long_prompt = " ".join(f"word{i}" for i in range(200)) + "\n\nAssistant:"
  out = sample.generate(model, params, tokenizer, [long_prompt, "Human: hi\n\nAssistant:"],
                        max_new_tokens=32, temperature=0.0, batch_size=2)
  assert [r["truncated"] for r in out] == [True, False]
  assert out[0]["prompt_tokens"] == 128 - 32
  assert out[0]["prompt_tokens_cut"] == len(tokenizer(long_prompt)["input_ids"]) - (128 - 32)
  kept = tokenizer.decode(tokenizer(long_prompt)["input_ids"][-(128 - 32):])
  again = sample.generate(model, params, tokenizer, [kept], max_new_tokens=32, temperature=0.0,
                          batch_size=1)
  assert again[0]["answer"] == out[0]["answer"] and not again[0]["truncated"]
  assert sample.bucket_length(5, 96) == 16 and sample.bucket_length(17, 96) == 32
  assert sample.bucket_length(90, 96) == 96


def test_long_dialogues_lose_whole_turns_from_the_left_as_in_training(full_model, tokenizer):
  """A dialogue longer than n_positions - max_new_tokens keeps the most recent turns from a Human
  turn on (as training keeps a long row), counted; a final request too long alone keeps its end."""
  from gpt2_lora_jax import data
  model, params = full_model  # n_positions = 128: prompts get 96 tokens with 32 new ones
  turns = [("Human", " tell me about dogs " * 6), ("Assistant", " dogs are loyal animals " * 6),
           ("Human", " and cats?"), ("Assistant", " cats are independent " * 4),
           ("Human", " which one should I get?")]
  prompt = "".join(f"\n\n{role}:{text}" for role, text in turns) + "\n\nAssistant:"
  full = data.prompt_token_ids(tokenizer, prompt)
  # The reference: the latest Human turn from which the rest, as its own prompt, fits 96 tokens.
  suffixes = ["".join(f"\n\n{role}:{text}" for role, text in turns[i:]) + "\n\nAssistant:"
              for i in (0, 2, 4)]
  fitting = [p for p in suffixes if len(data.prompt_token_ids(tokenizer, p)) <= 96]
  assert len(full) > 96 and fitting and fitting[0] == suffixes[1]  # the first exchange must go
  kept = data.prompt_token_ids(tokenizer, fitting[0])
  too_long = "\n\nHuman: first\n\nAssistant: ok\n\nHuman:" + " please help" * 60 + "\n\nAssistant:"
  encode = lambda p, most: data.fit_prompt_token_ids(tokenizer, p, most)
  kw = dict(max_new_tokens=32, temperature=0.0, batch_size=2, stop_strings=())
  out = sample.generate(model, params, tokenizer, [prompt, too_long], encode=encode, **kw)
  assert out[0]["prompt_tokens"] == len(kept) and out[0]["prompt_tokens_cut"] == len(full) - len(kept)
  alone = sample.generate(model, params, tokenizer, [fitting[0]], encode=encode, **kw)
  assert alone[0]["tokens"] == out[0]["tokens"] and not alone[0]["truncated"]
  # The final Human turn alone is too long: [EOT] + its last tokens + "\n\nAssistant:".
  ids, cut = data.fit_prompt_token_ids(tokenizer, too_long, 96)
  whole = data.prompt_token_ids(tokenizer, too_long)
  cue = tokenizer("\n\nAssistant:")["input_ids"]
  assert ids == [whole[0]] + whole[len(whole) - 96 + 1:] and ids[-len(cue):] == cue
  assert cut == len(whole) - 96 == out[1]["prompt_tokens_cut"] and out[1]["prompt_tokens"] == 96


# --- the cache layout: prompts from slot 0, per-row kv lengths -----------------------------------

def left_padded_reference(model, params, ids_BP, mask_BP, n_new, sampling=sample.Sampling(), seed=0,
                          eos_id=None, pad_id=0):
  """The sampler before its cache layout changed, step by step in Python: left-padded prompts, the
  padding hidden by an attention mask over all P + N cache slots (the model's attention_mask API,
  XLA attention), row b's token i at slot P + i for every row, its position len_b + i. Tokens are
  drawn as the sampler draws them (sample.sample_logits, key fold_in(fold_in(seed, row), step))."""
  B, P = ids_BP.shape
  slots_BS = jnp.asarray(np.concatenate([mask_BP, np.ones((B, n_new), np.int32)], axis=1))
  step = jax.jit(lambda ids, pos, cache, index: model.apply(
      {"params": params}, ids, attention_mask=slots_BS, position_ids=pos, kv_cache=cache,
      cache_index=index))
  positions_BP = np.maximum(np.cumsum(mask_BP, axis=1) - 1, 0)
  logits, cache = step(jnp.asarray(ids_BP), jnp.asarray(positions_BP),
                       init_kv_cache(model.config, B, P + n_new), jnp.int32(0))
  logits_BV = logits[:, -1]
  row_keys = [jax.random.fold_in(jax.random.PRNGKey(seed), r) for r in range(B)]
  tokens_BN, done_B = np.full((B, n_new), pad_id, np.int32), np.zeros(B, bool)
  for i in range(n_new):
    keys_B = jnp.stack([jax.random.fold_in(key, i) for key in row_keys])
    token_B = np.where(done_B, pad_id, np.asarray(sample.sample_logits(logits_BV, keys_B, sampling)))
    tokens_BN[:, i] = token_B
    if eos_id is not None:
      done_B |= token_B == eos_id
    if done_B.all():
      break
    logits, cache = step(jnp.asarray(token_B[:, None]), jnp.asarray(mask_BP.sum(1) + i)[:, None],
                         cache, jnp.int32(P + i))
    logits_BV = logits[:, 0]
  return tokens_BN


def scanned(model, params):
  return GPT2(model.config.replace(scan_layers=True)), stacking.stack_layers(params)


@pytest.mark.parametrize("scan_layers, dtype", [(False, "float32"), (True, "bfloat16")])
@pytest.mark.parametrize("sampling", [sample.Sampling(), sample.Sampling(1.0, 40, 0.9)],
                         ids=["greedy", "seeded"])
def test_the_sampler_equals_the_left_padded_sampler(small_model, scan_layers, dtype, sampling):
  """Token for token, prompts of 1 to 16 tokens in one batch with extra left padding (and the same
  prompts right-padded), with and without an end-of-text id that stops rows at different steps;
  fp32, and bf16 scanned (the
  accelerator setting; also equal on 3 other prompt sets x 8 rows x 24 tokens, measured)."""
  _, model, params = small_model
  model = GPT2(model.config.replace(dtype=dtype))
  if scan_layers:
    model, params = scanned(model, params)
  ids, mask = left_padded(random_prompts([1, 5, 16, 9, 12], seed=11))
  ids, mask = np.pad(ids, ((0, 0), (3, 0))), np.pad(mask, ((0, 0), (3, 0)))
  kw = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, seed=7,
            pad_id=0)
  free = left_padded_reference(model, params, ids, mask, 10, sampling, seed=7)
  got = sample.generate_tokens(model, params, ids, mask, max_new_tokens=10, eos_id=None, **kw)
  np.testing.assert_array_equal(got["tokens"], free)
  # The same prompts right-padded (as generate() pads them): the same tokens.
  order = np.argsort(mask == 0, axis=1, kind="stable")
  right_ids, right_mask = np.take_along_axis(ids, order, 1), np.take_along_axis(mask, order, 1)
  assert right_mask[:, 0].all() and not right_mask[:, -1].all()
  got = sample.generate_tokens(model, params, right_ids, right_mask, max_new_tokens=10, eos_id=None, **kw)
  np.testing.assert_array_equal(got["tokens"], free)
  eos_id = int(free[1, 3])  # ends row 1 after 4 tokens, other rows where (and if) they draw it
  want = left_padded_reference(model, params, ids, mask, 10, sampling, seed=7, eos_id=eos_id)
  got = sample.generate_tokens(model, params, ids, mask, max_new_tokens=10, eos_id=eos_id, **kw)
  assert (want == eos_id).any(axis=1).sum() >= 1 and want[1, 4] == 0
  np.testing.assert_array_equal(got["tokens"], want)
  np.testing.assert_array_equal(got["eos"], (want == eos_id).any(axis=1))


def test_prompts_occupy_the_first_cache_slots(small_model):
  """After the prefill, row b's keys and values at slots 0 .. len_b - 1 are those of its prompt
  run alone (no padding), and its next-token logits are the prompt's last ones."""
  _, model, params = small_model
  prompts = random_prompts([3, 8, 1], seed=13)
  ids, mask = left_padded(prompts)
  keys_B = jax.random.split(jax.random.PRNGKey(0), 3)
  state = sample._prefill(model, params, jnp.asarray(ids), jnp.asarray(mask), keys_B, 4, sample.Sampling())
  alone_run = jax.jit(lambda ids_1T: model.apply({"params": params}, ids_1T, cache_index=0,
                                                  kv_cache=init_kv_cache(model.config, 1, ids_1T.shape[1])))
  for b, prompt in enumerate(prompts):
    n = len(prompt)
    logits, alone = alone_run(jnp.asarray([prompt]))
    for layer in range(model.config.n_layer):
      for name in ("k", "v"):
        np.testing.assert_allclose(np.asarray(state["cache"][layer][name][b, :n]),
                                   np.asarray(alone[layer][name][0]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(state["logits_BV"][b]), np.asarray(logits[0, -1]),
                               atol=1e-4, rtol=0)
  np.testing.assert_array_equal(np.asarray(state["prompt_len_B"]), [3, 8, 1])


def test_stop_strings_equal_the_left_padded_sampler(varied_full_model, tokenizer):
  """generate() (right-padded rows, stop strings matched between chunks) keeps, per prompt, the
  left-padded sampler's tokens up to the one completing the stop string, or all of them."""
  model, params = varied_full_model
  prompts = ["Human: hello there\n\nAssistant:", "Human: what is two plus two?\n\nAssistant:",
             "Human: hi\n\nAssistant:"]
  encoded = [tokenizer(p)["input_ids"] for p in prompts]
  ids, mask = left_padded(encoded, pad_id=sample.EOT_ID)
  ref = left_padded_reference(model, params, ids, mask, 20, eos_id=sample.EOT_ID, pad_id=sample.EOT_ID)
  text = lambda ids: tokenizer.decode([int(t) for t in ids if t != sample.EOT_ID])
  stop = text(ref[1])[10:13]  # from the middle of row 1's answer, wherever tokens split it
  got = sample.generate(model, params, tokenizer, prompts, max_new_tokens=20, temperature=0.0,
                        batch_size=3, chunk_size=4, stop_strings=(stop,))
  assert got[1]["stop_reason"] == "stop_string"
  for row, result in zip(ref, got):
    row = [int(t) for t in row]
    row = row[:row.index(sample.EOT_ID)] if sample.EOT_ID in row else row
    full = text(row)
    if stop in full:
      k = min(k for k in range(1, len(row) + 1) if stop in text(row[:k]))
      assert result["tokens"] == row[:k] and result["answer"] == full[:full.find(stop)]
    else:
      assert result["tokens"] == row and result["answer"] == full


# --- the sampler's programs for a GPU, lowered on this CPU --------------------------------------

DENSE_MASK = re.compile(r"tensor<\d+x1x\d+x\d+xi1>")  # a boolean [B, 1, T, S] mask


@pytest.fixture
def fresh_sampler_traces():
  """jax keeps a jitted function's traces by its arguments (modules compare by value), not by the
  platform a test simulates: a trace made for another simulated GPU, or for this CPU, would be
  lowered again. Each lowering test starts and ends without any."""
  for jitted in (sample._prefill, sample._decode):
    jitted.clear_cache()
  yield
  for jitted in (sample._prefill, sample._decode):
    jitted.clear_cache()


def lowered_sampler(model, params, B=4, P=16, N=8):
  """StableHLO text of the sampler's prefill and decode (while_loop) lowered for CUDA. (Traced
  through the jitted functions themselves: their traces are what fresh_sampler_traces clears.)"""
  ids, mask = np.ones((B, P), np.int32), np.ones((B, P), np.int32)
  keys_B = jax.random.split(jax.random.PRNGKey(0), B)
  args = (model, params, ids, mask, keys_B, N, sample.Sampling())
  cuda = lambda traced: traced.lower(lowering_platforms=("cuda",)).as_text()
  prefill = cuda(sample._prefill.trace(*args))
  state = jax.eval_shape(sample._prefill, *args)
  decode = cuda(sample._decode.trace(model, params, state, jnp.int32(N), sample.Sampling(), None, 0))
  return prefill, decode


@pytest.mark.parametrize("impl, packed, scan_layers", [("auto", True, False), ("auto", False, True),
                                                       ("cudnn", True, True), ("xla", True, False)])
def test_the_sampler_lowers_to_cudnn_on_a_gpu(simulated_gpu, fresh_sampler_traces, tiny_hf_dir, impl,
                                              packed, scan_layers):
  """On a simulated H100/H200 the prefill and the decode hold cuDNN attention with per-row kv
  lengths (causal in the prefill) and no dense mask; attention_impl='xla' holds no cuDNN call."""
  simulated_gpu(packed=packed)
  config, params = weights.load_pretrained(tiny_hf_dir)
  config = config.replace(dtype="bfloat16", attention_impl=impl, vocab_size=config.vocab_size)
  model = GPT2(config)
  if scan_layers:
    model, params = scanned(model, params)
  prefill, decode = lowered_sampler(model, params)
  for text, mask_type in ((prefill, "PADDING_CAUSAL"), (decode, "PADDING")):
    calls = re.findall(r"__cudnn\$\w+", text)
    if impl == "xla":
      assert not calls and DENSE_MASK.search(text)
      continue
    # One call per layer, or one in the scanned body; forward only, no backward.
    assert set(calls) == {"__cudnn$fmhaSoftmax"}, calls
    assert len(calls) == (1 if scan_layers else config.n_layer)
    assert re.findall(r'mask_type\\22: \\22(\w+)\\22', text) == [mask_type] * len(calls)
    assert not DENSE_MASK.search(text), DENSE_MASK.search(text).group(0)


def test_the_sampler_stays_on_xla_when_the_cudnn_lengths_probe_fails(simulated_gpu, fresh_sampler_traces,
                                                                     tiny_hf_dir):
  simulated_gpu(problems={"cudnn_lengths": "it failed on a test batch: AssertionError: (no message)"})
  config, params = weights.load_pretrained(tiny_hf_dir)
  prefill, decode = lowered_sampler(GPT2(config.replace(dtype="bfloat16", attention_impl="auto")), params)
  for text in (prefill, decode):
    assert "__cudnn" not in text and DENSE_MASK.search(text)
