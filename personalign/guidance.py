"""Persona guidance: classifier-free guidance with the persona as the condition.

Scoring a reply by log p(with persona) - log p(without persona) tells a person's preferred
answer from the rejected one far better than log p alone; guidance carries that contrast
into decoding (Sanchez et al. 2023, "Stay on topic with classifier-free guidance"). Each
step samples from

    (1 + gamma) * log_softmax(cond) - gamma * log_softmax(uncond)

where cond is the prompt with the persona and uncond the same conversation without it.

Both prompts run as the two rows of ONE batch sharing one KV cache, so a guided token costs
one batched forward, not two. The shorter prompt is left-padded; the 2D attention mask
hides the padding and grows by one column per step, and position ids are counted over each
row's real tokens only, so each row computes exactly what it would compute alone. The
chosen token is fed to both rows. Row 0 is always the persona prompt, row 1 the other.

Only public forward arguments are used (input_ids, attention_mask, position_ids,
past_key_values, use_cache, logits_to_keep): transformers 5.17 and 5.23 build the causal
mask from the cache length and the 2D mask alone, and take RoPE positions from position_ids.
This module knows nothing of prompts, personas or tokenizers: it receives token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Generator, Sequence
from typing import Any

import torch

from personalign.generation import (
    GenerationConfig,
    new_cache,
    prompt_tensor,
    token_loop,
)

COND, UNCOND = 0, 1  # batch rows
# Padding token id: any valid id serves, since the mask hides padded keys and their
# outputs are never read. 0 exists in every vocabulary.
PAD_ID = 0


def left_pad(rows: Sequence[torch.Tensor], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D prompts into one left-padded batch, so every row's last token is its newest.

    rows: B tensors of shape (T_b,) -> ids: (B, T), mask: (B, T) with 1 on real tokens,
    where T = max T_b.
    """
    width = max(int(row.shape[-1]) for row in rows)
    device = rows[0].device
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)  # (B, T)
    for b, row in enumerate(rows):
        ids[b, width - row.shape[-1]:] = row
        mask[b, width - row.shape[-1]:] = 1
    return ids, mask


def position_ids_for(mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """RoPE positions of the last ``new_tokens`` columns, counting only each row's real tokens.

    mask: (B, L) -> (B, new_tokens). Padding gets position 0; it is masked out anyway.
    """
    positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # (B, L)
    return positions[:, -new_tokens:]  # (B, new_tokens)


@torch.inference_mode()
def prefill_rows(model: Any, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
    """Run a left-padded batch of prompts, filling ``cache``; return each row's last logits.

    ids, mask: (B, T) -> logits: (B, V)
    """
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids_for(mask, ids.shape[1]),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,  # left padding puts every row's newest token in the last column
    )
    return out.logits[:, -1, :]  # (B, 1, V) -> (B, V)


@torch.inference_mode()
def decode_rows(model: Any, tokens: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
    """Feed one token per row; ``mask`` already holds the new tokens' column.

    tokens: (B, 1), mask: (B, L + 1) for a cache of length L -> logits: (B, V)
    """
    out = model(
        input_ids=tokens,
        attention_mask=mask,
        position_ids=position_ids_for(mask, 1),
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits[:, -1, :]  # (B, 1, V) -> (B, V)


def guidance_mix(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, strength: float) -> torch.Tensor:
    """(1 + strength) * log_softmax(cond) - strength * log_softmax(uncond), in float32.

    cond_logits, uncond_logits: (B, V) -> (B, V), unnormalised log-probs for ``sample``.
    """
    cond = torch.log_softmax(cond_logits.float(), dim=-1)  # (B, V)
    if strength == 0:
        return cond
    uncond = torch.log_softmax(uncond_logits.float(), dim=-1)  # (B, V)
    return (1 + strength) * cond - strength * uncond


def generate_guided_tokens(
    model: Any,
    input_ids: torch.Tensor,
    unconditioned_ids: torch.Tensor,
    config: GenerationConfig,
    *,
    stop_token_ids: Collection[int],
    should_stop: Callable[[], bool] | None = None,
) -> Generator[int, None, None]:
    """Yield persona-guided token ids with ``config.persona_strength`` as gamma.

    input_ids: the prompt with the persona, (T,) or (1, T); unconditioned_ids: the same
    conversation without it, (T',) or (1, T'). Temperature, top-p, seed, stop tokens,
    ``max_new_tokens`` and ``should_stop`` behave as in ``generate_tokens``, which calls
    this when guidance is on. Any gamma runs the batched loop here, 0 included.
    """
    cond = prompt_tensor(input_ids, model.device)[0]  # (T,)
    uncond = prompt_tensor(unconditioned_ids, model.device, name="unconditioned_ids")[0]  # (T',)
    ids, prompt_mask = left_pad([cond, uncond])  # (2, T) each, T = max(T, T')
    width = ids.shape[1]
    # One mask for the whole reply: each step passes a longer prefix of it instead of
    # concatenating a column onto a fresh tensor.
    mask = torch.ones((2, width + config.max_new_tokens), dtype=torch.long, device=ids.device)  # (2, T + N)
    mask[:, :width] = prompt_mask
    cache = new_cache(model)
    strength = float(config.persona_strength)
    columns = width  # mask columns in use: the cached tokens plus the one being fed

    def next_logits(token: torch.Tensor | None) -> torch.Tensor:
        nonlocal columns
        if token is None:
            logits = prefill_rows(model, ids, mask[:, :columns], cache)  # (2, V)
        else:
            columns += 1
            logits = decode_rows(model, token.expand(2, 1), mask[:, :columns], cache)  # (1, 1) -> (2, 1) -> (2, V)
        return guidance_mix(logits[COND:COND + 1], logits[UNCOND:UNCOND + 1], strength)  # (1, V)

    return token_loop(next_logits, config, stop_token_ids=stop_token_ids, device=model.device, should_stop=should_stop)
