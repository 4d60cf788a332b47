"""The reward scorer as a real subprocess on a tiny random DeBERTa-v2 classifier built here."""
import json
import os

import pytest

from gpt2_lora_jax import hub, reward

def write_generations(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def reference_question(prompt):
  """The dialogue without its final "\n\nAssistant:" cue, written here apart from reward.py."""
  cue = "\n\nAssistant:"
  assert prompt.endswith(cue)
  return prompt[:-len(cue)].strip()


def in_process_rewards(model_dir, rows, max_length=512):
  """The reference: one pair at a time, no padding. Every question here is one Human turn, so a
  question too long for what the answer leaves loses tokens from its start; an answer keeps up to
  max(half the budget, what the question leaves)."""
  import torch
  from transformers import AutoModelForSequenceClassification, AutoTokenizer
  tok = AutoTokenizer.from_pretrained(model_dir)
  model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
  out = []
  for r in rows:
    q = tok(reference_question(r["prompt"]), add_special_tokens=False)["input_ids"]
    a = tok(r["answer"].strip(), add_special_tokens=False)["input_ids"]
    budget = max_length - 3  # [CLS] q [SEP] a [SEP]
    a = a[:max(budget - len(q), budget // 2)]
    q = q[max(0, len(q) - (budget - len(a))):]
    ids = [tok.cls_token_id] + q + [tok.sep_token_id] + a + [tok.sep_token_id]
    types = [0] * (len(q) + 2) + [1] * (len(a) + 1)
    with torch.no_grad():
      logits = model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits
    out.append((logits[0, 0].item(), len(ids)))
  return out


def test_question_from_prompt():
  prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant:"
  assert reward.question_from_prompt(prompt) == "Human: hi\n\nAssistant: hello\n\nHuman: help me"
  assert reward.question_from_prompt("just a question") == "just a question"


def test_subprocess_scores_match_in_process(tiny_reward_dir, tmp_path):
  long_text = " ".join(["please tell me a story about my dog"] * 120)  # ~960 tokens
  rows = [
      {"id": "p0", "model": "base", "prompt": "\n\nHuman: what is two plus two?\n\nAssistant:", "answer": " four"},
      {"id": "p0", "model": "finetuned", "prompt": "\n\nHuman: what is two plus two?\n\nAssistant:",
       "answer": " it is four, sure"},
      {"id": "p1", "model": "base", "prompt": "\n\nHuman: can you help me?\n\nAssistant:", "answer": ""},
      {"id": "p2", "model": "base", "prompt": f"\n\nHuman: {long_text}\n\nAssistant:", "answer": " no"},
      {"id": "p3", "model": "finetuned", "prompt": "\n\nHuman: why?\n\nAssistant:", "answer": long_text},
  ]
  gen, out = tmp_path / "generations.jsonl", tmp_path / "scores.jsonl"
  write_generations(gen, rows)
  summary = reward.run_scorer_subprocess(str(gen), str(out), tiny_reward_dir, batch_size=3, max_length=512)
  scores = [json.loads(l) for l in out.read_text().splitlines()]
  assert [(s["id"], s["model"]) for s in scores] == [(r["id"], r["model"]) for r in rows]
  expected = in_process_rewards(tiny_reward_dir, rows)
  for s, (want_reward, want_len) in zip(scores, expected):
    assert abs(s["reward"] - want_reward) <= 1e-5, (s, want_reward)
    assert s["n_tokens"] == want_len <= 512
  assert [s["truncated"] for s in scores] == [False, False, False, True, True]
  assert scores[3]["n_tokens"] == 512 and scores[4]["n_tokens"] == 512
  # The long question loses its start (one Human turn: inside it); the long answer its end.
  assert scores[3]["question_tokens_cut"] > 0 and scores[3]["question_cut_mid_turn"]
  assert scores[3]["answer_tokens_cut"] == 0
  assert scores[4]["answer_tokens_cut"] > 0 and scores[4]["question_tokens_cut"] == 0
  assert [s["empty_answer"] for s in scores] == [False, False, True, False, False]
  assert summary["n"] == 5 and summary["n_empty_answers"] == 1 and summary["n_truncated"] == 2
  assert summary["n_question_cut"] == summary["n_question_cut_mid_turn"] == summary["n_answer_cut"] == 1
  assert summary["device"] == "cpu" and summary["dtype"] == "float32"
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # no temporary files left


def test_missing_model_dir_is_a_clear_error(tmp_path):
  gen, out = tmp_path / "generations.jsonl", tmp_path / "scores.jsonl"
  write_generations(gen, [{"id": "p0", "model": "base", "prompt": "Human: hi", "answer": "hello"}])
  missing = str(tmp_path / "no_such_model")
  with pytest.raises(reward.ScorerError) as e:
    reward.run_scorer_subprocess(str(gen), str(out), missing)
  message = str(e.value)
  assert "exited with code 2" in message and "--reward_model" in message and missing in message
  assert not out.exists()


def test_unreachable_hub_id_names_the_flag():
  # conftest sets HF_HUB_OFFLINE=1: a hub id that is not cached cannot be fetched.
  with pytest.raises(hub.HubUnreachableError, match="--reward_model"):
    reward.load_reward_model("no-such-org/no-such-reward-model")


def test_bad_generations_file_fails_without_writing(tmp_path, capsys, tiny_reward_dir):
  gen, out = tmp_path / "generations.jsonl", tmp_path / "scores.jsonl"
  write_generations(gen, [{"id": "p0", "model": "base", "prompt": "Human: hi"}])  # no 'answer'
  assert reward.main(["--generations", str(gen), "--out", str(out), "--reward_model", tiny_reward_dir]) == 2
  err = capsys.readouterr().err
  assert "generations.jsonl:1" in err and "'answer'" in err
  assert not out.exists()


# --- what the reward model sees, with a sentencepiece tokenizer like DeBERTa-v3's ---------------------

TURNS = [("Human", "can you help me with my dog? he is a good dog but he barks at night"),
         ("Assistant", "Sure, what is the problem with the dog at night?"),
         ("Human", "He barks all night and the cat cannot sleep, what should I do about it"),
         ("Assistant", "Try a walk before bed, and a quiet place for him to sleep."),
         ("Human", "what is the best bed for a big dog?")]
ANSWER = "A large soft bed that he can stretch out on, in a quiet corner of the house."


@pytest.fixture(scope="module")
def spm_reward_dir(tmp_path_factory):
  """A tiny DeBERTa-v2 classifier with a unigram sentencepiece model trained here (offline), laid out
  as DeBERTa-v3's: [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3, loaded through DebertaV2Tokenizer."""
  import io
  import sentencepiece as spm
  import torch
  import transformers
  d = str(tmp_path_factory.mktemp("spm_reward"))
  corpus = [f"{role}: {text}" for role, text in TURNS] + [ANSWER, "please tell me a story about my cat"]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus * 20), model_writer=model, vocab_size=150, model_type="unigram",
      pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]", eos_piece="[SEP]",
      unk_piece="[UNK]", user_defined_symbols=["[MASK]"], hard_vocab_limit=False, minloglevel=2)
  with open(os.path.join(d, "spm.model"), "wb") as f:
    f.write(model.getvalue())
  with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "DebertaV2Tokenizer", "model_max_length": 512}, f)
  transformers.AutoTokenizer.from_pretrained(d).save_pretrained(d)  # adds tokenizer.json
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  torch.manual_seed(0)
  config = transformers.DebertaV2Config(
      vocab_size=sp.get_piece_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=512, type_vocab_size=0, relative_attention=True,
      position_buckets=256, pos_att_type=["p2c", "c2p"], position_biased_input=False,
      norm_rel_ebd="layer_norm", share_att_key=True, num_labels=1, pad_token_id=0)
  transformers.DebertaV2ForSequenceClassification(config).save_pretrained(d)
  return d, sp


def dialogue(turns):
  return "".join(f"\n\n{role}: {text}" for role, text in turns) + "\n\nAssistant:"


def spm_reference(sp, turns, answer, max_length):
  """[CLS] q [SEP] a [SEP] from the raw sentencepiece model (no transformers, no reward.py), and
  (question tokens cut, Human turns dropped, answer tokens cut). The answer keeps up to max(half
  the budget, what the question leaves); the question keeps everything from the earliest Human
  turn from which the rest fits."""
  budget = max_length - 3
  question = "".join(f"\n\n{role}: {text}" for role, text in turns).strip()
  q_all, a_all = sp.encode(question), sp.encode(answer)
  a = a_all[:max(budget - len(q_all), budget // 2)]
  room = budget - len(a)
  humans = [i for i, (role, _) in enumerate(turns) if role == "Human"]
  for dropped, i in enumerate(humans):
    kept = sp.encode("\n\n".join(f"{role}: {text}" for role, text in turns[i:]))
    if len(kept) <= room:
      break
  else:
    kept = q_all[len(q_all) - room:]  # the final Human turn alone is too long: its start goes
  return [1] + kept + [2] + a + [2], len(q_all) - len(kept), dropped, len(a_all) - len(a)


@pytest.mark.parametrize("turns, answer, max_length, dropped, mid_turn", [
    (TURNS, ANSWER, 512, 0, False),  # fits: nothing cut
    (TURNS, ANSWER, 120, 2, False),  # the first two exchanges go, whole turns; the answer stays whole
    (TURNS, ANSWER * 6, 120, 2, False),  # a long answer keeps half the budget
    (TURNS[:1] + [("Human", "please tell me a story about my cat " * 12)], "fine", 60, 1, True),
])
def test_the_reward_model_sees_the_final_request_and_the_answer(spm_reward_dir, turns, answer,
                                                                 max_length, dropped, mid_turn):
  model_dir, sp = spm_reward_dir
  _, tokenizer, _, _ = reward.load_reward_model(model_dir, device="cpu")
  want_ids, want_cut, want_dropped, want_a_cut = spm_reference(sp, turns, answer, max_length)
  assert want_dropped == dropped  # the case is what its comment says
  question = reward.question_from_prompt(dialogue(turns))
  inputs, cut = reward.encode_pair(tokenizer, question, answer, max_length)
  assert inputs["input_ids"] == want_ids and len(want_ids) <= max_length
  assert cut["question_tokens_cut"] == want_cut and cut["question_turns_cut"] == dropped
  assert cut["question_cut_mid_turn"] == mid_turn
  assert cut["answer_tokens_cut"] == want_a_cut and (want_a_cut > 0) == (len(answer) > len(ANSWER))
  assert cut["truncated"] == (want_cut > 0 or want_a_cut > 0) == (max_length < 512)
  if not mid_turn:  # the final request is there, word for word
    assert sp.decode(want_ids[1:want_ids.index(2)]).endswith(turns[-1][1])


def test_scores_file_counts_what_was_cut(spm_reward_dir, tmp_path):
  import torch
  from transformers import AutoModelForSequenceClassification
  model_dir, sp = spm_reward_dir
  cases = [(TURNS, ANSWER), (TURNS, ANSWER * 6), (TURNS[-1:], "fine")]
  rows = [{"id": f"p{i}", "model": "base", "prompt": dialogue(t), "answer": a}
          for i, (t, a) in enumerate(cases)]
  gen, out = tmp_path / "generations.jsonl", tmp_path / "scores.jsonl"
  write_generations(gen, rows)
  summary = reward.score_file(str(gen), str(out), model_dir, batch_size=2, max_length=120, device="cpu")
  scores = [json.loads(l) for l in out.read_text().splitlines()]
  model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
  for s, (turns, answer) in zip(scores, cases):
    ids, q_cut, dropped, a_cut = spm_reference(sp, turns, answer, 120)
    with torch.no_grad():
      want = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert abs(s["reward"] - want) <= 1e-5 and s["n_tokens"] == len(ids)
    assert s["question_tokens_cut"] == q_cut and s["question_turns_cut"] == dropped
    assert s["answer_tokens_cut"] == a_cut
  assert [s["truncated"] for s in scores] == [True, True, False]
  assert [s["answer_tokens_cut"] > 0 for s in scores] == [False, True, False]
  assert summary["n_truncated"] == summary["n_question_cut"] == 2 and summary["n_answer_cut"] == 1
