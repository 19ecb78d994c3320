"""Token generation as a chain of small functions, in the style of gpt-fast.

``prefill`` -> ``sample`` -> (``decode_one_token`` -> ``sample``)* with an explicit
KV cache. The model's own forward is always used; the cache is any transformers
``Cache`` passed as ``past_key_values``, so a custom cache (or a registered attention
function selected through the model config) plugs in without touching this loop.
Batch size is 1 throughout: one chat reply at a time. Persona guidance, which decodes
the prompt with and without the persona side by side, lives in ``guidance``;
``generate_tokens`` hands over to it when asked.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from personalign.graph_decode import DecodeRun, graph_decoder

log = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"
_NUCLEUS_WINDOW = 64  # first top-k window searched for the top-p nucleus
# Cap on persona guidance. At strength g the guided log-probs are log p(no persona) plus
# (1 + g) times the persona's shift, so 10 already amplifies that shift elevenfold. Sanchez
# et al. report their gains at guidance 1.5-3 on their scale, which is 1 + g (g = 0.5-2),
# and text degrades as it grows: past 10 a reply is driven by noise in the shift.
MAX_PERSONA_STRENGTH = 10.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings; ``temperature == 0`` means greedy decoding.

    ``persona_strength`` (gamma) is classifier-free guidance toward the persona: each step
    samples from (1 + gamma) log p(.| with persona) - gamma log p(.| without persona).
    0 means plain decoding; it takes effect only when the prompt without the persona is
    given too (``generate_tokens(..., unconditioned_ids=...)``).
    """

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None
    persona_strength: float = 0.0

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a whole number >= 1; got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy); got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be None or a whole number >= 0; got {self.seed!r}")
        strength = self.persona_strength
        if not _is_number(strength) or not math.isfinite(strength) or not 0 <= strength <= MAX_PERSONA_STRENGTH:
            raise ValueError(
                f"persona_strength must be a finite number from 0 to {MAX_PERSONA_STRENGTH:g} (0 = off); got {strength!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def new_cache(model: Any) -> Any:
    """A fresh ``DynamicCache`` shaped by the model config (sliding-window layers etc.)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # a transformers without the config argument
        return DynamicCache()


def position_ids_after(cache: Any, length: int, device: Any) -> torch.Tensor | None:
    """Positions of the next ``length`` tokens fed to ``cache``: (1, length), or None for the default.

    The model's default continues from the cache length. A compressing cache whose position
    rule places new tokens elsewhere (``memory_cache``) reports how far off in ``position_offset``.
    """
    offset = getattr(cache, "position_offset", 0)
    if not offset:
        return None
    start = cache.get_seq_length() + offset
    return torch.arange(start, start + length, device=device)[None]  # (1, length)


@torch.inference_mode()
def prefill(model: Any, input_ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Run the whole prompt through the model, filling ``cache``; return last-position logits.

    input_ids: (B, T) -> logits: (B, V)
    """
    # logits_to_keep=1: only the last position is needed, which saves a (B, T, V) tensor.
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                position_ids=position_ids_after(cache, input_ids.shape[1], input_ids.device))
    return out.logits[:, -1, :]  # (B, 1, V) -> (B, V)


@torch.inference_mode()
def decode_one_token(model: Any, token: torch.Tensor, cache: Any) -> torch.Tensor:
    """Feed one new token per sequence, at the position the cache gives it.

    token: (B, 1) -> logits: (B, V)
    """
    out = model(input_ids=token, past_key_values=cache, use_cache=True,
                position_ids=position_ids_after(cache, 1, token.device))
    return out.logits[:, -1, :]  # (B, 1, V) -> (B, V)


@torch.inference_mode()
def sample(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token: argmax when greedy, else temperature + nucleus (top-p) sampling.

    logits: (B, V) -> token: (B, 1)
    """
    if config.greedy:
        return logits.argmax(dim=-1, keepdim=True)  # (B, V) -> (B, 1)
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)  # (B, V), float32 for stable sums
    if config.top_p >= 1:
        return torch.multinomial(probs, 1, generator=generator)  # (B, 1)
    # The nucleus is nearly always a few dozen tokens: grow a top-k window until it holds
    # top_p of the mass instead of sorting the whole vocabulary (a full sort of ~50k
    # entries per token costs more than a small model's decode step on a CPU). Exact.
    vocab = probs.shape[-1]
    k = min(_NUCLEUS_WINDOW, vocab)
    while True:
        top_probs, top_idx = probs.topk(k, dim=-1)  # (B, k) each, descending
        if k == vocab or bool((top_probs.sum(dim=-1) >= config.top_p).all()):
            break
        k = min(4 * k, vocab)
    # Drop tokens once the mass *before* them already reaches top_p; the top token always stays.
    drop = top_probs.cumsum(dim=-1) - top_probs >= config.top_p
    top_probs = top_probs.masked_fill(drop, 0.0)
    choice = torch.multinomial(top_probs, 1, generator=generator)  # (B, 1) index into the window
    return top_idx.gather(-1, choice)  # (B, 1) token ids


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A ``torch.Generator`` on ``device``: seeded for reproducibility, else randomly seeded."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def prompt_tensor(input_ids: Any, device: torch.device, *, name: str = "input_ids") -> torch.Tensor:
    """One prompt as a (1, T) tensor on ``device``; raise ValueError for anything else.

    input_ids: (T,) or (1, T) -> (1, T)
    """
    ids = torch.as_tensor(input_ids, device=device)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)  # (T,) -> (1, T)
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"{name} must be one non-empty sequence, shape (1, T); got {tuple(ids.shape)}")
    return ids


def generate_tokens(
    model: Any,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    *,
    stop_token_ids: Collection[int],
    cache: Any = None,
    should_stop: Callable[[], bool] | None = None,
    unconditioned_ids: torch.Tensor | None = None,
    graphs: bool = True,
) -> Generator[int, None, None]:
    """Yield new token ids one by one for a single prompt.

    Ends at a stop token (not yielded), after ``config.max_new_tokens`` tokens, or when
    ``should_stop()`` is true; it is checked before every model step, so a stop request
    costs at most the step already running.
    input_ids: (T,) or (1, T).
    unconditioned_ids: the same conversation's prompt without the persona, (T',) or (1, T');
    with ``config.persona_strength > 0`` decoding is persona-guided (see ``guidance``),
    otherwise it is ignored.
    On CUDA the decode steps are replayed from a captured graph (``graph_decode``) unless
    ``graphs`` is false; ``cache`` ends the same either way once the iterator is exhausted or
    closed, so a caller that goes on with it (a streaming memory) closes the iterator first.
    """
    if unconditioned_ids is not None and config.persona_strength > 0:
        if cache is not None:
            # Guided decoding runs both prompts as two rows of one batch, so it needs a
            # batch-2 cache whose padding it controls; a caller's cache (batch 1, or a
            # policy such as StreamingDialogue eviction that knows nothing of the padded
            # row) would be silently wrong, so refuse it instead.
            raise ValueError("persona guidance keeps its own batched KV cache; do not pass `cache` with it")
        # Imported here, not at the top: guidance imports this module.
        from personalign.guidance import generate_guided_tokens

        return generate_guided_tokens(
            model, input_ids, unconditioned_ids, config, stop_token_ids=stop_token_ids, should_stop=should_stop
        )
    input_ids = prompt_tensor(input_ids, model.device)
    cache = new_cache(model) if cache is None else cache
    steps: DecodeSteps | None = None

    def next_logits(token: torch.Tensor | None) -> torch.Tensor:
        nonlocal steps
        if token is None:
            logits = prefill(model, input_ids, cache)
            steps = DecodeSteps(model, cache, config.max_new_tokens, graphs=graphs)
            return logits
        return steps(token)

    def finish() -> None:
        if steps is not None:
            steps.finish()

    # Checks above run at call time; the loop below runs lazily as tokens are asked for.
    loop = token_loop(next_logits, config, stop_token_ids=stop_token_ids, device=model.device, should_stop=should_stop)
    return _then(loop, finish)


def _then(tokens: Iterator[int], finish: Callable[[], None]) -> Generator[int, None, None]:
    """``tokens``, then ``finish()`` once they end, fail or are closed."""
    try:
        yield from tokens
    finally:
        finish()


class DecodeSteps:
    """Feeds each chosen token into a prefilled ``cache``, with room for ``max_new_tokens``.

    On CUDA the steps are replayed from a captured graph (``graph_decode``), where it can stand
    in for step-by-step decoding and unless ``graphs`` is false; a capture that fails falls back to
    step by step for good. ``finish()`` leaves ``cache`` as step-by-step decoding would have.
    """

    def __init__(self, model: Any, cache: Any, max_new_tokens: int, *, graphs: bool = True) -> None:
        self.model, self.cache = model, cache
        self._decoder = graph_decoder(model) if graphs else None
        self._run: DecodeRun | None = None
        if self._decoder is not None:
            self._run = self._decoder.begin(cache, max_new_tokens)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """token: (1, 1) -> next-token logits: (1, V)."""
        if self._run is not None:
            try:
                return self._run.step(token)
            except Exception:  # a model whose step cannot be captured decodes as it always did
                log.warning("CUDA graph decoding failed; decoding step by step from here", exc_info=True)
                self._decoder.broken = True
                self.finish()
                self._run = None
        return decode_one_token(self.model, token, self.cache)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()


def token_loop(
    next_logits: Callable[[torch.Tensor | None], torch.Tensor],
    config: GenerationConfig,
    *,
    stop_token_ids: Collection[int],
    device: torch.device,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[int, None, None]:
    """The sampling loop shared by plain and guided decoding, lazily yielding token ids.

    ``next_logits(None)`` runs the prefill; ``next_logits(token)`` feeds the token just
    chosen, (1, 1), and both return the next-token logits, (1, V). Stop rules and the
    seeded generator live here so every decoding path ends and samples the same way.
    """
    generator = None if config.greedy else make_generator(device, config.seed)
    stop = frozenset(int(i) for i in stop_token_ids)
    return _token_loop(next_logits, config, stop, generator, should_stop)


def _token_loop(
    next_logits: Callable[[torch.Tensor | None], torch.Tensor],
    config: GenerationConfig,
    stop: frozenset[int],
    generator: torch.Generator | None,
    should_stop: Callable[[], bool] | None,
) -> Generator[int, None, None]:
    token = None
    for _ in range(config.max_new_tokens):
        if should_stop is not None and should_stop():
            return
        logits = next_logits(token)  # (1, V)
        token = sample(logits, config, generator)  # (1, 1)
        token_id = int(token.item())
        if token_id in stop:
            return
        yield token_id


class TextAccumulator:
    """Turn a token stream into cumulative text without splitting multi-byte characters.

    Every call decodes all ids so far (so merges across tokens, e.g. SentencePiece
    spaces, come out right) and reports the text only when it changed and does not end
    in U+FFFD, the sign of a character whose bytes have not all arrived yet.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.text = ""

    def add(self, token_id: int) -> str | None:
        """Add one token; return the new cumulative text, or None if nothing new to show."""
        self.token_ids.append(int(token_id))
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text == self.text or text.endswith(REPLACEMENT_CHAR):
            return None
        self.text = text
        return text


def detokenize(tokenizer: Any, token_ids: Iterable[int]) -> Iterator[str]:
    """Yield the cumulative text of ``token_ids`` as it grows (see ``TextAccumulator``)."""
    acc = TextAccumulator(tokenizer)
    for token_id in token_ids:
        text = acc.add(token_id)
        if text is not None:
            yield text
