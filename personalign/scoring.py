"""Scoring a response by its summed token log-probability under a chat model.

``log p(response | messages)``: the prompt is the model's chat template rendered with the
assistant opener (as the app generates), the response is its tokens plus the end-of-turn
token, since the AlignX evaluation appends EOS and a reply that the model would end there
should be credited for ending. Several responses to one prompt are scored in one padded
forward pass.

This module knows a loaded model and its tokenizer; it knows nothing of personas,
prompt layouts, benchmark records or accuracy.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from personalign.engine import Engine
from personalign.models import LoadedModel

logger = logging.getLogger(__name__)

Message = dict[str, Any]


def _engine(target: Engine | LoadedModel) -> Engine:
    # An Engine is a thin wrapper; building one reuses its template rendering and context limit.
    return target if isinstance(target, Engine) else Engine(target)


def _fit_context(prompt: list[int], response: list[int], limit: int) -> tuple[list[int], int]:
    """prompt+response cut from the left to ``limit`` tokens, and how many trailing tokens to score.

    Dropping the start of the prompt keeps the response and the text nearest to it, which is
    what conditions it most. At least one token must precede the first scored one.
    """
    ids = prompt + response
    if len(ids) <= limit:
        return ids, len(response)
    logger.debug("prompt+response is %d tokens, over the model's %d; dropping the oldest", len(ids), limit)
    ids = ids[-limit:]
    return ids, min(len(response), len(ids) - 1)


def _supports_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class ScoringBatch:
    """Several responses to one prompt as one right-padded batch, and where each one's scored tokens lie."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    lengths: tuple[int, ...]  # real tokens per row
    scored: tuple[int, ...]  # trailing tokens scored per row (the response and its end-of-turn)


def scoring_batch(target: Engine | LoadedModel, messages: list[Message], responses: Sequence[str]) -> ScoringBatch:
    """Tokenize ``responses`` after the rendered ``messages`` into one batch (see ``summed_logprobs``)."""
    if not responses:
        raise ValueError("no responses to score")
    engine = _engine(target)
    loaded = engine.loaded
    tokenizer = loaded.tokenizer
    prompt = engine.encode(messages)  # template text already holds its special tokens
    limit = engine.max_context()
    rows: list[list[int]] = []
    scored: list[int] = []
    for response in responses:
        response_ids = [*tokenizer(response, add_special_tokens=False)["input_ids"], loaded.eou_token_id]
        ids, n = _fit_context(prompt, response_ids, limit)
        rows.append(ids)
        scored.append(n)
    if len(prompt) + 1 > limit:
        # Once per prompt rather than per response: the cut itself is logged at debug level.
        logger.warning("prompt of %d tokens exceeds the model's context of %d; cut from the left", len(prompt), limit)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else loaded.eou_token_id
    # Right padding keeps every real token at the position it has unbatched, so the numbers
    # match single-sequence scoring; the attention mask hides the pads from nothing before them.
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for b, ids in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[b, : len(ids)] = 1
    return ScoringBatch(input_ids, attention, tuple(len(r) for r in rows), tuple(scored))


def summed_logprobs(model: Any, batch: ScoringBatch, device: torch.device) -> torch.Tensor:
    """Summed log p of each row's scored tokens, shape (B,), float32.

    Differentiable when called with gradients on (preference training); ``response_logprobs``
    calls it under inference mode.
    """
    lengths, scored = batch.lengths, batch.scored
    width = batch.input_ids.shape[1]
    # Token t is predicted by the logits at t-1, so row b needs logits from
    # lengths[b]-scored[b]-1 on; only that tail goes through the LM head.
    first = min(length - n - 1 for length, n in zip(lengths, scored))
    keep = width - first
    kwargs: dict[str, Any] = {"logits_to_keep": keep} if _supports_logits_to_keep(model) else {}
    out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                use_cache=False, **kwargs)
    logits = out.logits[:, -keep:, :]  # (B, keep, V): positions first .. T-1
    totals = []
    for b, (length, n) in enumerate(zip(lengths, scored)):
        start = length - n - 1 - first  # index in the kept tail of the logits predicting the first scored token
        row_logits = logits[b, start : start + n, :].float()  # (n, V)
        targets = batch.input_ids[b, length - n : length].to(row_logits.device)  # (n,)
        token_logprobs = torch.log_softmax(row_logits, dim=-1).gather(1, targets[:, None])  # (n, 1)
        totals.append(token_logprobs.sum())
    return torch.stack(totals)  # (B,)


def response_logprobs(target: Engine | LoadedModel, messages: list[Message], responses: Sequence[str]) -> list[float]:
    """Summed log p(response tokens + end-of-turn | rendered prompt), for each response, in one forward."""
    if not responses:
        return []
    engine = _engine(target)
    batch = scoring_batch(engine, messages, responses)
    loaded = engine.loaded
    with torch.inference_mode():
        return summed_logprobs(loaded.model, batch, loaded.device).tolist()


def response_logprob(target: Engine | LoadedModel, messages: list[Message], response: str) -> float:
    """Summed log p(response tokens + end-of-turn | rendered prompt)."""
    return response_logprobs(target, messages, [response])[0]
