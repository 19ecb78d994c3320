"""Token loop, sampling and incremental detokenization on the tiny random model."""

from __future__ import annotations

import itertools

import pytest
import torch

from personalign.generation import (
    GenerationConfig,
    TextAccumulator,
    decode_one_token,
    detokenize,
    generate_tokens,
    new_cache,
    prefill,
    sample,
)

GREEDY = GenerationConfig(temperature=0, max_new_tokens=24)


def _prompt(llm, text: str = "Hello there, how are you?") -> torch.Tensor:
    rendered = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return torch.tensor([llm.tokenizer(rendered, add_special_tokens=False)["input_ids"]])  # (1, T)


def _forward_counter(model):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_greedy_matches_hf_generate(tiny_llm):
    ids = _prompt(tiny_llm)
    ours = list(generate_tokens(tiny_llm.model, ids, GREEDY, stop_token_ids=tiny_llm.stop_token_ids))
    with torch.inference_mode():
        out = tiny_llm.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY.max_new_tokens,
            do_sample=False, eos_token_id=sorted(tiny_llm.stop_token_ids), pad_token_id=2,
        )
    theirs = [t for t in out[0, ids.shape[1]:].tolist() if t not in tiny_llm.stop_token_ids]
    assert len(ours) >= 10
    assert ours == theirs


def test_prefill_and_decode_shapes(tiny_llm):
    ids = _prompt(tiny_llm)
    cache = new_cache(tiny_llm.model)
    logits = prefill(tiny_llm.model, ids, cache)
    assert logits.shape == (1, len(tiny_llm.tokenizer))
    token = sample(logits, GREEDY)
    assert token.shape == (1, 1)
    assert decode_one_token(tiny_llm.model, token, cache).shape == logits.shape
    assert cache.get_seq_length() == ids.shape[1] + 1


def test_caller_supplied_cache_is_used(tiny_llm):
    ids = _prompt(tiny_llm)
    cache = new_cache(tiny_llm.model)
    tokens = list(generate_tokens(tiny_llm.model, ids, GREEDY, stop_token_ids=(), cache=cache))
    # The last sampled token is never fed back, so the cache holds one fewer.
    assert cache.get_seq_length() == ids.shape[1] + len(tokens) - 1


def test_max_new_tokens_respected(tiny_llm):
    config = GenerationConfig(temperature=0, max_new_tokens=5)
    assert len(list(generate_tokens(tiny_llm.model, _prompt(tiny_llm), config, stop_token_ids=()))) == 5


def test_stop_token_ends_generation_and_is_not_yielded(tiny_llm):
    ids = _prompt(tiny_llm)
    reference = list(generate_tokens(tiny_llm.model, ids, GREEDY, stop_token_ids=()))
    stop = reference[5]
    first = reference.index(stop)
    got = list(generate_tokens(tiny_llm.model, ids, GREEDY, stop_token_ids={stop}))
    assert got == reference[:first]


def test_should_stop_checked_before_every_step(tiny_llm):
    checks = []

    def should_stop() -> bool:
        checks.append(1)
        return len(checks) > 3

    got = list(generate_tokens(tiny_llm.model, _prompt(tiny_llm), GREEDY, stop_token_ids=(), should_stop=should_stop))
    assert len(got) == 3

    calls, handle = _forward_counter(tiny_llm.model)
    try:
        stream = generate_tokens(tiny_llm.model, _prompt(tiny_llm), GREEDY, stop_token_ids=(), should_stop=lambda: True)
        assert list(stream) == []
    finally:
        handle.remove()
    assert calls == []  # not even the prefill ran


def test_seeded_sampling_is_reproducible(tiny_llm):
    ids = _prompt(tiny_llm)

    def run(seed: int) -> list[int]:
        config = GenerationConfig(temperature=1.0, top_p=0.95, max_new_tokens=20, seed=seed)
        return list(generate_tokens(tiny_llm.model, ids, config, stop_token_ids=()))

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_sample_greedy_and_top_p():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))  # (1, 3)
    assert sample(logits, GenerationConfig(temperature=0)).tolist() == [[1]]
    gen = torch.Generator().manual_seed(0)
    # top_p 0.5: the 0.6 token alone reaches the mass, so it is the only candidate.
    picks = {sample(logits, GenerationConfig(temperature=1.0, top_p=0.5), gen).item() for _ in range(50)}
    assert picks == {1}
    picks = {sample(logits, GenerationConfig(temperature=1.0, top_p=1.0), gen).item() for _ in range(200)}
    assert picks == {0, 1, 2}


def test_top_p_nucleus_is_exact_beyond_the_first_window():
    logits = -0.002 * torch.arange(1000.0).unsqueeze(0)  # (1, 1000), nearly flat, token id == rank
    probs = torch.softmax(logits, dim=-1)[0]
    nucleus = int(((probs.cumsum(0) - probs) < 0.9).sum())  # size of the top-0.9 set
    assert nucleus > 256
    gen = torch.Generator().manual_seed(0)
    picks = sample(logits.expand(4000, -1), GenerationConfig(temperature=1.0, top_p=0.9), gen).flatten()
    assert int(picks.max()) < nucleus and int(picks.max()) > 256


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": 2.5},
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0},
        {"top_p": 1.5},
        {"seed": -1},
        {"seed": "7"},
    ],
)
def test_generation_config_validation(kwargs):
    with pytest.raises(ValueError):
        GenerationConfig(**kwargs)


def test_generation_config_greedy_flag():
    assert GenerationConfig(temperature=0).greedy
    assert not GenerationConfig().greedy


def test_bad_input_shape_rejected_at_call(tiny_llm):
    with pytest.raises(ValueError):
        generate_tokens(tiny_llm.model, torch.zeros((2, 3), dtype=torch.long), GREEDY, stop_token_ids=())


def test_detokenizer_keeps_multibyte_characters_whole(tiny_llm):
    text = "héllo wörld ✓ 日本 🙂!"
    ids = tiny_llm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # byte-level: multi-byte characters span several tokens
    chunks = list(detokenize(tiny_llm.tokenizer, ids))
    assert chunks[-1] == text
    assert all("\ufffd" not in c for c in chunks)
    assert all(b.startswith(a) for a, b in itertools.pairwise(chunks))


def test_text_accumulator_skips_specials_and_unchanged_text(tiny_llm):
    acc = TextAccumulator(tiny_llm.tokenizer)
    assert acc.add(tiny_llm.eou_token_id) is None  # special token: no visible text
    for token_id in tiny_llm.tokenizer("ok", add_special_tokens=False)["input_ids"]:
        acc.add(token_id)
    assert acc.text == "ok"
