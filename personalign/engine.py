"""The chat engine: one loaded model shared by every user of the app.

Replies are generated one at a time under a lock: one device gains little from
interleaving two users' decode steps, and serial replies keep memory bounded and
timings honest. Each reply streams its cumulative text as it grows, and carries its
own figures: the engine keeps no per-reply state, so two users never see each other's.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from personalign.adapter_slot import AdapterSlot, weights_name
from personalign.errors import UserError
from personalign.generation import GenerationConfig, TextAccumulator, generate_tokens
from personalign.memory import (
    ConversationMemory,
    MemoryMeter,
    MemoryPolicy,
    Message,
    dense_meter,
    replay,
)
from personalign.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamStats:
    """Figures for one finished reply."""

    prompt_tokens: int
    new_tokens: int
    seconds: float  # prefill + decode, excluding the wait for the lock
    first_token_seconds: float  # time to first generated token (mostly prefill)
    tokens_per_second: float
    finish_reason: str  # "stop" (end-of-turn token) | "length" (max_new_tokens) | "cancelled"
    memory: MemoryMeter | None = None  # what the model holds of the conversation after this reply


Pieces = Generator[str, None, StreamStats | None]


class TokenStream(Iterator[str]):
    """One reply: its CUMULATIVE text as it grows, then its own ``stats``.

    Exhaust or ``close()`` it to release the engine lock. ``stats`` is set when the reply
    ends, however it ends (last token, ``close()``, stop event, error); it stays None when
    the reply was stopped while still waiting for the lock. The same value ends iteration
    as ``StopIteration.value``, for callers that drive it with ``next()``.
    """

    def __init__(self, prompt: str, start: Callable[[TokenStream], Pieces]) -> None:
        self.prompt = prompt
        """The text the model reads for this reply; over a streaming memory, only the new turn."""
        self.stats: StreamStats | None = None
        self._pieces = start(self)

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()


class Engine:
    """Chat over one ``LoadedModel``; safe to share between threads."""

    def __init__(self, loaded: LoadedModel, *, cuda_graphs: bool = True) -> None:
        self.loaded = loaded
        self.cuda_graphs = cuda_graphs  # replay decode steps from CUDA graphs (graph_decode); CUDA only
        # A plain Lock, not an RLock: servers such as Gradio may advance one stream
        # from different worker threads, and only a Lock may be released by another thread.
        self._lock = threading.Lock()
        self._slot = AdapterSlot(loaded)  # a persona's own adapter, swapped in for its replies

    @property
    def busy(self) -> bool:
        """True while a reply is being generated."""
        return self._lock.locked()

    @contextmanager
    def exclusive(self, adapter: Path | None = None) -> Iterator[LoadedModel]:
        """Hold the model for work other than a reply (scoring, labelling, training); replies wait meanwhile.

        The model is the base, or the base with a persona's ``adapter`` applied.
        """
        with self._lock:
            yield self._slot.use(adapter)

    def weights_name(self, adapter: Path | None = None) -> str:
        """The name of the weights a reply with ``adapter`` runs on; memories record it."""
        return weights_name(self.loaded, adapter)

    def info(self) -> dict[str, Any]:
        """Model facts for display: name, device, dtype, quantization, parameters, load_seconds."""
        loaded = self.loaded
        return {
            "name": loaded.name,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "quantization": loaded.quantization,
            # num_parameters counts tied weights once and unpacks 4-bit storage.
            "parameters": int(loaded.model.num_parameters()),
            "load_seconds": round(loaded.load_seconds, 2),
        }

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The exact prompt text the model sees, ending with the assistant turn opener."""
        try:
            return self.loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors from templates that reject a role or order
            raise ValueError(f"The model's chat template rejected this conversation: {exc}") from exc

    def encode(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of ``render(messages)``."""
        return self._tokenize(self.render(messages))

    def _tokenize(self, text: str) -> list[int]:
        # The template already holds its special tokens; adding BOS again would double it.
        return list(self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Prompt length in tokens for ``messages``."""
        return len(self.encode(messages))

    def max_context(self) -> int:
        """Tokens the model can attend to (prompt + reply): ``LoadedModel.context_length``."""
        return self.loaded.context_length

    def stream(
        self,
        messages: list[dict[str, Any]],
        config: GenerationConfig,
        *,
        stop_event: threading.Event | None = None,
        unconditioned: list[dict[str, Any]] | None = None,
        adapter: Path | None = None,
    ) -> TokenStream:
        """The reply to ``messages``, as a ``TokenStream`` of its cumulative text and its stats.

        Generation starts on the first ``next()`` and holds the engine lock from the first
        token to the last, so replies never interleave; exhaust or ``close()`` the stream.
        Setting ``stop_event`` ends generation before the next token (also while still
        waiting for the lock, in which case nothing is yielded and ``stats`` stays None).
        Raises ValueError if the prompt leaves no room in the model's context.
        With ``config.persona_strength > 0``, ``unconditioned`` (the same conversation without
        the persona) is the guidance baseline: both prompts decode as two rows of one batch.
        ``adapter``: a persona's own LoRA folder to answer with (both rows, under guidance).
        """
        prompt = self.render(messages)
        ids = self._tokenize(prompt)
        plain = self.encode(unconditioned) if unconditioned is not None and config.persona_strength > 0 else None
        room = self.max_context() - max(len(ids), len(plain or []))
        if room < 1:
            raise ValueError(
                f"The conversation is too long for the model: {len(ids)} tokens, "
                f"and the model's context holds {self.max_context()}. Start a new chat or shorten it."
            )
        if config.max_new_tokens > room:
            config = dataclasses.replace(config, max_new_tokens=room)
        return TokenStream(prompt, lambda out: self._generate(out, ids, config, stop_event, adapter,
                                                              unconditioned_ids=plain))

    def stream_turn(
        self,
        memory: ConversationMemory,
        messages: list[Message],
        config: GenerationConfig,
        *,
        stop_event: threading.Event | None = None,
        adapter: Path | None = None,
    ) -> TokenStream:
        """Like ``stream``, but reading only the new turn on top of a streaming ``memory``.

        ``messages`` are the turn's prompt messages (a system message, if any, then the new
        user message); the memory already holds every earlier turn. The reply is closed into
        the memory when the stream ends, however it ends. ``memory`` must have been made
        under the same ``adapter``: its ``model_name`` is ``weights_name(adapter)``.
        """
        if memory.model_name != self.weights_name(adapter):
            raise ValueError(f"this memory was made on {memory.model_name}, not {self.weights_name(adapter)}")
        ids, prompt = memory.turn_prompt(self.loaded, messages)
        # The positions the memory spans, not its entry count: a long StreamingDialogue chat
        # holds more sinks than the context has positions, all within its distance cap.
        room = self.max_context() - memory.cache.position_span - len(ids)
        if room < 1:
            raise UserError(
                f"The memory and this message span more than the model's context ({self.max_context()} "
                "tokens). Send a shorter message, start a new chat, or switch this one to a policy that keeps less."
            )
        if config.max_new_tokens > room:
            config = dataclasses.replace(config, max_new_tokens=room)
        return TokenStream(prompt, lambda out: self._generate(out, ids, config, stop_event, adapter, memory=memory,
                                                              messages=messages))

    def rebuild_memory(
        self, policy: MemoryPolicy | str, turns: list[tuple[list[Message], str]], adapter: Path | None = None
    ) -> Generator[tuple[int, int], None, ConversationMemory]:
        """Replay stored turns into a fresh streaming memory, yielding (turns done, total).

        Holds the lock throughout, as it runs the model; exhaust or ``close()`` the iterator.
        """
        with self.exclusive(adapter) as loaded:
            return (yield from replay(loaded, policy, turns))

    def empty_memory(self, policy: MemoryPolicy | str, adapter: Path | None = None) -> ConversationMemory:
        return ConversationMemory.empty(policy, self._slot.view(adapter))

    def load_memory(self, path: Any, policy: MemoryPolicy | str, adapter: Path | None = None) -> ConversationMemory:
        """A saved memory for these weights; ``MemoryFileError`` when it does not fit."""
        with self._lock:  # moving tensors onto the device while a reply runs would contend
            return ConversationMemory.load(path, self._slot.view(adapter), policy)

    def dense_meter(self, tokens: int) -> MemoryMeter:
        return dense_meter(self.loaded, tokens)

    def _generate(
        self,
        out: TokenStream,
        ids: list[int],
        config: GenerationConfig,
        stop_event: threading.Event | None,
        adapter: Path | None,
        *,
        memory: ConversationMemory | None = None,
        messages: list[Message] | None = None,
        unconditioned_ids: list[int] | None = None,
    ) -> Pieces:
        """The token loop behind ``out``; sets ``out.stats`` before releasing the lock."""
        should_stop = stop_event.is_set if stop_event is not None else None
        # Poll so that a request cancelled while queued does not wait for its turn.
        while not self._lock.acquire(timeout=0.05):
            if should_stop is not None and should_stop():
                return None
        try:
            loaded = self._slot.use(adapter)
        except BaseException:
            self._lock.release()
            raise
        start = time.perf_counter()
        first_token_at = start
        new_tokens = 0
        completed = False
        text = TextAccumulator(loaded.tokenizer)
        shown = ""
        tokens: Generator[int, None, None] | None = None
        try:
            feed, cache = ids, None
            if memory is not None:
                feed, cache = memory.begin_turn(loaded, ids), memory.cache
            input_ids = torch.tensor([feed], dtype=torch.long, device=loaded.device)  # (1, T)
            tokens = generate_tokens(
                loaded.model,
                input_ids,
                config,
                stop_token_ids=loaded.stop_token_ids,
                cache=cache,
                should_stop=should_stop,
                unconditioned_ids=None if unconditioned_ids is None else torch.tensor([unconditioned_ids],
                                                                                      device=loaded.device),
                graphs=self.cuda_graphs,
            )
            for token_id in tokens:
                new_tokens += 1
                if new_tokens == 1:
                    first_token_at = time.perf_counter()
                update = text.add(token_id)
                if update is not None:
                    shown = update
                    yield update
            completed = True
        finally:
            if tokens is not None:
                tokens.close()  # the decode loop leaves the cache complete only once it is closed
            meter = None
            if memory is not None:
                meter = self._close_turn(memory, messages or [], ids, text.token_ids, shown)
            else:
                meter = dense_meter(loaded, len(ids) + new_tokens)
            # Also on close() or an error, so a stopped or failed reply still reports its figures.
            seconds = time.perf_counter() - start
            if not completed or (should_stop is not None and should_stop()):
                reason = "cancelled"
            elif new_tokens >= config.max_new_tokens:
                reason = "length"
            else:
                reason = "stop"
            stats = StreamStats(
                prompt_tokens=len(ids),
                new_tokens=new_tokens,
                seconds=seconds,
                first_token_seconds=first_token_at - start,
                tokens_per_second=new_tokens / seconds if seconds > 0 else 0.0,
                finish_reason=reason,
                memory=meter,
            )
            out.stats = stats
            self._lock.release()
        return stats

    def _close_turn(self, memory: ConversationMemory, messages: list[Message], ids: list[int],
                    reply_ids: list[int], reply_text: str) -> MemoryMeter | None:
        """Close the reply into the memory; a failure marks the memory broken rather than raising
        from a ``finally`` (the stored chat stays right, and the memory is rebuilt from it)."""
        try:
            memory.end_turn(self.loaded, messages, ids, reply_ids, reply_text)
            return memory.meter(self.loaded)
        except Exception:
            log.exception("closing the turn into the %s memory failed; it will be rebuilt", memory.policy.value)
            memory.intact = False
            return None
