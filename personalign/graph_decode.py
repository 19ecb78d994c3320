"""Decode steps replayed from a captured CUDA graph, over a fixed-size slot buffer.

On a GPU a small model's decode step is bound by launching its kernels and by the Python
around them, not by arithmetic: the embedded model took 17-23 ms a step on an H200 whatever
its cache held (benchmarks/RESULTS.md). A CUDA graph replays a captured step's ~1,100 kernels
with one launch. A graph needs fixed shapes and fixed addresses, so the steps run over a
``SlotCache``: per layer one (1, H, C, D) buffer of C slots, each step writing its token's key
and value into the next slot and attending to all C under a 4D mask that opens one slot more
each step (transformers passes a prepared 4D mask through as is).

A reply is a ``DecodeRun``: the cache the prompt was prefilled into (a ``DynamicCache``, or a
streaming memory) is copied into the slots, the steps run, and ``finish`` appends the entries
of the tokens fed to that cache, so it ends as the plain token-by-token loop leaves it and
the memory policies compress it as before. This module knows nothing of sampling, stop
tokens or memory policies. Off CUDA the same slot steps run eagerly (``capture=False``), which
is how the CPU tests check them against the plain loop.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from personalign.memory_cache import GrowingLayer

log = logging.getLogger(__name__)

SLOT_ROUNDING = 1024  # slot buffers come in multiples of this, so a graph serves many turns
KEPT_GRAPHS = 2  # captured graphs kept per model (the newest sizes); each holds its buffers


class SlotCache(DynamicCache):
    """A cache of fixed buffers that each update writes one entry into, at ``slot``.

    ``keys[i]``/``values[i]``: layer i's (1, H, C, D) buffers; ``slot``: (1,) the index the next
    token's entries go to. ``update`` returns the whole buffers, so the attention that follows
    always has C keys (fixed shapes for the graph); the mask hides the slots not yet written.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slot: torch.Tensor) -> None:
        super().__init__()
        self.slot_keys, self.slot_values, self.slot = keys, values, slot

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.slot_keys[layer_idx], self.slot_values[layer_idx]  # (1, H, C, D)
        keys.index_copy_(2, self.slot, key_states)  # key_states: (1, H, 1, D)
        values.index_copy_(2, self.slot, value_states)
        return keys, values


def _plain_layers(cache: Any) -> bool:
    """Whether every layer of ``cache`` is filled, of batch 1, and keeps all its entries.

    By exact type: the sliding-window layers derive from ``DynamicLayer`` but drop entries.
    """
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in (DynamicLayer, GrowingLayer) and layer.keys is not None
                                and layer.keys.shape[0] == 1 for layer in layers)


class SlotSteps:
    """The step of one model over one slot buffer size, replayed from a CUDA graph or run eagerly."""

    def __init__(self, model: Any, like: Any, capacity: int, capture: bool) -> None:
        self.model, self.capacity, self.capture = model, capacity, capture
        device = like.layers[0].keys.device
        dtype = next(model.parameters()).dtype  # the embeddings': the compute dtype, also under 4-bit
        self.keys = [layer.keys.new_zeros((1, layer.keys.shape[1], capacity, layer.keys.shape[3]))
                     for layer in like.layers]  # (1, H, C, D) each
        self.values = [layer.values.new_zeros((1, layer.values.shape[1], capacity, layer.values.shape[3]))
                       for layer in like.layers]
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
        self.position = torch.zeros((1, 1), dtype=torch.long, device=device)  # (1, 1)
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)  # (1, 1)
        self.mask = torch.full((1, 1, 1, capacity), torch.finfo(dtype).min, dtype=dtype, device=device)
        self.cache = SlotCache(self.keys, self.values, self.slot)
        self.graph: Any = None
        self.logits: torch.Tensor | None = None

    def fits(self, cache: Any) -> bool:
        """Whether ``cache``'s layers have the heads, dims, dtype and device of these buffers."""
        return len(cache.layers) == len(self.keys) and all(
            layer.keys.shape[1::2] == k.shape[1::2] and layer.keys.dtype == k.dtype and layer.keys.device == k.device
            for layer, k in zip(cache.layers, self.keys))

    @torch.inference_mode()
    def _forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.token, position_ids=self.position, attention_mask=self.mask,
                         past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1, :]  # (1, 1, V) -> (1, V)

    def _capture(self) -> None:
        """Capture one step; the warm-up steps first settle the libraries' lazy set-up off the graph."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work (the server's) must not break this capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.logits = self._forward()
        self.graph = graph
        log.info("captured a CUDA graph of one decode step over %d slots", self.capacity)

    @torch.inference_mode()
    def load(self, cache: Any) -> int:
        """Copy ``cache``'s entries into the first slots and open them; returns how many."""
        length = cache.layers[0].keys.shape[2]
        for layer, keys, values in zip(cache.layers, self.keys, self.values):
            keys[:, :, :length] = layer.keys
            values[:, :, :length] = layer.values
        self.mask.fill_(torch.finfo(self.mask.dtype).min)
        self.mask[..., :length] = 0
        return length

    @torch.inference_mode()
    def step(self, token: torch.Tensor, slot: int, position: int) -> torch.Tensor:
        """Feed ``token`` (1, 1) into ``slot`` at rotary ``position``; returns next-token logits (1, V).

        The logits are this object's output buffer, overwritten by the next step.
        """
        self.token.copy_(token)
        self.slot.fill_(slot)
        self.position.fill_(position)
        self.mask[..., slot] = 0
        if not self.capture:
            return self._forward()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits


class DecodeRun:
    """One reply's decode steps on top of ``cache`` (see the module docstring)."""

    def __init__(self, steps: SlotSteps, cache: Any) -> None:
        self.steps, self.cache = steps, cache
        self.start = steps.load(cache)
        self.position = self.start + getattr(cache, "position_offset", 0)  # where the next token sits
        self.fed = 0

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed the token just chosen, (1, 1); returns the next-token logits, (1, V)."""
        if self.start + self.fed >= self.steps.capacity:
            raise RuntimeError(f"the decode run has room for {self.steps.capacity - self.start} tokens")
        logits = self.steps.step(token, self.start + self.fed, self.position + self.fed)
        self.fed += 1
        return logits

    @torch.inference_mode()
    def finish(self) -> None:
        """Append the fed tokens' entries to the cache, as decoding on it would have; once."""
        fed, self.fed = self.fed, 0
        if not fed:
            return
        end = self.start + fed
        for index, (keys, values) in enumerate(zip(self.steps.keys, self.steps.values)):
            self.cache.update(keys[:, :, self.start:end].clone(), values[:, :, self.start:end].clone(), index)


class GraphDecoder:
    """Slot steps for one model, one per buffer size, the newest ``KEPT_GRAPHS`` kept.

    A captured graph reads the weights at the addresses they had when it was captured, so
    the steps are dropped whenever any parameter has moved (the model moved, say); a change of
    modules is told with ``forget`` (``adapter_slot`` does so at every swap).
    """

    def __init__(self, model: Any, capture: bool) -> None:
        self.model, self.capture = model, capture
        self._steps: dict[int, SlotSteps] = {}
        self._weights: tuple[int, ...] = ()
        self.broken = False

    def _addresses(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for p in self.model.parameters())

    def begin(self, cache: Any, max_new_tokens: int) -> DecodeRun | None:
        """A decode run on ``cache`` with room for ``max_new_tokens``, or None where the slot steps
        cannot stand in for plain decoding (a sliding-window or batched cache, or a broken capture)."""
        if self.broken or max_new_tokens < 1 or not _plain_layers(cache):
            return None
        weights = self._addresses()
        if weights != self._weights:
            self._steps.clear()
            self._weights = weights
        needed = cache.layers[0].keys.shape[2] + max_new_tokens
        capacity = -(-needed // SLOT_ROUNDING) * SLOT_ROUNDING
        steps = self._steps.pop(capacity, None)
        if steps is None or not steps.fits(cache):
            steps = SlotSteps(self.model, cache, capacity, self.capture)
        self._steps[capacity] = steps  # newest last
        while len(self._steps) > KEPT_GRAPHS:
            self._steps.pop(next(iter(self._steps)))
        return DecodeRun(steps, cache)


# One decoder per model, shared by whoever decodes on it; its runs must not overlap, which the
# engine's lock ensures (one reply at a time per model). The lock guards only the table.
_decoders: weakref.WeakKeyDictionary[Any, GraphDecoder] = weakref.WeakKeyDictionary()
_decoders_lock = threading.Lock()


def forget(model: Any) -> None:
    """Drop ``model``'s captured graphs: its modules changed (a LoRA swapped in or out), and a graph
    replays the kernels of the modules it was captured through."""
    with _decoders_lock:
        _decoders.pop(model, None)


def graph_decoder(model: Any) -> GraphDecoder | None:
    """The model's graph decoder on CUDA with an attention that takes a 4D mask; else None."""
    if model.device.type != "cuda":
        return None
    if getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return None
    with _decoders_lock:
        decoder = _decoders.get(model)
        if decoder is None:
            decoder = _decoders[model] = GraphDecoder(model, capture=True)
        return decoder
