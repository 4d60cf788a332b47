"""One HH-RLHF conversation: its turns, its prompt/response split, its token ids and loss mask.

How a text becomes tokens, and why:
- A text is a sequence of turns, each a marker "\\n\\nHuman:" or "\\n\\nAssistant:" followed by its
  content. Only these markers split turns: a "Human:" inside a reply (real rows have
  "Assistant: Human: ...") stays part of the reply; two turns of one role in a row stay two turns.
- A reply's tokens are its content after "Assistant:", the leading " " included: sampling prompts
  end at "Assistant:", so the model must produce the space, and GPT-2's BPE fuses it with the first
  word (" Sure" is one token); moving it into the prompt would end prompts on a lone " " token.
- The "\\n\\n" before the next turn belongs to that turn's marker: "\\n\\nHuman:" is one unit (and
  the stop string at sampling), so the tokens under the loss decode to exactly the reply texts.
- Markers and contents are tokenised separately and concatenated, so token boundaries fall on turn
  boundaries and a loss mask is a union of whole turns.
- Each conversation is framed by end-of-text (50256) on both sides, as GPT-2's pretraining
  documents were. The leading one gives the first real token a target (so mask 'all' trains on
  every token of the text); the trailing one follows the final reply, is trained on in every mask
  mode, and teaches the model to stop. `prompt_token_ids` builds sampling prompts the same way.
- Leading whitespace of a text and trailing whitespace of its final reply are dropped; a row whose
  final reply is then empty is skipped (it would teach the model to answer nothing).
- Too long for max_length: whole turns are cut from the left so that the kept part starts at a
  Human turn and keeps the final exchange (first_kept_turn); a row whose final exchange alone does
  not fit is skipped. A sampling prompt too long for the model is cut the same way
  (fit_prompt_token_ids); when its final Human turn alone does not fit, that turn loses its start.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from gpt2_lora_jax.tokenizer import EOT_ID

HUMAN, ASSISTANT = "Human", "Assistant"
MARKERS = {HUMAN: "\n\nHuman:", ASSISTANT: "\n\nAssistant:"}
_MARKER_RE = re.compile(r"\n\n(Human|Assistant):")
ROLE_CODE = {HUMAN: 0, ASSISTANT: 1}  # how roles are stored in token arrays and the token cache
LOSS_MASKS = ("all", "assistant", "final")
# Why parse_conversation rejects a text (data.py adds the reasons a row can be unreadable).
MALFORMED_REASONS = ("text_before_first_turn", "no_human_turn", "no_assistant_turn",
                     "ends_with_human_turn")


class Turn(NamedTuple):
  role: str  # 'Human' or 'Assistant'
  text: str  # what follows the marker "\n\n{role}:", its leading space included


class MalformedConversation(ValueError):
  """A text that is not an HH-RLHF conversation; `reason` is one of MALFORMED_REASONS."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


# --- one conversation ----------------------------------------------------------------------------

def parse_conversation(text: str) -> list[Turn]:
  """Turns of an HH-RLHF text "\\n\\nHuman: ...\\n\\nAssistant: ...", the last one an Assistant reply.

  Leading whitespace of the text and trailing whitespace of the final reply are dropped; the final
  reply may be empty. Raises MalformedConversation with a reason from BAD_REASONS.
  """
  parts = _MARKER_RE.split("\n\n" + text.lstrip())  # ['', role, content, role, content, ...]
  roles = parts[1::2]
  if HUMAN not in roles:
    raise MalformedConversation("no_human_turn", f"no '\\n\\nHuman:' turn in {text[:80]!r}")
  if ASSISTANT not in roles:
    raise MalformedConversation("no_assistant_turn", f"no '\\n\\nAssistant:' turn in {text[:80]!r}")
  if parts[0]:
    raise MalformedConversation("text_before_first_turn", f"text before the first turn: {parts[0][:80]!r}")
  if roles[-1] != ASSISTANT:
    raise MalformedConversation("ends_with_human_turn", f"ends with a Human turn: {parts[-1][:80]!r}")
  turns = [Turn(role, content) for role, content in zip(roles, parts[2::2])]
  turns[-1] = Turn(ASSISTANT, turns[-1].text.rstrip())
  return turns


def prompt_and_response(text: str) -> tuple[str, str]:
  """(everything up to and including the final "\\n\\nAssistant:", the final reply).

  prompt + response is the text without leading whitespace or the final reply's trailing whitespace.
  """
  turns = parse_conversation(text)
  prompt = "".join(MARKERS[t.role] + t.text for t in turns[:-1]) + MARKERS[ASSISTANT]
  return prompt, turns[-1].text


def marker_ids(tokenizer) -> dict[int, np.ndarray]:
  """Token ids of each role's marker, keyed by role code."""
  ids = tokenizer([MARKERS[HUMAN], MARKERS[ASSISTANT]], add_special_tokens=False,
                  return_attention_mask=False)["input_ids"]
  return {ROLE_CODE[HUMAN]: np.asarray(ids[0], np.int32), ROLE_CODE[ASSISTANT]: np.asarray(ids[1], np.int32)}


def prompt_token_ids(tokenizer, text: str) -> list[int]:
  """Ids the model reads before the final reply, tokenised as in training: [EOT] + turns + marker.

  `text` may be a whole conversation or a prompt from prompt_and_response (ending in "Assistant:").
  """
  return fit_prompt_token_ids(tokenizer, text, 0)[0]


def fit_prompt_token_ids(tokenizer, text: str, max_length: int) -> tuple[list[int], int]:
  """(prompt_token_ids cut to at most max_length tokens (0: no limit), tokens cut).

  Cut as training cuts a long conversation (first_kept_turn): whole turns from the left, so the
  kept part starts at a Human turn; the leading end-of-text and the final "\n\nAssistant:" stay.
  When the final Human turn alone does not fit, tokens are cut from its start (it keeps its end,
  the request being answered).
  """
  turns = parse_conversation(text)[:-1]
  markers = marker_ids(tokenizer)
  contents = tokenizer([t.text for t in turns] or [""], add_special_tokens=False,
                       return_attention_mask=False, verbose=False)["input_ids"]
  pieces = [markers[ROLE_CODE[t.role]].tolist() + list(c) for t, c in zip(turns, contents)]
  cue = markers[ROLE_CODE[ASSISTANT]].tolist()
  total = 1 + sum(map(len, pieces)) + len(cue)
  if max_length <= 0 or total <= max_length:
    return [EOT_ID] + [i for p in pieces for i in p] + cue, 0
  budget = max_length - 1 - len(cue)  # tokens left for the turns
  roles = [ROLE_CODE[t.role] for t in turns]
  first = first_kept_turn(roles, [len(p) for p in pieces], budget)
  if first is None:  # the final Human turn alone is too long: keep its end
    last_human = max(i for i, r in enumerate(roles) if r == ROLE_CODE[HUMAN])
    tail = [i for p in pieces[last_human:] for i in p]
    kept = tail[len(tail) - budget:] if budget > 0 else []
  else:
    kept = [i for p in pieces[first:] for i in p]
  ids = [EOT_ID] + kept + cue
  return ids, total - len(ids)


def first_kept_turn(roles, turn_tokens, budget: int):
  """The first turn kept when whole turns are cut from the left so that turn_tokens[first:] sums to
  at most `budget`: turn 0 or a Human turn up to the last one, so a kept part opens like every real
  conversation (and every sampling prompt) does. None when even the last Human turn on does not fit.

  roles: role codes (ROLE_CODE) per turn; turn_tokens: each turn's tokens, marker included.
  """
  n = len(roles)
  tokens_from = [0] * (n + 1)  # tokens of turns i..n-1
  for i in reversed(range(n)):
    tokens_from[i] = tokens_from[i + 1] + turn_tokens[i]
  return next((i for i in cut_points(roles) if tokens_from[i] <= budget), None)


def cut_points(roles) -> list[int]:
  """Turns a too-long conversation may start at, earliest first: the start, or any Human turn up to
  the final exchange's, so a kept part opens like every real conversation (and sampling prompt) does."""
  roles = np.asarray(roles).tolist()
  human = ROLE_CODE[HUMAN]
  last_human = max((i for i in range(len(roles)) if roles[i] == human), default=0)
  return [0] + [i for i in range(1, last_human + 1) if roles[i] == human]


def assemble_conversation(roles: np.ndarray, turn_lengths: np.ndarray, content_ids: np.ndarray,
                          marker_ids: dict[int, np.ndarray], loss_mask: str, max_length: int):
  """Token ids and loss mask of one tokenised conversation, cut from the left to fit max_length.

  roles (n,) role codes; turn_lengths (n,) content tokens per turn; content_ids (sum of lengths,)
  the contents' tokens back to back. Returns (ids (L + 1,), mask (L,) bool over ids[1:], first kept
  turn) with L <= max_length, or None when the final exchange alone does not fit.
  """
  # Per-turn bookkeeping in Python ints: a conversation has ~10 turns, too few for numpy to pay off.
  roles, turn_lengths = np.asarray(roles).tolist(), np.asarray(turn_lengths).tolist()
  n = len(roles)
  assistant = ROLE_CODE[ASSISTANT]
  marker_lengths = [len(marker_ids[r]) for r in roles]
  # The leading end-of-text takes one of max_length input positions.
  first = first_kept_turn(roles, [m + c for m, c in zip(marker_lengths, turn_lengths)], max_length - 1)
  if first is None:
    return None
  pieces = [np.asarray([EOT_ID], np.int32)]
  piece_trained, piece_lengths = [], []  # over ids[1:]: marker, content, ..., final end-of-text
  start = sum(turn_lengths[:first])
  for i in range(first, n):
    pieces += [marker_ids[roles[i]], content_ids[start:start + turn_lengths[i]]]
    start += turn_lengths[i]
    is_reply = roles[i] == assistant
    train_content = (loss_mask == "all" or (loss_mask == "assistant" and is_reply)
                     or (is_reply and i == n - 1))
    piece_trained += [loss_mask == "all", train_content]
    piece_lengths += [marker_lengths[i], turn_lengths[i]]
  pieces.append(np.asarray([EOT_ID], np.int32))
  piece_trained.append(True)  # the end-of-text after the final reply: learn to stop
  piece_lengths.append(1)
  mask = np.repeat(np.asarray(piece_trained), piece_lengths)
  return np.concatenate(pieces).astype(np.int32), mask, first
