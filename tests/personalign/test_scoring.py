"""Summed response log-probabilities on the tiny random model: by hand, batched, truncated."""

from __future__ import annotations

import math

import pytest
import torch

from personalign.engine import Engine
from personalign.scoring import (
    response_logprob,
    response_logprobs,
    scoring_batch,
    summed_logprobs,
)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def hand_logprob(loaded, messages, response: str) -> float:
    """log p(response + end-of-turn | prompt) from one unbatched forward and a plain loop."""
    tok = loaded.tokenizer
    prompt_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    reply = [*tok(response, add_special_tokens=False)["input_ids"], loaded.eou_token_id]
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logprobs = torch.log_softmax(loaded.model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(prompt) + i - 1, t]) for i, t in enumerate(reply))


def test_matches_hand_computation(tiny_llm):
    expected = hand_logprob(tiny_llm, MESSAGES, "Blue, like the sea.")
    assert response_logprob(Engine(tiny_llm), MESSAGES, "Blue, like the sea.") == pytest.approx(expected, abs=1e-3)
    # A LoadedModel works as well as an Engine.
    assert response_logprob(tiny_llm, MESSAGES, "Blue, like the sea.") == pytest.approx(expected, abs=1e-3)


def test_batched_equals_unbatched(tiny_llm):
    engine = Engine(tiny_llm)
    responses = ["Red.", "A deep, calm ultramarine blue — café au lait, ünïcode too."]
    batched = response_logprobs(engine, MESSAGES, responses)
    single = [response_logprob(engine, MESSAGES, r) for r in responses]
    assert batched == pytest.approx(single, abs=1e-3)
    assert batched[0] > batched[1]  # more tokens, lower summed log-probability (random model, long gap)
    assert response_logprobs(engine, MESSAGES, []) == []


def test_over_long_prompt_is_cut_from_the_left(tiny_llm):
    engine = Engine(tiny_llm)
    long_messages = [{"role": "user", "content": "word " * 400}]  # 2000 byte tokens > 512 context
    score = response_logprob(engine, long_messages, "ok")
    assert math.isfinite(score) and score < 0
    # Only the tail of the prompt matters once cut: a different head gives the same score.
    other = [{"role": "user", "content": "xyz! " * 10 + "word " * 400}]
    assert response_logprob(engine, other, "ok") == pytest.approx(score, abs=1e-3)


def test_summed_logprobs_is_the_differentiable_form_of_the_scores(tiny_llm):
    replies = ["Red.", "A deep green, like moss."]
    batch = scoring_batch(tiny_llm, MESSAGES, replies)
    assert batch.lengths[0] < batch.lengths[1] and batch.scored[1] == len(replies[1].encode()) + 1  # byte tokens + EoU
    model = tiny_llm.model
    sums = summed_logprobs(model, batch, tiny_llm.device)
    assert sums.requires_grad and sums.shape == (2,)
    assert sums.tolist() == pytest.approx(response_logprobs(tiny_llm, MESSAGES, replies), abs=1e-5)
    sums.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_scoring_batch_needs_a_reply(tiny_llm):
    with pytest.raises(ValueError, match="no responses"):
        scoring_batch(tiny_llm, MESSAGES, [])
