"""The bookkeeping shared by KV caches that evict between turns (StreamingDialogue, StreamingLLM).

A ``MemoryCache`` is a ``DynamicCache`` that behaves exactly like one while a turn is
prefilled or decoded. Between turns, ``compress(new_token_ids)`` records the ids fed since
the last compress, asks the subclass which entries to keep (``keep_indices``) and keeps the
same entries on every layer. Eviction never happens inside a turn, so a turn longer than
whatever the policy keeps still decodes exactly as with a plain ``DynamicCache``.

Position rule (the one the StreamingDialogue reference code uses): kept keys keep the RoPE
rotation they were computed with, and new tokens get positions counted from the *compressed*
length. The cache reports the compressed length from ``get_seq_length()``, so the model's own
default position computation (``cache_position = arange(past_len, past_len + T)``) applies the
rule with no copied forward. ``rope_positions`` records the position each cached entry was
rotated with; ``kept_positions`` records its absolute index in the whole dialogue token stream.

That rule places a new turn *before* the kept keys of the previous one (they were rotated
further on, before the eviction shortened the cache), and an untrained model reads such
negative distances badly. With a ``RopeShift`` the cache instead re-rotates every kept key to
its slot in the cache when it compresses, the StreamingLLM paper's "positions within the
cache": kept entries sit at 0..K-1, new tokens follow at K, and every distance is positive and
inside the trained range however long the dialogue runs.

The module knows nothing of which entries a policy keeps, of chat templates or of storage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache


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


class MemoryCache(DynamicCache):
    """A ``DynamicCache`` whose ``compress`` evicts, between turns, to what ``keep_indices`` keeps.

    Subclasses implement ``keep_indices`` and may refine ``check_tokens`` (what the cached ids
    must look like) and ``check_turn`` (what a finished turn must end with). With ``rope_shift``
    compress also moves every kept key to its slot in the cache (see the module docstring).
    """

    def __init__(self, *, rope_shift: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        # No config: full-attention DynamicLayers only, created lazily per layer; a
        # sliding-window layer would evict on its own and break the shared bookkeeping.
        super().__init__()
        self.rope_shift = rope_shift
        self._tokens: list[int] = []  # id of each cached entry, in cache order
        self._kept: list[int] = []  # absolute dialogue index of each cached entry
        self._rope: list[int] = []  # position each cached entry was rotated with
        self._seen = 0  # tokens fed over the whole dialogue

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
        tokens = self._tokens + new
        self.check_tokens(tokens)
        # New tokens were placed by the default rule: positions continue from the cache length.
        start = len(self._rope)
        absolute = self._kept + list(range(self._seen, self._seen + len(new)))
        rope = self._rope + list(range(start, start + len(new)))
        self._seen += len(new)

        keep = self.keep_indices(tokens)
        if len(keep) < length:
            self._select(keep)
        self._tokens = [tokens[i] for i in keep]
        self._kept = [absolute[i] for i in keep]
        self._rope = [rope[i] for i in keep]
        if self.rope_shift is not None:
            self._move_to_slots()
        return list(self._kept)

    def _move_to_slots(self) -> None:
        """Re-rotate every kept key to its index in the cache; ``rope_positions`` become 0..K-1."""
        slots = list(range(len(self._rope)))
        if self._rope == slots:
            return
        delta = torch.tensor(slots) - torch.tensor(self._rope)  # (K,)
        for layer in self.layers:
            if getattr(layer, "is_initialized", False):
                layer.keys = self.rope_shift(layer.keys, delta)  # (B, H, K, D)
        self._rope = slots

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
            (layer.keys.detach().to("cpu"), layer.values.detach().to("cpu"))
            for layer in self.layers
            if getattr(layer, "is_initialized", False)
        ]
        return {
            "policy": type(self).__name__,
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
