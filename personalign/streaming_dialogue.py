"""StreamingDialogue (Li et al., 2024): dialogue memory kept in conversational attention sinks.

Every utterance ends with an End-of-Utterance token (EoU; ``<|im_end|>`` for ChatML models).
The EoU tokens gather their utterance's information, so between turns the KV cache can drop
everything except BOS, the EoU of every earlier utterance and the whole latest utterance:
it then grows by one entry per utterance per layer instead of by the utterance's length.

This module holds the two pieces of the method that inference needs:

- ``streaming_dialogue_mask``: the attention pattern for prefilling a multi-utterance history
  (a token of utterance i sees BOS, the EoUs of earlier utterances, all of utterance i-1 and
  its own causal prefix). Pure; ``prefill_dialogue`` feeds it to the model as a 4D mask.
- ``StreamingDialogueCache``: a ``DynamicCache`` that behaves exactly like one while a turn is
  prefilled or decoded, and whose ``compress`` evicts between turns, identically on every layer.

Position rule (the one the reference code uses): kept keys keep the RoPE rotation they were
computed with, and new tokens get positions counted from the *compressed* length. The cache
reports the compressed length from ``get_seq_length()``, so the model's own default position
computation (``cache_position = arange(past_len, past_len + T)``) applies the rule with no
copied forward, and positions stay within the trained context however long the dialogue runs.
``rope_positions`` records the position each cached entry was rotated with; ``kept_positions``
records its absolute index in the whole dialogue token stream.

The module knows nothing about chat templates, tokenizers, storage or the UI; it is given
token ids and the EoU / BOS ids. It does not train the sinks (SMR/LMR training lives elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache


def utterance_index(token_ids: Sequence[int], eou_id: int) -> list[int]:
    """The utterance each token belongs to; an EoU belongs to the utterance it ends.

    Tokens after the last EoU form an open utterance (the one being written).
    """
    index, current = [], 0
    for token in token_ids:
        index.append(current)
        if int(token) == eou_id:
            current += 1
    return index


def streaming_dialogue_mask(token_ids: Sequence[int], eou_id: int, bos_id: int) -> torch.Tensor:
    """Boolean (T, T) mask, True where query row i may attend to key column j.

    A token of utterance u sees: BOS (position 0, when it is ``bos_id``), the EoU of every
    earlier utterance, all of utterance u-1 and its own causal prefix within utterance u.
    """
    ids = torch.as_tensor([int(t) for t in token_ids], dtype=torch.long)  # (T,)
    utt = torch.as_tensor(utterance_index(ids.tolist(), eou_id), dtype=torch.long)  # (T,)
    t = ids.shape[0]
    causal = torch.ones(t, t, dtype=torch.bool).tril()  # (T, T)
    q_utt, k_utt = utt[:, None], utt[None, :]  # (T, 1), (1, T)
    same_or_previous = (k_utt == q_utt) | (k_utt == q_utt - 1)  # (T, T)
    earlier_eou = (ids == eou_id)[None, :] & (k_utt < q_utt)  # (1, T) & (T, T) -> (T, T)
    bos = torch.zeros(t, dtype=torch.bool)
    if t > 0 and int(ids[0]) == bos_id:
        bos[0] = True
    return causal & (same_or_previous | earlier_eou | bos[None, :])  # (T, T)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(T, T) boolean mask -> (1, 1, T, T) additive float mask.

    Float rather than boolean because eager attention adds the mask to the scores, while
    SDPA accepts either; a prepared 4D mask is passed through by transformers' mask builder.
    """
    out = torch.zeros(mask.shape, dtype=dtype)
    out.masked_fill_(~mask, torch.finfo(dtype).min)
    return out[None, None]  # (T, T) -> (1, 1, T, T)


def kept_indices(token_ids: Sequence[int], eou_id: int) -> list[int]:
    """Indices to keep when compressing: 0 (BOS), every earlier EoU, the latest utterance.

    The latest utterance is the last one closed by an EoU; tokens after it (an open
    utterance already started) are kept too, since the next token must still see them.
    """
    ids = [int(t) for t in token_ids]
    eous = [i for i, tok in enumerate(ids) if tok == eou_id]
    if not eous:  # nothing closed yet: nothing can be evicted
        return list(range(len(ids)))
    latest_start = eous[-2] + 1 if len(eous) >= 2 else 0
    keep = {0, *eous, *range(latest_start, len(ids))}
    return sorted(i for i in keep if i < len(ids))


class StreamingDialogueCache(DynamicCache):
    """A ``DynamicCache`` that can evict to StreamingDialogue's sinks between turns.

    Feed turns as usual (``past_key_values=cache``); then call ``compress(new_token_ids)``
    with the ids of every token fed since the last compress, in order. The fed tokens must
    include the utterance's EoU: a sampled stop token is not fed by a plain decode loop.
    """

    def __init__(self, eou_id: int, bos_id: int | None = None) -> None:
        # No config: full-attention DynamicLayers only, created lazily per layer; a
        # sliding-window layer would evict on its own and break the shared bookkeeping.
        super().__init__()
        self.eou_id = int(eou_id)
        self.bos_id = None if bos_id is None else int(bos_id)
        self._tokens: list[int] = []  # id of each cached entry, in cache order
        self._kept: list[int] = []  # absolute dialogue index of each cached entry
        self._rope: list[int] = []  # position each cached entry was rotated with
        self._seen = 0  # tokens fed over the whole dialogue

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
        return {"tokens": list(self._tokens), "kept": list(self._kept), "rope": list(self._rope),
                "seen": self._seen, "layers": layers}

    def load_state(self, state: dict[str, Any], device: torch.device | str) -> None:
        """Fill this empty cache from ``export_state``'s output, on ``device``."""
        if self.get_seq_length() != 0:
            raise ValueError("load_state needs an empty cache")
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

    def kv_bytes(self) -> int:
        """Bytes held by keys and values over all layers, for a memory meter."""
        total = 0
        for layer in self.layers:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total

    def compress(self, new_token_ids: Sequence[int]) -> list[int]:
        """Record ``new_token_ids`` (fed since the last compress) and evict down to the sinks.

        Returns the kept absolute positions. Every layer keeps the same entries.
        """
        new = [int(t) for t in new_token_ids]
        length = self.get_seq_length()
        if len(self._tokens) + len(new) != length:
            raise ValueError(
                f"cache holds {length} entries but {len(self._tokens)} recorded + {len(new)} new ids were given"
            )
        tokens = self._tokens + new
        if self.bos_id is not None and tokens and tokens[0] != self.bos_id:
            raise ValueError(f"the first cached token is {tokens[0]}, not BOS {self.bos_id}")
        # New tokens were placed by the default rule: positions continue from the cache length.
        start = len(self._rope)
        absolute = self._kept + list(range(self._seen, self._seen + len(new)))
        rope = self._rope + list(range(start, start + len(new)))
        self._seen += len(new)

        keep = kept_indices(tokens, self.eou_id)
        if len(keep) < length:
            for layer in self.layers:
                if not getattr(layer, "is_initialized", False):
                    continue
                index = torch.as_tensor(keep, dtype=torch.long, device=layer.keys.device)  # (K,)
                layer.keys = layer.keys.index_select(-2, index)  # (B, H, T, D) -> (B, H, K, D)
                layer.values = layer.values.index_select(-2, index)  # (B, H, T, D) -> (B, H, K, D)
        self._tokens = [tokens[i] for i in keep]
        self._kept = [absolute[i] for i in keep]
        self._rope = [rope[i] for i in keep]
        return list(self._kept)


def close_turn(model: Any, cache: StreamingDialogueCache, turn_token_ids: Sequence[int]) -> list[int]:
    """Finish a turn: feed the tail of ``turn_token_ids`` the cache lacks, then ``compress``.

    ``turn_token_ids`` are all ids of the turn since the last compress, ending with its EoU.
    A decode loop leaves its last token unfed (a sampled stop token, or the token that hit
    the length limit), so the EoU, and maybe one more token, still have to go in.
    Returns the kept absolute positions.
    """
    from personalign.generation import prefill

    ids = [int(t) for t in turn_token_ids]
    if not ids or ids[-1] != cache.eou_id:
        raise ValueError("a turn must end with the EoU token, the sink that carries it forward")
    fed = cache.get_seq_length() - len(cache.cached_tokens)
    if not 0 <= fed <= len(ids):
        raise ValueError(f"the cache took {fed} tokens this turn but the turn has {len(ids)}")
    if fed < len(ids):
        prefill(model, torch.tensor([ids[fed:]], device=model.device), cache)  # (1, missing)
    return cache.compress(ids)


@torch.inference_mode()
def prefill_dialogue(model: Any, input_ids: torch.Tensor, cache: StreamingDialogueCache) -> torch.Tensor:
    """Prefill a multi-utterance history into an empty ``cache`` under the StreamingDialogue mask.

    input_ids: (1, T) -> logits at the last position: (1, V)
    """
    if cache.get_seq_length() != 0:
        raise ValueError("prefill_dialogue expects an empty cache; later turns use the plain causal path")
    mask = streaming_dialogue_mask(
        input_ids[0].tolist(), cache.eou_id, cache.bos_id if cache.bos_id is not None else -1
    )
    dtype = next(model.parameters()).dtype
    attention_mask = additive_mask(mask, dtype).to(input_ids.device)  # (1, 1, T, T)
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True, logits_to_keep=1
    )
    return out.logits[:, -1, :]  # (1, 1, V) -> (1, V)
