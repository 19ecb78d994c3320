"""StreamingLLM (Xiao et al., 2023): attention sinks plus a sliding window, as a dialogue memory baseline.

The cache keeps the first ``sink_tokens`` entries of the dialogue (the "attention sinks" that
absorb the attention mass a softmax must put somewhere) and the most recent ``window``
entries; everything in between is dropped. It is the baseline StreamingDialogue is measured
against (METHODS.md §2 uses 1 sink + a window; the StreamingLLM paper's default is 4).

It has the public surface of ``StreamingDialogueCache`` (``compress``, ``cached_tokens``,
``kept_positions``, ``rope_positions``, ``kv_bytes``; the bookkeeping lives in
``memory_cache.MemoryCache``), so the two can be swapped. Like it, it evicts only between
turns, in ``compress``; inside a turn it grows as a plain ``DynamicCache``, so a turn longer
than the window still decodes exactly.

Position rule: the cache's ``Positions`` (``memory_cache``). Under the default, ``compressed``,
every turn starts at position ``sink_tokens + window`` once the window is full, so the turns
held in the window were rotated with overlapping positions. The StreamingLLM paper instead
gives every entry its position within the cache (it caches keys before RoPE): that is the
``slot`` rule. ``benchmarks/memory_recall.py`` measures each.

The module knows nothing of tokenizers, chat templates or utterances: it never looks at the
token ids it keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from personalign.memory_cache import MemoryCache, Positions


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class StreamingLLMConfig:
    """How much a ``StreamingLLMCache`` keeps: ``sink_tokens`` first entries + ``window`` latest."""

    sink_tokens: int = 4
    window: int = 256

    def __post_init__(self) -> None:
        if not _is_int(self.sink_tokens) or self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be a whole number >= 0; got {self.sink_tokens!r}")
        if not _is_int(self.window) or self.window < 1:
            raise ValueError(f"window must be a whole number >= 1; got {self.window!r}")

    @property
    def capacity(self) -> int:
        """Entries held after a ``compress`` at most."""
        return self.sink_tokens + self.window


def sink_window_indices(length: int, sink_tokens: int, window: int) -> list[int]:
    """Indices kept out of ``length`` entries: the first ``sink_tokens`` and the last ``window``."""
    if length <= sink_tokens + window:
        return list(range(length))
    return [*range(sink_tokens), *range(length - window, length)]


class StreamingLLMCache(MemoryCache):
    """A ``DynamicCache`` that evicts to sinks + a recent window between turns.

    Feed turns as usual (``past_key_values=cache``); then call ``compress(new_token_ids)``
    with the ids of every token fed since the last compress, in order.
    """

    def __init__(
        self,
        config: StreamingLLMConfig | None = None,
        *,
        positions: Positions | None = None,
    ) -> None:
        super().__init__(positions=positions)
        self.config = StreamingLLMConfig() if config is None else config
        if not isinstance(self.config, StreamingLLMConfig):
            raise TypeError(f"config must be a StreamingLLMConfig; got {type(self.config).__name__}")

    def keep_indices(self, token_ids: Sequence[int]) -> list[int]:
        """The first ``sink_tokens`` entries and the latest ``window`` ones."""
        return sink_window_indices(len(token_ids), self.config.sink_tokens, self.config.window)
