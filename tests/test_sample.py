"""sample.py against independent references: transformers' greedy generate, a no-cache loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_hf_gpt2
from gpt2_lora_jax import sample, weights
from gpt2_lora_jax.model import GPT2

SMALL_VOCAB = 1000  # small head: fast, and no end-of-text id (50256) that could stop a row
NEW_TOKENS = 36


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
  """(torch model, flax module, params) of one random-weight GPT-2 with a 1000-token vocabulary."""
  d = str(tmp_path_factory.mktemp("small_vocab_gpt2"))
  hf = make_hf_gpt2(d, vocab_size=SMALL_VOCAB, seed=1)
  config, params = weights.load_pretrained(d)
  return hf, GPT2(config), params


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
