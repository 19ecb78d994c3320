"""Conversation memory: how much of a chat's past the model keeps between turns.

Three policies, chosen per conversation:

- ``dense``: the whole history (trimmed from the oldest turn to fit the context) is re-sent
  and re-read every turn; nothing persists between turns.
- ``streaming-llm``: StreamingLLM's attention sinks plus a recent window (a baseline).
- ``streaming-dialogue``: StreamingDialogue's conversational attention sinks (BOS, every
  earlier end-of-utterance token and the latest utterance).

For the two streaming policies a ``ConversationMemory`` keeps a compressing KV cache alive
between turns, so a turn costs reading only the new message. A turn is fed in the paper's
order: the user's turn is prefilled and the cache compressed (so the reply sees BOS, the
EoU sinks and the user's turn), then the reply is decoded and closed with the EoU token,
and the cache is compressed again. Turns are rendered by the model's own chat template,
incrementally: the new text is what the template adds after the turns already fed.

The memory is saved to a file after every turn (``save``/``load``); the caller decides where
and records it. This module knows nothing of storage, persona or the UI.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from personalign.errors import UserError
from personalign.generation import prefill
from personalign.memory_cache import MemoryCache, Positions, close_turn
from personalign.models import LoadedModel
from personalign.streaming_dialogue import StreamingDialogueCache
from personalign.streaming_llm import StreamingLLMCache

FILE_FORMAT = 1
Message = dict[str, str]


class MemoryPolicy(str, Enum):
    """What the model keeps of a conversation between turns."""

    DENSE = "dense"
    STREAMING_LLM = "streaming-llm"
    STREAMING_DIALOGUE = "streaming-dialogue"

    @property
    def label(self) -> str:
        return {
            "dense": "Dense: re-read the whole history",
            "streaming-llm": "StreamingLLM: sinks + recent window",
            "streaming-dialogue": "StreamingDialogue: conversational sinks",
        }[self.value]

    @property
    def streaming(self) -> bool:
        """True when a compressed cache persists between turns."""
        return self is not MemoryPolicy.DENSE


class MemoryFileError(Exception):
    """A saved memory file is missing, unreadable, or does not belong to this conversation and model."""


class MemoryTemplateError(UserError):
    """The chat template cannot be extended turn by turn, which streaming memory needs."""


@dataclass(frozen=True)
class MemoryMeter:
    """What a conversation's memory holds, and what dense attention would hold instead."""

    policy: str
    cached_tokens: int
    kv_bytes: int
    dense_tokens: int
    dense_kv_bytes: int
    utterances: int = 0

    @property
    def reduction(self) -> float | None:
        """How many times smaller than dense the cache is (None before anything is cached)."""
        return self.dense_kv_bytes / self.kv_bytes if self.kv_bytes else None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"reduction": self.reduction}


def kv_bytes_per_token(model: Any, dtype: torch.dtype) -> int:
    """Bytes one token costs in a full KV cache: layers × KV heads × head size × (K and V) × element size.

    ``dtype`` is the compute dtype, which the cache holds even under 4-bit weights.
    """
    config = _text_config(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    element = torch.empty((), dtype=dtype).element_size()
    return int(config.num_hidden_layers * kv_heads * head_dim * 2 * element)


def dense_meter(loaded: LoadedModel, tokens: int) -> MemoryMeter:
    """The meter of a dense turn that read ``tokens`` tokens."""
    size = tokens * kv_bytes_per_token(loaded.model, loaded.dtype)
    return MemoryMeter(MemoryPolicy.DENSE.value, tokens, size, tokens, size)


# Tokens a replay feeds per forward: enough to amortise a forward's fixed cost (the embedded
# 135M model prefilled 650 tokens/s in 500-token forwards and 360 in 25-token ones, on 2 CPU
# cores), few enough that the (T, cache + T) attention mask over thousands of sinks stays small.
REPLAY_TOKENS = 512

# Room a turn (the user's message and the reply) gets beyond the distance rule's cap, so that
# no key is read from further back than the model's trained context.
TURN_RESERVE = 1024


def memory_reach(loaded: LoadedModel) -> int | None:
    """How far back, in tokens, the loaded memory adapter's sinks were trained to be read.

    That is its longest training sequence (``train-memory`` records it; adapters trained before
    that record their ``max_tokens``, which their runs were packed up to). None without a memory
    adapter: the untrained sinks read no better at any distance (benchmarks/RESULTS.md).
    """
    meta = loaded.adapter_metadata
    reach = meta.get("longest_sequence") or meta.get("max_tokens")
    if meta.get("purpose") != "memory" or not isinstance(reach, int) or isinstance(reach, bool) or reach < 8:
        return None
    return reach


def memory_positions(rule: str, model: Any, context: int, reach: int | None = None) -> Positions:
    """The position rule ``rule`` for ``model``; the distance rule capped to fit ``context``.

    With ``reach`` (``memory_reach``) the distance rule is capped at half of it instead, when
    that is nearer: a sink older than the cap is re-rotated to between a quarter and a half of
    the reach back, where the adapter was trained to read it. At true distances beyond any it
    was trained on, an adapter trained on short dialogues answered no better than untrained
    sinks; capped, it answered most (benchmarks/RESULTS.md, "Reading far").
    """
    if rule != "distance":
        return Positions.for_model(rule, model)
    cap = context - min(TURN_RESERVE, context // 4)
    if reach is not None:
        cap = min(cap, max(2, reach // 2))
    return Positions.for_model(rule, model, max_distance=cap)


def new_cache(policy: MemoryPolicy, loaded: LoadedModel) -> MemoryCache:
    """An empty compressing cache for a streaming policy, under the position rule that policy reads best.

    StreamingDialogue: the distance rule (every kept key at its true distance, capped at the
    context, or at half a memory adapter's reach: ``memory_positions``). It is exactly what
    ``train-memory`` trains the sinks under, and held-back perplexity at 100 utterances was 56
    against 176 under the slot rule untrained, 45 against 84 with a trained adapter
    (benchmarks/RESULTS.md). StreamingLLM: the slot rule, its
    paper's (kept keys re-rotated to 0..K-1), whose perplexity matched dense (6.8 against 5.2)
    while the reference code's rule reached 162.
    """
    if policy is MemoryPolicy.STREAMING_DIALOGUE:
        return StreamingDialogueCache(loaded.eou_token_id, loaded.tokenizer.bos_token_id,
                                      positions=memory_positions("distance", loaded.model, loaded.context_length,
                                                                 memory_reach(loaded)))
    if policy is MemoryPolicy.STREAMING_LLM:
        return StreamingLLMCache(positions=memory_positions("slot", loaded.model, loaded.context_length))
    raise ValueError(f"{policy.value} memory keeps no cache between turns")


def _render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer: Any, text: str) -> list[int]:
    # The template already holds its special tokens; adding BOS again would double it.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


@dataclass
class ConversationMemory:
    """A conversation's compressed cache, and what is needed to extend it by one turn.

    ``anchor`` holds the last turns as they were fed (the system message, if any, then the
    latest user and assistant messages): enough for the template to render what the next
    turn adds. ``pending`` holds template tokens that follow the last EoU (ChatML's newline),
    fed at the start of the next turn so that every fed turn ends exactly at its EoU.
    """

    policy: MemoryPolicy
    model_name: str
    cache: MemoryCache
    anchor: list[Message] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    message_count: int = 0  # stored messages the cache holds
    last_message_id: int | None = None  # the newest of them
    # False once a turn failed half-way: the cache no longer matches any stored history.
    intact: bool = True

    @classmethod
    def empty(cls, policy: MemoryPolicy | str, loaded: LoadedModel) -> ConversationMemory:
        policy = MemoryPolicy(policy)
        return cls(policy, loaded.name, new_cache(policy, loaded))

    def snapshot(self) -> ConversationMemory:
        """A copy to resume from later (answering a turn again), sharing the cache's tensors."""
        return dataclasses.replace(self, cache=self.cache.snapshot(), anchor=[dict(m) for m in self.anchor],
                                   pending=list(self.pending))

    # --- figures -----------------------------------------------------------------------------

    def cached_tokens(self) -> int:
        return len(self.cache.cached_tokens)

    def meter(self, loaded: LoadedModel) -> MemoryMeter:
        per_token = kv_bytes_per_token(loaded.model, loaded.dtype)
        seen = self.cache.tokens_seen
        utterances = sum(1 for t in self.cache.cached_tokens if t == loaded.eou_token_id)
        return MemoryMeter(self.policy.value, self.cached_tokens(), self.cache.kv_bytes(), seen, seen * per_token,
                           utterances)

    # --- turns ---------------------------------------------------------------------------------

    def turn_prompt(self, loaded: LoadedModel, messages: Sequence[Message]) -> tuple[list[int], str]:
        """Token ids (and text) that open the next reply: the new user turn and the reply opener.

        ``messages`` are the prompt messages of the turn; on the first turn all of them are
        fed (a system message included), later only the last one, the new user message.
        """
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("a turn's messages must end with the user's message")
        tok = loaded.tokenizer
        if not self.anchor:
            text = _render(tok, messages, True)
        else:
            before = _render(tok, self.anchor, False)
            after = _render(tok, [*self.anchor, dict(messages[-1])], True)
            if not after.startswith(before):
                raise MemoryTemplateError(
                    f"{loaded.name}'s chat template rewrites earlier turns when a turn is added, so its "
                    "conversation cannot be kept in a streaming memory. Use dense memory with this model."
                )
            text = after[len(before):]
        return [*self.pending, *_ids(tok, text)], text

    def begin_turn(self, loaded: LoadedModel, prompt_ids: Sequence[int]) -> list[int]:
        """Feed all but the last prompt token and compress; return what is left to feed (one token).

        Compressing here means the reply is decoded seeing BOS, the sinks and the user's turn,
        as the method prescribes; the last token goes through the decode loop and yields the
        first reply logits.
        """
        ids = [int(t) for t in prompt_ids]
        if len(ids) > 1:
            prefill(loaded.model, torch.tensor([ids[:-1]], device=loaded.device), self.cache)  # (1, T-1)
        self.cache.compress(ids[:-1])
        return ids[-1:]

    def end_turn(self, loaded: LoadedModel, messages: Sequence[Message], prompt_ids: Sequence[int],
                 reply_ids: Sequence[int], reply_text: str) -> None:
        """Close the reply with the template's end-of-turn tokens, compress, and move the anchor on.

        ``reply_ids`` are the reply tokens generated (the stop token excluded); the decode loop
        may have left the last of them unfed, which this feeds along with the EoU. An empty
        reply (stopped before its first token) is closed too, so the cache always ends at an EoU.
        """
        closing = self._close(loaded, messages, reply_text)
        close_turn(loaded.model, self.cache, [prompt_ids[-1], *reply_ids, *closing])

    def _close(self, loaded: LoadedModel, messages: Sequence[Message], reply_text: str) -> list[int]:
        """Move the anchor on past this turn's reply; return the template's tokens that close it (to its EoU)."""
        tok = loaded.tokenizer
        user = dict(messages[-1])
        reply = {"role": "assistant", "content": reply_text}
        turn_messages = list(messages) if not self.anchor else [*self.anchor, user]
        opened = _render(tok, turn_messages, True) + reply_text
        closed = _render(tok, [*turn_messages, reply], False)
        suffix = _ids(tok, closed[len(opened):]) if closed.startswith(opened) else []
        eou = loaded.eou_token_id
        if eou not in suffix:  # a template that trims the reply: close with the bare EoU
            suffix = [eou]
        cut = suffix.index(eou) + 1
        system = [m for m in turn_messages[:1] if m["role"] == "system"]
        self.anchor = [*(dict(m) for m in system), user, reply]
        self.pending = suffix[cut:]
        return suffix[:cut]

    # --- files ---------------------------------------------------------------------------------

    def save(self, path: Path) -> int:
        """Write the memory to ``path`` atomically; return the file size in bytes."""
        return write_memory_file(self.file_state(), path)

    def file_state(self) -> dict[str, Any]:
        """What ``save`` writes, as it is now: later turns do not change it (no cached entry is
        ever written in place, and the lists are copies), so it can be written later."""
        return {
            "format": FILE_FORMAT,
            "policy": self.policy.value,
            "model": self.model_name,
            "cache": self.cache.export_state(),
            "anchor": [dict(m) for m in self.anchor],
            "pending": list(self.pending),
            "message_count": self.message_count,
            "last_message_id": self.last_message_id,
        }

    @classmethod
    def load(cls, path: Path, loaded: LoadedModel, policy: MemoryPolicy | str) -> ConversationMemory:
        """Read a saved memory for ``loaded``; ``MemoryFileError`` for anything that does not fit."""
        policy = MemoryPolicy(policy)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise MemoryFileError(f"no saved memory at {path.name}") from exc
        except Exception as exc:  # truncated, corrupt or foreign file: all mean "rebuild"
            raise MemoryFileError(f"the saved memory {path.name} cannot be read: {exc}") from exc
        try:
            if state.get("format") != FILE_FORMAT:
                raise MemoryFileError(f"the saved memory {path.name} has an unknown format")
            if state["policy"] != policy.value or state["model"] != loaded.name:
                raise MemoryFileError(f"the saved memory {path.name} was made for another policy or model")
            memory = cls(policy, loaded.name, new_cache(policy, loaded), [dict(m) for m in state["anchor"]],
                         [int(t) for t in state["pending"]], int(state["message_count"]),
                         state["last_message_id"])
            memory.cache.load_state(state["cache"], loaded.device)
        except MemoryFileError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise MemoryFileError(f"the saved memory {path.name} is damaged: {exc}") from exc
        _check_shapes(memory, loaded)
        return memory


def write_memory_file(state: dict[str, Any], path: Path) -> int:
    """Write a ``file_state`` to ``path`` atomically; return the file size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous file, never half a file
    return path.stat().st_size


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_shapes(memory: ConversationMemory, loaded: LoadedModel) -> None:
    if len(memory.cache.layers) != _text_config(loaded.model).num_hidden_layers:
        raise MemoryFileError("the saved memory has a different number of layers than the model")


def replay(
    loaded: LoadedModel, policy: MemoryPolicy | str, turns: Sequence[tuple[list[Message], str]], *,
    tokens_per_forward: int = REPLAY_TOKENS,
) -> Generator[tuple[int, int], None, ConversationMemory]:
    """Replay stored turns into a fresh memory exactly as live turns are fed; yield (done, total).

    ``turns`` are (prompt messages, reply text) pairs, oldest first. Returns the memory.
    A live turn is fed in two parts, each then compressed: the user's turn but its last token
    (``begin_turn``), then that token, the reply and its closing tokens. Replayed, the parts of
    several turns share one forward of up to ``tokens_per_forward`` tokens (``MemoryCache.feed``;
    1 feeds each part alone, as live turns do), with the same result.
    """
    memory = ConversationMemory.empty(policy, loaded)
    segments: list[list[int]] = []
    reported = 0
    for done, (messages, reply_text) in enumerate(turns, 1):
        prompt_ids, _ = memory.turn_prompt(loaded, messages)
        reply_ids = _ids(loaded.tokenizer, reply_text)
        closing = memory._close(loaded, messages, reply_text)
        segments += [prompt_ids[:-1], [prompt_ids[-1], *reply_ids, *closing]]
        if sum(map(len, segments)) >= tokens_per_forward or done == len(turns):
            memory.cache.feed(loaded.model, segments, max_tokens=tokens_per_forward)
            segments = []
            for turn in range(reported + 1, done + 1):  # every turn fed by now
                yield turn, len(turns)
            reported = done
    return memory
