"""The bookkeeping shared by KV caches that evict between turns (StreamingDialogue, StreamingLLM).

A ``MemoryCache`` is a ``DynamicCache`` that behaves exactly like one while a turn is
prefilled or decoded. Between turns, ``compress(new_token_ids)`` records the ids fed since
the last compress, asks the subclass which entries to keep (``keep_indices``) and keeps the
same entries on every layer. Eviction never happens inside a turn, so a turn longer than
whatever the policy keeps still decodes exactly as with a plain ``DynamicCache``.

No forward is copied. A rule decides where the kept keys sit and where the next token goes:
the model's default puts it at the cache length (``cache_position = arange(past_len, ...)``),
and a cache whose rule puts it elsewhere says so in ``position_offset``, which
``generation.position_ids_after`` turns into the ``position_ids`` argument. Three rules:

- ``compressed`` (the StreamingDialogue reference code's): kept keys keep the RoPE rotation
  they were computed with, and the next token goes to the cache length. A new turn then sits
  *before* the kept keys of the previous one (they were rotated further on, before the
  eviction shortened the cache): negative distances, which an untrained model reads badly.
- ``slot`` (the StreamingLLM paper's "positions within the cache"): at every compress each
  kept key is re-rotated to its slot, 0..K-1, and the next token goes to K. Every distance
  is positive and small.
- ``distance``: every token goes to its absolute index in the dialogue and kept keys keep
  their rotation, so each distance is the true one. That is exactly what one forward of the
  whole dialogue under the eviction's attention mask computes, the setting
  ``memory_training`` trains the sinks in. ``max_distance`` keeps long dialogues inside the
  model's trained context: a key that falls more than ``max_distance`` behind is re-rotated
  forward to ``max_distance // 2`` behind (so each key is turned once per half-cap of tokens,
  not every turn; repeated turns in bf16 would blur it).

``rope_positions`` records the position each cached entry is rotated with now;
``kept_positions`` records its absolute index in the whole dialogue token stream.

``feed(model, segments)`` gives the result of prefilling and compressing each segment in turn
in fewer forwards: an attention mask stands in for the evictions between them (replaying a long
stored chat). Its layers grow in place (``GrowingLayer``) rather than by concatenation.

The module knows nothing of which entries a policy keeps, of chat templates or of storage.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class RopeShift:
    """Moves RoPE-rotated keys to other positions, with the model's own rotary frequencies.

    RoPE turns each pair of key dimensions by an angle proportional to the position, so a key
    rotated at p becomes the key rotated at p + d by one more turn of d. Written for the
    ``rotate_half`` layout over the whole head (Llama, Mistral, Qwen2, SmolLM2, ...) with
    frequencies fixed at load time (default, linear, llama3, yarn RoPE; not dynamic or longrope,
    whose frequencies change with the sequence length).
    """

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq.detach().float()  # (D/2,)

    @classmethod
    def from_model(cls, model: Any) -> RopeShift:
        """The shift for ``model``'s rotary embedding (found as its ``rotary_emb`` module)."""
        for name, module in model.named_modules():
            if name.endswith("rotary_emb") and isinstance(getattr(module, "inv_freq", None), torch.Tensor):
                rope_type = getattr(module, "rope_type", "default")
                if rope_type in ("dynamic", "longrope"):
                    raise ValueError(f"{rope_type} RoPE changes its frequencies with the length; keys cannot be moved")
                return cls(module.inv_freq)
        raise ValueError(f"{type(model).__name__} has no rotary_emb module with inv_freq: it may not use RoPE")

    def __deepcopy__(self, memo: dict) -> RopeShift:
        return self  # stateless after construction: copies of a cache can share it

    def __call__(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """keys: (B, H, K, D) rotated at p; delta: (K,) -> the keys rotated at p + delta, (B, H, K, D)."""
        half = self.inv_freq.shape[0]
        if keys.shape[-1] != 2 * half:
            raise ValueError(f"keys have {keys.shape[-1]} dims but the rotary embedding covers {2 * half}")
        angles = delta.to(keys.device, torch.float32)[:, None] * self.inv_freq.to(keys.device)  # (K, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (K, D)
        k = keys.float()  # float32: keys may be turned many times over a long dialogue
        rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)  # rotate_half: (B, H, K, D)
        return (k * angles.cos() + rotated * angles.sin()).to(keys.dtype)


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends into spare room instead of concatenating.

    ``DynamicLayer.update`` copies the whole layer at every decode step (``torch.cat``): for a
    long chat's thousands of sinks that copy, not the small model's step, is what grows with
    the chat. Here a turn's first update copies the kept entries once into a store with
    ``spare`` more slots, and each token after is written into the next slot; ``keys`` and
    ``values`` are views of the stores' first entries. Assigning either (an eviction, a move to
    another device) lets the stores go, and the next update makes new ones, so the layer never
    has to be told. Existing entries are never written: a view taken before (an exported state,
    a snapshot) keeps reading the same values.

    Where autograd records the cache (a gradient through the keys) it concatenates like
    ``DynamicLayer``, as writing into a tensor saved for backward would break the backward.
    """

    spare = 256  # slots reserved past the entries: most turns fit in one store

    def __init__(self, **kwargs: Any) -> None:
        self._stores: tuple[torch.Tensor, torch.Tensor] | None = None
        super().__init__(**kwargs)

    @property
    def keys(self) -> torch.Tensor | None:
        return self._keys

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._keys, self._stores = value, None  # the stores no longer hold the entries

    @property
    def values(self) -> torch.Tensor | None:
        return self._values

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._values, self._stores = value, None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states``/``value_states`` (B, H, T, D) and return all keys and values (B, H, N+T, D)."""
        if not self.is_initialized:  # its own first update initialises it (the signature varies by version)
            return super().update(key_states, value_states, *args, **kwargs)
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad
                                        or self.keys.requires_grad or self.values.requires_grad):
            return super().update(key_states, value_states, *args, **kwargs)
        length, new = self.get_seq_length(), key_states.shape[-2]
        if not self._fits(key_states, value_states, length + new):
            self._adopt(key_states, value_states, length, length + new + self.spare)
        keys, values = self._stores
        keys[..., length:length + new, :] = key_states
        values[..., length:length + new, :] = value_states
        self._keys, self._values = keys[..., :length + new, :], values[..., :length + new, :]  # the stores stay
        return self._keys, self._values

    def _fits(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> bool:
        """Whether the next entries can go into the current stores."""
        if self._stores is None:
            return False
        keys, values = self._stores
        if keys.is_inference() and not torch.is_inference_mode_enabled():
            return False  # a tensor made under inference mode may only be written there
        return (keys.shape[-2] >= needed and keys.shape[:-2] == key_states.shape[:-2]
                and values.shape[:-2] == value_states.shape[:-2]
                and keys.dtype == key_states.dtype and keys.device == key_states.device)

    def _adopt(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, capacity: int) -> None:
        """New stores of ``capacity`` slots holding the layer's current ``length`` entries."""
        stores = []
        for held, incoming in ((self.keys, key_states), (self.values, value_states)):
            store = incoming.new_empty((*incoming.shape[:-2], capacity, incoming.shape[-1]))  # (B, H, C, D)
            if length:
                store[..., :length, :] = held
            stores.append(store)
        self._stores = (stores[0], stores[1])

    def __copy__(self) -> GrowingLayer:
        """A layer over the same entries that makes stores of its own at its first update.

        Sharing the stores would let two layers write each other's next slots.
        """
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin._stores = None
        return twin


POSITION_RULES = ("compressed", "slot", "distance")


@dataclass(frozen=True)
class Positions:
    """Where a compressing cache puts its kept keys and its next token (see the module docstring).

    ``slot`` and ``distance`` re-rotate keys, so they need the model's ``RopeShift``;
    ``max_distance`` caps the ``distance`` rule (None: no cap).
    """

    rule: str = "compressed"
    shift: RopeShift | None = None
    max_distance: int | None = None

    def __post_init__(self) -> None:
        if self.rule not in POSITION_RULES:
            raise ValueError(f"the position rule must be one of {', '.join(POSITION_RULES)}; got {self.rule!r}")
        if (self.shift is None) != (self.rule == "compressed"):
            raise ValueError(f"the {self.rule} rule {'needs' if self.shift is None else 'takes no'} RopeShift")
        if self.max_distance is not None and (self.rule != "distance" or not isinstance(self.max_distance, int)
                                              or isinstance(self.max_distance, bool) or self.max_distance < 2):
            raise ValueError(f"max_distance is a whole number >= 2 for the distance rule; got {self.max_distance!r}")

    @classmethod
    def for_model(cls, rule: str, model: Any, *, max_distance: int | None = None) -> Positions:
        """The rule ``rule`` with ``model``'s rotary frequencies, where it needs them."""
        return cls(rule, None if rule == "compressed" else RopeShift.from_model(model), max_distance)

    def __deepcopy__(self, memo: dict) -> Positions:
        return self  # frozen and stateless: copies of a cache can share it

    def place(self, kept: Sequence[int], rope: Sequence[int], seen: int) -> tuple[list[int], int]:
        """Where the kept entries go (their new rotation positions), and the next token's position.

        ``kept``: the entries' absolute indices in the dialogue; ``rope``: the positions they are
        rotated at now; ``seen``: the absolute index of the next token.
        """
        if self.rule == "compressed":
            return list(rope), len(rope)
        if self.rule == "slot":
            return list(range(len(rope))), len(rope)
        if self.max_distance is None:
            return list(rope), seen
        back = self.max_distance // 2
        return [r if seen - r <= self.max_distance else seen - back for r in rope], seen


@dataclass(frozen=True)
class _Entries:
    """A compressing cache's bookkeeping without its tensors: what a compress decides from."""

    tokens: tuple[int, ...]  # id of each entry
    kept: tuple[int, ...]  # absolute dialogue index of each entry
    rope: tuple[int, ...]  # position each entry is rotated at
    seen: int  # tokens fed over the whole dialogue
    offset: int  # the next token's position minus the entry count

    @classmethod
    def of(cls, cache: MemoryCache) -> _Entries:
        return cls(tuple(cache._tokens), tuple(cache._kept), tuple(cache._rope), cache._seen, cache._offset)


@dataclass(frozen=True)
class _Step:
    """One compress after feeding ``new`` on top of some entries, worked out on the bookkeeping alone."""

    keep: list[int]  # indices into (entries + new) that the policy keeps
    kept: _Entries  # the kept entries, rotated where they were computed (before the rule moves any)
    start: int  # position of the first new token
    moves: bool  # whether the position rule then moves kept keys

    @classmethod
    def after(cls, cache: MemoryCache, entries: _Entries, new: list[int]) -> _Step:
        tokens = [*entries.tokens, *new]
        cache.check_tokens(tokens)
        # New tokens go to consecutive positions from the entry count plus the offset.
        start = len(entries.rope) + entries.offset
        absolute = [*entries.kept, *range(entries.seen, entries.seen + len(new))]
        rope = [*entries.rope, *range(start, start + len(new))]
        seen = entries.seen + len(new)
        keep = cache.keep_indices(tokens)
        kept_rope = [rope[i] for i in keep]
        targets, next_position = cache.positions.place([absolute[i] for i in keep], kept_rope, seen)
        kept = _Entries(tuple(tokens[i] for i in keep), tuple(absolute[i] for i in keep), tuple(kept_rope), seen,
                        next_position - len(targets))
        return cls(keep, kept, start, targets != kept_rope)


class MemoryCache(DynamicCache):
    """A ``DynamicCache`` whose ``compress`` evicts, between turns, to what ``keep_indices`` keeps.

    Subclasses implement ``keep_indices`` and may refine ``check_tokens`` (what the cached ids
    must look like) and ``check_turn`` (what a finished turn must end with). ``positions`` says
    where compress puts the kept keys (default: where they were computed; see the module docstring).
    """

    def __init__(self, *, positions: Positions | None = None) -> None:
        # No config: full-attention DynamicLayers only, created lazily per layer; a
        # sliding-window layer would evict on its own and break the shared bookkeeping.
        super().__init__()
        # Layers made lazily, per layer index, as the model first updates them.
        self.layer_class_to_replicate = GrowingLayer
        self.positions = Positions() if positions is None else positions
        if not isinstance(self.positions, Positions):
            raise TypeError(f"positions must be a Positions; got {type(self.positions).__name__}")
        self._tokens: list[int] = []  # id of each cached entry, in cache order
        self._kept: list[int] = []  # absolute dialogue index of each cached entry
        self._rope: list[int] = []  # position each cached entry is rotated at
        self._seen = 0  # tokens fed over the whole dialogue
        self._offset = 0  # the next token's position minus the cache length

    # --- the policy -------------------------------------------------------------------------

    def keep_indices(self, token_ids: Sequence[int]) -> list[int]:
        """Sorted indices (into ``token_ids``, the whole cache) of the entries to keep."""
        raise NotImplementedError

    def check_tokens(self, token_ids: Sequence[int]) -> None:
        """Raise ValueError when the cached ids (all of them, before eviction) break the policy."""

    def check_turn(self, turn_token_ids: Sequence[int]) -> None:
        """Raise ValueError when ``turn_token_ids`` cannot close a turn (see ``close_turn``)."""

    # --- the state ----------------------------------------------------------------------------

    @property
    def cached_tokens(self) -> list[int]:
        """Token id of each cached entry (as of the last ``compress``)."""
        return list(self._tokens)

    @property
    def kept_positions(self) -> list[int]:
        """Absolute index in the whole dialogue of each cached entry (as of the last ``compress``)."""
        return list(self._kept)

    @property
    def rope_positions(self) -> list[int]:
        """The position each cached entry was rotated with (as of the last ``compress``)."""
        return list(self._rope)

    @property
    def position_offset(self) -> int:
        """How far past the cache length the next token's position lies (0: the model's default)."""
        return self._offset

    @property
    def position_span(self) -> int:
        """Positions from the farthest-back kept key to the next token (as of the last ``compress``).

        This, not the number of entries, is what a new turn must fit beside in the model's
        trained context: RoPE reads only distances, so a StreamingDialogue cache may hold more
        sinks than the context has positions while its capped distance rule keeps every one
        within ``max_distance``. A key rotated past the next token (the compressed rule puts new
        tokens before the previous turn's kept keys) stretches the span the other way.
        """
        if not self._rope:
            return 0
        next_position = len(self._rope) + self._offset
        return max(next_position, max(self._rope) + 1) - min(self._rope)

    @property
    def tokens_seen(self) -> int:
        """Tokens fed over the whole dialogue (what a dense cache would hold), as of the last ``compress``."""
        return self._seen

    def kv_bytes(self) -> int:
        """Bytes held by keys and values over all layers, for a memory meter."""
        total = 0
        for layer in self.layers:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total

    def snapshot(self) -> MemoryCache:
        """A copy sharing this cache's tensors: made at once, whatever the memory's size.

        Sharing is safe because no cached entry is ever written in place: a layer appends past
        its entries, and eviction and re-rotation make new tensors (``_select``, ``_place``).
        A deep copy of a 4,000-utterance memory took longer than the turn's first token.
        """
        twin = copy.copy(self)
        twin.layers = [copy.copy(layer) for layer in self.layers]
        twin._tokens, twin._kept, twin._rope = list(self._tokens), list(self._kept), list(self._rope)
        return twin

    # --- eviction -----------------------------------------------------------------------------

    def compress(self, new_token_ids: Sequence[int]) -> list[int]:
        """Record ``new_token_ids`` (fed since the last compress) and evict what the policy drops.

        Returns the kept absolute positions. Every layer keeps the same entries.
        """
        new = [int(t) for t in new_token_ids]
        length = self.get_seq_length()
        if len(self._tokens) + len(new) != length:
            raise ValueError(
                f"cache holds {length} entries but {len(self._tokens)} recorded + {len(new)} new ids were given"
            )
        step = _Step.after(self, _Entries.of(self), new)
        if len(step.keep) < length:
            self._select(step.keep)
        self._settle(step.kept)
        return list(self._kept)

    def feed(self, model: Any, segments: Sequence[Sequence[int]], *, max_tokens: int = 512) -> None:
        """Feed ``segments`` as if each were prefilled and then compressed, in as few forwards as stay exact.

        Replaying a stored chat is thousands of such segments (a user's turn, then a reply), and
        one forward each costs a small model more in fixed overhead than in its tokens. Consecutive
        segments share one forward of up to ``max_tokens`` tokens whose attention mask lets each
        token see exactly what the cache held when its segment would have been fed (what the
        policy's ``keep_indices`` kept at every compress before it) and its own segment's causal
        prefix, at the positions the rule would have given it. A compress that moves kept keys
        (the slot rule's every compress, the distance cap's crossings) ends a forward: a key is
        rotated at one position for every query of a forward. The cache must be compressed.
        """
        if self.get_seq_length() != len(self._tokens):
            raise ValueError("feed needs a compressed cache: call compress() first")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a whole number >= 1; got {max_tokens!r}")
        pending = [[int(t) for t in segment] for segment in segments]
        while pending:
            pending = pending[self._feed_together(model, pending, max_tokens):]

    def _feed_together(self, model: Any, segments: list[list[int]], max_tokens: int) -> int:
        """Feed the first segments that can share one forward; return how many it fed."""
        past = len(self._tokens)
        entries = _Entries.of(self)
        visible = list(range(past))  # cache index of each entry the next segment sees
        ids: list[int] = []
        positions: list[int] = []
        seen_by: list[tuple[list[int], int]] = []  # per segment: the entries it sees, its length
        count = 0
        for segment in segments:
            if ids and len(ids) + len(segment) > max_tokens:
                break
            step = _Step.after(self, entries, segment)
            seen_by.append((visible, len(segment)))
            held = visible + list(range(past + len(ids), past + len(ids) + len(segment)))  # (entries + segment)
            visible = [held[i] for i in step.keep]
            ids += segment
            positions += range(step.start, step.start + len(segment))
            entries, count = step.kept, count + 1
            if step.moves:
                break
        if ids:
            mask = torch.zeros(len(ids), past + len(ids), dtype=torch.bool)  # (T, P+T)
            row = 0
            for sees, length in seen_by:
                mask[row:row + length, torch.as_tensor(sees, dtype=torch.long)] = True
                causal = torch.ones(length, length, dtype=torch.bool).tril()  # (L, L)
                mask[row:row + length, past + row:past + row + length] = causal
                row += length
            _forward_masked(model, ids, positions, mask, self)
        if len(visible) < self.get_seq_length():
            self._select(visible)
        self._settle(entries)
        return count

    def _settle(self, entries: _Entries) -> None:
        """Take on ``entries`` (kept, not yet placed) as the cache's bookkeeping and place its keys."""
        self._tokens, self._kept, self._rope, self._seen = (list(entries.tokens), list(entries.kept),
                                                             list(entries.rope), entries.seen)
        self._place()

    def _place(self) -> None:
        """Re-rotate the kept keys to where the position rule puts them, and set the next position."""
        targets, next_position = self.positions.place(self._kept, self._rope, self._seen)
        self._offset = next_position - len(targets)
        if targets == self._rope:
            return
        delta = torch.tensor(targets) - torch.tensor(self._rope)  # (K,)
        # Only the keys that move are turned: past the distance cap that is the few sinks that
        # crossed it this turn, not the thousands a long chat holds. A zero turn is exact
        # (cos 0 = 1, sin 0 = 0), so the result is the same as turning them all.
        moved = delta.nonzero().flatten()  # (M,)
        for layer in self.layers:
            if not getattr(layer, "is_initialized", False):
                continue
            index = moved.to(layer.keys.device)
            turned = self.positions.shift(layer.keys.index_select(-2, index), delta[moved])  # (B, H, M, D)
            # A new tensor, not an in-place write: an exported state or a copy may share this one.
            layer.keys = layer.keys.index_copy(-2, index, turned)  # (B, H, K, D)
        self._rope = targets

    def _select(self, keep: Sequence[int]) -> None:
        """Keep only the entries at ``keep`` on every initialised layer."""
        for layer in self.layers:
            if not getattr(layer, "is_initialized", False):
                continue
            index = torch.as_tensor(keep, dtype=torch.long, device=layer.keys.device)  # (K,)
            layer.keys = layer.keys.index_select(-2, index)  # (B, H, T, D) -> (B, H, K, D)
            layer.values = layer.values.index_select(-2, index)  # (B, H, T, D) -> (B, H, K, D)

    # --- saving -------------------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """The compressed cache as plain tensors and lists, for ``torch.save`` (CPU copies).

        Only a compressed cache can be exported: between ``compress`` calls the entries fed
        since have no recorded ids yet.
        """
        if self.get_seq_length() != len(self._tokens):
            raise ValueError("export_state needs a compressed cache: call compress() first")
        layers = [
            (_compact(layer.keys.detach().to("cpu")), _compact(layer.values.detach().to("cpu")))
            for layer in self.layers
            if getattr(layer, "is_initialized", False)
        ]
        return {
            "policy": type(self).__name__,
            "positions": self.positions.rule,
            "tokens": list(self._tokens),
            "kept": list(self._kept),
            "rope": list(self._rope),
            "seen": self._seen,
            "layers": layers,
        }

    def load_state(self, state: dict[str, Any], device: torch.device | str) -> None:
        """Fill this empty cache from ``export_state``'s output, on ``device``."""
        if self.get_seq_length() != 0:
            raise ValueError("load_state needs an empty cache")
        policy = state.get("policy")
        if policy is not None and policy != type(self).__name__:
            # Entries kept by one policy are not a valid state of another.
            raise ValueError(f"the saved state is a {policy}, not a {type(self).__name__}")
        # Keys rotated under one rule would be read at the wrong distances under another.
        rule = state.get("positions", "unrecorded")
        if rule != self.positions.rule:
            raise ValueError(f"the saved state was kept under the {rule} position rule, not {self.positions.rule}")
        tokens, layers = [int(t) for t in state["tokens"]], state["layers"]
        if not layers or any(k.shape[-2] != len(tokens) or v.shape != k.shape for k, v in layers):
            raise ValueError("the saved layers do not match the saved token list")
        if not len(state["kept"]) == len(state["rope"]) == len(tokens):
            raise ValueError("the saved positions do not match the saved token list")
        for index, (keys, values) in enumerate(layers):
            self.update(keys.to(device), values.to(device), index)  # (B, H, K, D) each
        self._tokens = tokens
        self._kept = [int(p) for p in state["kept"]]
        self._rope = [int(p) for p in state["rope"]]
        self._seen = int(state["seen"])
        # Sets the next token's position from the rule; a cap may differ from the saved one.
        self._place()


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a copy of it when it is a view of a larger store (``torch.save`` writes whole storages)."""
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(T, K) boolean mask -> (1, 1, T, K) additive float mask.

    Float rather than boolean because eager attention adds the mask to the scores, while
    SDPA accepts either; a prepared 4D mask is passed through by transformers' mask builder.
    """
    out = torch.zeros(mask.shape, dtype=dtype)
    out.masked_fill_(~mask, torch.finfo(dtype).min)
    return out[None, None]  # (T, K) -> (1, 1, T, K)


@torch.inference_mode()
def _forward_masked(model: Any, ids: list[int], positions: list[int], mask: torch.Tensor, cache: MemoryCache) -> None:
    """Feed ``ids`` at ``positions`` into ``cache``, token i attending to the entries ``mask[i]`` (T, P+T) allows."""
    dtype = next(model.parameters()).dtype  # the embeddings': the compute dtype, also under 4-bit
    model(input_ids=torch.tensor([ids], device=model.device),  # (1, T)
          position_ids=torch.tensor([positions], device=model.device),  # (1, T)
          attention_mask=additive_mask(mask, dtype).to(model.device),  # (1, 1, T, P+T)
          past_key_values=cache, use_cache=True, logits_to_keep=1)


def close_turn(model: Any, cache: MemoryCache, turn_token_ids: Sequence[int]) -> list[int]:
    """Finish a turn: feed the tail of ``turn_token_ids`` the cache lacks, then ``compress``.

    ``turn_token_ids`` are all ids of the turn since the last compress. A decode loop leaves
    its last token unfed (a sampled stop token, or the token that hit the length limit), so
    that token, and a closing token the caller appends, may still have to go in.
    Returns the kept absolute positions.
    """
    from personalign.generation import prefill

    ids = [int(t) for t in turn_token_ids]
    cache.check_turn(ids)
    fed = cache.get_seq_length() - len(cache.cached_tokens)
    if not 0 <= fed <= len(ids):
        raise ValueError(f"the cache took {fed} tokens this turn but the turn has {len(ids)}")
    if fed < len(ids):
        prefill(model, torch.tensor([ids[fed:]], device=model.device), cache)  # (1, missing)
    return cache.compress(ids)
