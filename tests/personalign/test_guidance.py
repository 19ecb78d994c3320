"""Persona guidance on the tiny random model: batching exactness, the mix, and loop behaviour."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from personalign.generation import (
    MAX_PERSONA_STRENGTH,
    GenerationConfig,
    decode_one_token,
    generate_tokens,
    new_cache,
    prefill,
)
from personalign.guidance import (
    decode_rows,
    generate_guided_tokens,
    guidance_mix,
    left_pad,
    position_ids_for,
    prefill_rows,
)
from tests.conftest import make_tiny_llm

GREEDY = GenerationConfig(temperature=0, max_new_tokens=24)
QUESTION = "How do tides work?"
PERSONA = "You talk to a retired sailor who likes short, salty answers with a joke at the end."


def _ids(llm, messages) -> torch.Tensor:
    rendered = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return torch.tensor(llm.tokenizer(rendered, add_special_tokens=False)["input_ids"])  # (T,)


def _with_persona(llm) -> torch.Tensor:
    return _ids(llm, [{"role": "system", "content": PERSONA}, {"role": "user", "content": QUESTION}])


def _without_persona(llm) -> torch.Tensor:
    return _ids(llm, [{"role": "user", "content": QUESTION}])


def _guided(gamma: float, **changes) -> GenerationConfig:
    return dataclasses.replace(GREEDY, persona_strength=gamma, **changes)


def _forward_batches(model):
    """Record the batch size of every model forward; returns (sizes, hook handle)."""
    sizes = []

    def hook(_module, _args, kwargs, _out):
        sizes.append(kwargs["input_ids"].shape[0])

    return sizes, model.register_forward_hook(hook, with_kwargs=True)


def _reference_guided_greedy(model, cond, uncond, gamma, steps) -> list[int]:
    """Guided greedy decoding the slow way: two separate batch-1 caches, mixed by hand."""
    caches = new_cache(model), new_cache(model)
    logits = [prefill(model, ids.unsqueeze(0), cache) for ids, cache in zip((cond, uncond), caches)]
    tokens = []
    for _ in range(steps):
        mixed = (1 + gamma) * torch.log_softmax(logits[0], -1) - gamma * torch.log_softmax(logits[1], -1)
        token = mixed.argmax(dim=-1, keepdim=True)  # (1, 1)
        tokens.append(int(token))
        logits = [decode_one_token(model, token, cache) for cache in caches]
    return tokens


def test_prompts_differ_in_length(tiny_llm):
    assert len(_with_persona(tiny_llm)) > len(_without_persona(tiny_llm)) + 20


def test_gamma_zero_is_plain_generation(tiny_llm):
    cond, uncond = _with_persona(tiny_llm), _without_persona(tiny_llm)
    plain = list(generate_tokens(tiny_llm.model, cond, GREEDY, stop_token_ids=()))
    sizes, handle = _forward_batches(tiny_llm.model)
    try:
        off = list(generate_tokens(tiny_llm.model, cond, _guided(0.0), stop_token_ids=(), unconditioned_ids=uncond))
    finally:
        handle.remove()
    assert off == plain
    assert set(sizes) == {1}  # gamma 0 takes the plain batch-1 path
    # The batched loop itself, at gamma 0, reproduces plain decoding despite the padded second row.
    assert list(generate_guided_tokens(tiny_llm.model, cond, uncond, GREEDY, stop_token_ids=())) == plain


def test_strength_without_unconditioned_prompt_is_plain(tiny_llm):
    cond = _with_persona(tiny_llm)
    plain = list(generate_tokens(tiny_llm.model, cond, GREEDY, stop_token_ids=()))
    assert list(generate_tokens(tiny_llm.model, cond, _guided(3.0), stop_token_ids=())) == plain


@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0, MAX_PERSONA_STRENGTH])
def test_identical_prompts_reproduce_plain_greedy_for_any_gamma(tiny_llm, gamma):
    cond = _with_persona(tiny_llm)
    plain = list(generate_tokens(tiny_llm.model, cond, GREEDY, stop_token_ids=()))
    guided = list(generate_tokens(tiny_llm.model, cond, _guided(gamma), stop_token_ids=(), unconditioned_ids=cond))
    assert guided == plain


def _model_for_row_check(kind: str, vocab_size: int):
    """A fresh tiny model: Llama (RoPE) with SDPA or eager attention, or GPT-2 (absolute positions).

    RoPE only sees relative positions, so a pad offset in the position ids would go
    unnoticed there; GPT-2's learned absolute positions make the same check catch it.
    """
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                            bos_token_id=1, eos_token_id=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return GPT2LMHeadModel(config).eval()
    model = make_tiny_llm().model  # own copy: the attention implementation is switched below
    model.set_attn_implementation(kind.removeprefix("llama-"))
    return model


@pytest.mark.parametrize("kind", ["llama-sdpa", "llama-eager", "gpt2"])
@pytest.mark.parametrize("longer_first", [True, False])
def test_each_row_computes_as_if_alone(tiny_llm, kind, longer_first):
    model = _model_for_row_check(kind, len(tiny_llm.tokenizer))
    rows = [_with_persona(tiny_llm), _without_persona(tiny_llm)]
    if not longer_first:
        rows.reverse()  # the padded row is then row 0
    ids, mask = left_pad(rows)  # (2, T)
    cache = new_cache(model)
    batched = prefill_rows(model, ids, mask, cache)  # (2, V)
    alone_caches = [new_cache(model) for _ in rows]
    alone = [prefill(model, row.unsqueeze(0), c) for row, c in zip(rows, alone_caches)]  # 2 x (1, V)
    feed = tiny_llm.tokenizer("Moon pulls water!", add_special_tokens=False)["input_ids"]  # same tokens to both rows
    assert len(feed) > 10
    for step, token_id in enumerate([*feed, None]):
        for b in range(2):
            torch.testing.assert_close(batched[b:b + 1], alone[b], atol=2e-5, rtol=1e-4, msg=f"row {b}, step {step}")
        if token_id is None:
            break
        token = torch.tensor([[token_id]])  # (1, 1)
        mask = torch.cat([mask, torch.ones((2, 1), dtype=mask.dtype)], dim=1)  # (2, L + 1)
        batched = decode_rows(model, token.expand(2, 1), mask, cache)
        alone = [decode_one_token(model, token, c) for c in alone_caches]
    assert cache.get_seq_length() == ids.shape[1] + len(feed)


@pytest.mark.parametrize("gamma", [1.0, 3.0])
def test_guided_greedy_matches_two_separate_caches(tiny_llm, gamma):
    cond, uncond = _with_persona(tiny_llm), _without_persona(tiny_llm)
    config = _guided(gamma)
    guided = list(generate_tokens(tiny_llm.model, cond, config, stop_token_ids=(), unconditioned_ids=uncond))
    assert guided == _reference_guided_greedy(tiny_llm.model, cond, uncond, gamma, config.max_new_tokens)
    assert guided != list(generate_tokens(tiny_llm.model, cond, GREEDY, stop_token_ids=()))  # guidance acts


def test_one_batched_forward_per_token(tiny_llm):
    cond, uncond = _with_persona(tiny_llm), _without_persona(tiny_llm)
    sizes, handle = _forward_batches(tiny_llm.model)
    try:
        tokens = list(generate_tokens(tiny_llm.model, cond, _guided(2.0), stop_token_ids=(), unconditioned_ids=uncond))
    finally:
        handle.remove()
    # The last token is never fed back: prefill + (N - 1) decode steps, each one batch of both rows.
    assert sizes == [2] * len(tokens)


def test_left_pad_and_positions():
    ids, mask = left_pad([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_for(mask, 3).tolist() == [[0, 1, 2], [0, 0, 0]]
    grown = torch.cat([mask, torch.ones((2, 1), dtype=mask.dtype)], dim=1)
    assert position_ids_for(grown, 1).tolist() == [[3], [1]]


def test_guidance_mix_formula():
    cond_p = torch.tensor([[0.5, 0.3, 0.2]])
    uncond_p = torch.tensor([[0.7, 0.2, 0.1]])
    # Unnormalised logits: the mix works on log-probs, so a per-row shift must not matter.
    cond_logits, uncond_logits = cond_p.log() + 3.0, uncond_p.log() - 1.5
    expected = 2 * cond_p.log() - uncond_p.log()
    torch.testing.assert_close(guidance_mix(cond_logits, uncond_logits, 1.0), expected)
    assert guidance_mix(cond_logits, uncond_logits, 1.0).argmax().item() == 1  # the token the persona raised most
    assert cond_logits.argmax().item() == 0  # ...which plain decoding would not pick
    torch.testing.assert_close(guidance_mix(cond_logits, uncond_logits, 0.0), cond_p.log())
    by_hand = [(1 + 3.0) * math.log(c) - 3.0 * math.log(u) for c, u in zip(cond_p[0].tolist(), uncond_p[0].tolist())]
    torch.testing.assert_close(guidance_mix(cond_logits, uncond_logits, 3.0), torch.tensor([by_hand]))
    half = guidance_mix(cond_logits.half(), uncond_logits.half(), 1.0)
    assert half.dtype == torch.float32


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), MAX_PERSONA_STRENGTH + 0.5, "1", True, None])
def test_persona_strength_validation(value):
    with pytest.raises(ValueError, match="persona_strength"):
        GenerationConfig(persona_strength=value)


def test_persona_strength_accepts_range():
    assert GenerationConfig().persona_strength == 0.0
    assert GenerationConfig(persona_strength=0).persona_strength == 0
    assert GenerationConfig(persona_strength=MAX_PERSONA_STRENGTH).persona_strength == MAX_PERSONA_STRENGTH


def test_cache_with_guidance_is_rejected(tiny_llm):
    cond, uncond = _with_persona(tiny_llm), _without_persona(tiny_llm)
    with pytest.raises(ValueError, match="cache"):
        generate_tokens(tiny_llm.model, cond, _guided(1.0), stop_token_ids=(), cache=new_cache(tiny_llm.model),
                        unconditioned_ids=uncond)


def test_bad_unconditioned_shape_rejected_at_call(tiny_llm):
    with pytest.raises(ValueError, match="unconditioned_ids"):
        generate_tokens(tiny_llm.model, _with_persona(tiny_llm), _guided(1.0), stop_token_ids=(),
                        unconditioned_ids=torch.zeros((2, 3), dtype=torch.long))
    with pytest.raises(ValueError, match="unconditioned_ids"):
        generate_tokens(tiny_llm.model, _with_persona(tiny_llm), _guided(1.0), stop_token_ids=(),
                        unconditioned_ids=torch.zeros((0,), dtype=torch.long))


def test_max_new_tokens_respected(tiny_llm):
    config = _guided(2.0, max_new_tokens=5)
    tokens = generate_tokens(tiny_llm.model, _with_persona(tiny_llm), config, stop_token_ids=(),
                             unconditioned_ids=_without_persona(tiny_llm))
    assert len(list(tokens)) == 5


def test_stop_token_ends_generation_and_is_not_yielded(tiny_llm):
    cond, uncond = _with_persona(tiny_llm), _without_persona(tiny_llm)

    def run(stop) -> list[int]:
        return list(generate_tokens(tiny_llm.model, cond, _guided(2.0), stop_token_ids=stop, unconditioned_ids=uncond))

    reference = run(())
    stop = reference[5]
    assert run({stop}) == reference[:reference.index(stop)]


def test_should_stop_checked_before_every_step(tiny_llm):
    cond, uncond = _with_persona(tiny_llm), _without_persona(tiny_llm)
    checks = []

    def should_stop() -> bool:
        checks.append(1)
        return len(checks) > 3

    got = list(generate_tokens(tiny_llm.model, cond, _guided(2.0), stop_token_ids=(), should_stop=should_stop,
                               unconditioned_ids=uncond))
    assert len(got) == 3

    sizes, handle = _forward_batches(tiny_llm.model)
    try:
        stream = generate_tokens(tiny_llm.model, cond, _guided(2.0), stop_token_ids=(), should_stop=lambda: True,
                                 unconditioned_ids=uncond)
        assert list(stream) == []
    finally:
        handle.remove()
    assert sizes == []  # not even the prefill ran


def test_seeded_sampling_is_reproducible(tiny_llm):
    cond, uncond = _with_persona(tiny_llm), _without_persona(tiny_llm)

    def run(seed: int) -> list[int]:
        config = GenerationConfig(temperature=1.0, top_p=0.95, max_new_tokens=20, seed=seed, persona_strength=1.5)
        return list(generate_tokens(tiny_llm.model, cond, config, stop_token_ids=(), unconditioned_ids=uncond))

    assert run(1) == run(1)
    assert run(1) != run(2)
