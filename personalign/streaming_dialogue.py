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

Where kept keys sit relative to new tokens is the cache's ``Positions`` rule (``memory_cache``).
Under ``distance``, below its cap, turn-by-turn compression computes exactly what one forward of
the whole dialogue under ``streaming_dialogue_mask`` computes: the setting the sinks are trained in.

The module knows nothing about chat templates, tokenizers, storage or the UI; it is given
token ids and the EoU / BOS ids. It does not train the sinks (SMR/LMR training lives elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from personalign.memory_cache import (  # noqa: F401  (additive_mask and close_turn are shared)
    MemoryCache,
    Positions,
    additive_mask,
    close_turn,
)


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


class StreamingDialogueCache(MemoryCache):
    """A ``DynamicCache`` that can evict to StreamingDialogue's sinks between turns.

    Feed turns as usual (``past_key_values=cache``); then call ``compress(new_token_ids)``
    with the ids of every token fed since the last compress, in order. The fed tokens must
    include the utterance's EoU: a sampled stop token is not fed by a plain decode loop.
    The bookkeeping (``compress``, positions, ``kv_bytes``, saving) is ``MemoryCache``'s.
    """

    def __init__(
        self,
        eou_id: int,
        bos_id: int | None = None,
        *,
        positions: Positions | None = None,
    ) -> None:
        super().__init__(positions=positions)
        self.eou_id = int(eou_id)
        self.bos_id = None if bos_id is None else int(bos_id)

    def keep_indices(self, token_ids: Sequence[int]) -> list[int]:
        """BOS, every earlier EoU and the latest utterance (see ``kept_indices``)."""
        return kept_indices(token_ids, self.eou_id)

    def check_tokens(self, token_ids: Sequence[int]) -> None:
        """The first cached token must be BOS, the first sink, when a BOS id was given."""
        if self.bos_id is not None and token_ids and token_ids[0] != self.bos_id:
            raise ValueError(f"the first cached token is {token_ids[0]}, not BOS {self.bos_id}")

    def check_turn(self, turn_token_ids: Sequence[int]) -> None:
        """A turn must end with the EoU: it is the sink that carries the turn forward."""
        if not turn_token_ids or turn_token_ids[-1] != self.eou_id:
            raise ValueError("a turn must end with the EoU token, the sink that carries it forward")


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
