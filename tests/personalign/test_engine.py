"""Engine: prompt rendering, cumulative streaming, cancellation and serialised replies."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from personalign.engine import Engine, StreamStats
from personalign.generation import GenerationConfig, generate_tokens

GREEDY = GenerationConfig(temperature=0, max_new_tokens=32)


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


@pytest.fixture()
def engine(tiny_llm) -> Engine:
    return Engine(tiny_llm)


def _drain(stream) -> tuple[list[str], StreamStats | None]:
    """Drive a stream with next() as Studio does: the stats also end iteration as StopIteration.value."""
    chunks = []
    while True:
        try:
            chunks.append(next(stream))
        except StopIteration as stop:
            return chunks, stop.value


def test_render_is_chatml_with_generation_prompt(engine):
    text = engine.render(_chat("hi"))
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")


def test_count_tokens_matches_prompt_without_added_specials(engine, tiny_llm):
    messages = _chat("hi")
    ids = tiny_llm.tokenizer(engine.render(messages), add_special_tokens=False)["input_ids"]
    assert engine.count_tokens(messages) == len(ids) == len(engine.encode(messages))
    assert engine.encode(messages)[0] == tiny_llm.tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_info_and_max_context(engine):
    info = engine.info()
    assert info["name"] == "tiny-random-llama"
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["quantization"] == "none"
    assert info["parameters"] > 0 and "load_seconds" in info
    assert engine.max_context() == 512


def test_stream_is_cumulative_and_matches_token_loop(engine, tiny_llm):
    messages = _chat("Tell me something.")
    stream = engine.stream(messages, GREEDY)
    assert stream.prompt == engine.render(messages) and stream.stats is None
    chunks, stats = _drain(stream)
    assert chunks and all(b.startswith(a) and b != a for a, b in itertools.pairwise(chunks))
    ids = torch.tensor([engine.encode(messages)])
    tokens = list(generate_tokens(tiny_llm.model, ids, GREEDY, stop_token_ids=tiny_llm.stop_token_ids))
    assert chunks[-1] == tiny_llm.tokenizer.decode(tokens, skip_special_tokens=True)
    assert stats is stream.stats
    assert stats.prompt_tokens == len(ids[0]) and stats.new_tokens == len(tokens)
    assert stats.tokens_per_second > 0 and stats.finish_reason in ("stop", "length")
    assert not engine.busy


def test_stop_event_stops_the_token_loop(engine, tiny_llm):
    calls = []
    handle = tiny_llm.model.register_forward_hook(lambda *_: calls.append(1))
    stop = threading.Event()
    try:
        stream = engine.stream(_chat("Go on."), GenerationConfig(temperature=0, max_new_tokens=200), stop_event=stop)
        next(stream)
        stop.set()
        steps_at_stop = len(calls)
        rest, stats = _drain(stream)
    finally:
        handle.remove()
    assert rest == [] and len(calls) == steps_at_stop  # no model step after the event
    assert stats.finish_reason == "cancelled" and stats.new_tokens < 200
    assert not engine.busy


def test_stop_event_set_before_start_yields_nothing(engine):
    stop = threading.Event()
    stop.set()
    stream = engine.stream(_chat("hi"), GREEDY, stop_event=stop)
    assert list(stream) == []
    assert stream.stats.finish_reason == "cancelled" and stream.stats.new_tokens == 0
    assert not engine.busy


def test_stream_stopped_while_queued_has_no_stats(engine):
    stop = threading.Event()
    stop.set()
    with engine.exclusive():  # another reply holds the model
        stream = engine.stream(_chat("hi"), GREEDY, stop_event=stop)
        assert list(stream) == [] and stream.stats is None
    assert not engine.busy


def test_closing_a_stream_early_releases_the_lock(engine):
    stream = engine.stream(_chat("hi"), GREEDY)
    next(stream)
    assert engine.busy
    stream.close()
    assert not engine.busy
    assert stream.stats.finish_reason == "cancelled" and stream.stats.new_tokens >= 1


def test_a_failing_reply_releases_the_lock_and_reports_its_stats(engine, tiny_llm):
    def fail_after_prefill(*_):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("device lost")

    calls: list[int] = []
    handle = tiny_llm.model.register_forward_hook(fail_after_prefill)
    try:
        stream = engine.stream(_chat("hi"), GenerationConfig(temperature=0, max_new_tokens=20))
        with pytest.raises(RuntimeError, match="device lost"):
            list(stream)
    finally:
        handle.remove()
    assert not engine.busy
    assert stream.stats.finish_reason == "cancelled" and stream.stats.new_tokens == 1


def test_each_stream_carries_its_own_stats(engine, tiny_llm):
    """Replies that end one right after the other keep their own figures (the engine serves every user)."""
    requests = {"a": (_chat("First user asks a longer question."), GREEDY),
                "b": (_chat("Hi!"), GenerationConfig(temperature=0, max_new_tokens=3))}
    expected = {}
    for name, (messages, config) in requests.items():
        ids = torch.tensor([engine.encode(messages)])
        tokens = list(generate_tokens(tiny_llm.model, ids, config, stop_token_ids=tiny_llm.stop_token_ids))
        expected[name] = (ids.shape[1], len(tokens))
    assert expected["a"] != expected["b"]

    a = engine.stream(*requests["a"])  # A starts first ...
    b = engine.stream(*requests["b"])
    list(b)  # ... B finishes first ...
    list(a)  # ... then A: the last to finish must not overwrite the other's figures.
    for name, stream in (("a", a), ("b", b)):
        assert (stream.stats.prompt_tokens, stream.stats.new_tokens) == expected[name]
        assert stream.stats.memory.cached_tokens == sum(expected[name])
    assert b.stats.finish_reason == "length"


def test_two_threads_are_serialised(engine):
    prompts = {"a": _chat("First user asks a question."), "b": _chat("Second user says hello!")}
    expected = {name: list(engine.stream(msgs, GREEDY))[-1] for name, msgs in prompts.items()}
    assert expected["a"] != expected["b"]

    events: list[str] = []
    results: dict[str, str] = {}
    busy: list[bool] = []
    barrier = threading.Barrier(2)

    def user(name: str) -> None:
        barrier.wait()
        for text in engine.stream(prompts[name], GREEDY):
            events.append(name)
            busy.append(engine.busy)
            results[name] = text

    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(user, name) for name in prompts]:
            future.result(timeout=60)  # re-raises a user's error here
    assert results == expected
    assert all(busy)  # the lock is held while each reply is being yielded
    switches = sum(1 for x, y in itertools.pairwise(events) if x != y)
    assert switches == 1  # one whole reply, then the other: never interleaved


def test_too_long_conversation_is_rejected(engine):
    with pytest.raises(ValueError, match="too long"):
        engine.stream(_chat("word " * 200), GREEDY)


def test_reply_is_clipped_to_the_context(engine):
    messages = _chat("x" * 450)
    room = engine.max_context() - engine.count_tokens(messages)
    assert 0 < room < 100
    _, stats = _drain(engine.stream(messages, GenerationConfig(temperature=0, max_new_tokens=100)))
    assert stats.new_tokens <= room


def test_stream_may_be_advanced_from_different_threads(engine):
    """Servers like Gradio call next() on worker threads that change between steps."""
    stream = engine.stream(_chat("hi"), GREEDY)
    chunks: list[str] = []

    def step(n: int | None) -> None:
        if n is None:
            chunks.extend(stream)
        else:
            chunks.extend(next(stream) for _ in range(n))

    for n in (1, 1, None):
        t = threading.Thread(target=step, args=(n,))
        t.start()
        t.join(timeout=60)
    assert len(chunks) >= 2 and not engine.busy
