"""Inferring a direction over the preference space from what a person did: PBA's bridge.

AlignX labels each history item with a direction over the 90 dimensions, averages the
item directions and thresholds the mean. This module does the labelling itself, two ways
behind one interface:

- ``EmbeddingInferrer``: cheap. An item's embedding (for a pair, chosen minus rejected) is
  compared with each dimension's two pole labels; CPU-fast, weak on subtle preferences.
- ``ModelInferrer``: the loaded chat model answers, for each dimension, "A (positive pole)
  or B (negative pole)?" about the item, read off the next-token logits and calibrated
  against a content-free item; slower, cached per item.

Both return a ``ProfileInference`` (mean per dimension, thresholded direction, the items
that pushed each dimension most), and ``propose_changes`` turns one into slider changes.
This module knows behaviour items, the preference space and the models' public APIs; it
knows nothing of storage, services or the UI.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from personalign.embeddings import Embedder, pole_axes, pole_vectors
from personalign.persona import Persona
from personalign.preference_space import DIMENSIONS, NEUTRAL, SIZE, Dimension
from personalign.profile import NEGATIVE_AT, POSITIVE_AT, check_direction, threshold

if TYPE_CHECKING:
    from personalign.engine import Engine
    from storage import PreferenceEventPublic

logger = logging.getLogger(__name__)

SOURCES = ("ugc", "pair", "thumb", "pick")
Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` with the number of items labelled so far."""

SUPPORT_PER_DIMENSION = 3


# --- behaviour items ----------------------------------------------------------------------


@dataclass(frozen=True)
class BehaviourItem:
    """One thing the person did, as text.

    ``source`` is "ugc" (they wrote ``chosen`` under the post ``prompt``), "pair" (a
    persona's pairwise choice), "thumb" (a rating in chat: thumbs-up keeps the answer as
    ``chosen``, thumbs-down as ``rejected``) or "pick" (the better of two answers in chat).
    ``key`` hashes the whole content, so equal behaviour has equal keys across runs.
    """

    source: str
    prompt: str
    chosen: str | None = None
    rejected: str | None = None
    key: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {self.source!r}")
        if not isinstance(self.prompt, str):
            raise TypeError("prompt must be text")
        for name in ("chosen", "rejected"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be text or None")
            if value is not None and not value.strip():
                object.__setattr__(self, name, None)  # an empty side is no side
        if self.chosen is None and self.rejected is None:
            raise ValueError("a behaviour item needs a chosen or a rejected text")
        if self.source in ("pair", "pick") and (self.chosen is None or self.rejected is None):
            raise ValueError(f"a {self.source} item needs both a chosen and a rejected text")
        if self.source == "ugc" and self.chosen is None:
            raise ValueError("a ugc item needs the comment (chosen)")
        content = json.dumps([self.source, self.prompt, self.chosen, self.rejected], ensure_ascii=False)
        object.__setattr__(self, "key", hashlib.sha256(content.encode("utf-8")).hexdigest()[:20])

    @property
    def shape(self) -> str:
        """How the item reads: "ugc", "pair" (pair or pick), "up" or "down" (a single rated answer)."""
        if self.source == "ugc":
            return "ugc"
        if self.chosen is not None and self.rejected is not None:
            return "pair"
        return "up" if self.chosen is not None else "down"

    def summary(self, width: int = 60) -> str:
        """A one-line quote for display, e.g. 'chose "Paris." over "Well, that is a…"'."""
        chosen, rejected = _clip(self.chosen or "", width), _clip(self.rejected or "", width)
        return {
            "ugc": f'wrote "{chosen}"',
            "pair": f'chose "{chosen}" over "{rejected}"',
            "up": f'liked "{chosen}"',
            "down": f'disliked "{rejected}"',
        }[self.shape]


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(width - 1, 1)].rstrip() + "…"


def items_from_persona(persona: Persona) -> list[BehaviourItem]:
    """The persona's own behaviour: its UGC items, then its pairwise items."""
    items = [BehaviourItem("ugc", u.post, chosen=u.comment) for u in persona.ugc]
    items += [BehaviourItem("pair", p.post, chosen=p.chosen, rejected=p.rejected) for p in persona.pairwise]
    return items


def items_from_events(events: Iterable[PreferenceEventPublic]) -> list[BehaviourItem]:
    """Chat ratings and picks as behaviour items, in the order given."""
    return [BehaviourItem(e.kind, e.prompt, chosen=e.chosen, rejected=e.rejected) for e in events]


def unique_items(items: Iterable[BehaviourItem]) -> list[BehaviourItem]:
    """The items without repeats (same key), first occurrence kept: rating twice is one opinion."""
    seen: dict[str, BehaviourItem] = {}
    for item in items:
        seen.setdefault(item.key, item)
    return list(seen.values())


# --- the result ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Support:
    """One item's push on one dimension: its share of (mean value - 0.5), signed."""

    item: BehaviourItem
    contribution: float


@dataclass(frozen=True)
class ProfileInference:
    """What the behaviour says, per dimension: the mean item value, its thresholded pole, and why."""

    method: str
    items: tuple[BehaviourItem, ...]
    item_values: tuple[tuple[float, ...], ...]  # one direction per item
    values: tuple[float, ...]  # mean over items, continuous in [0, 1]
    direction: tuple[float, ...]  # values thresholded as AlignX does (0, 0.5 or 1)
    support: tuple[tuple[Support, ...], ...]  # per dimension, strongest first

    def __post_init__(self) -> None:
        if len(self.items) != len(self.item_values) or not self.items:
            raise ValueError("an inference needs one direction per item, and at least one item")
        if len(self.support) != SIZE:
            raise ValueError(f"support must list {SIZE} dimensions")
        check_direction(self.values)
        check_direction(self.direction)

    @property
    def item_count(self) -> int:
        return len(self.items)


def aggregate(method: str, items: Sequence[BehaviourItem], item_values: Sequence[Sequence[float]]) -> ProfileInference:
    """Average the item directions (AlignX step 1), threshold them, and rank each dimension's support."""
    rows = np.array([check_direction(v) for v in item_values], dtype=np.float64)  # (N, 90)
    if rows.shape[0] != len(items) or not len(items):
        raise ValueError("aggregate needs one direction per item, and at least one item")
    n = rows.shape[0]
    values = tuple(float(v) for v in rows.mean(axis=0))
    contributions = (rows - NEUTRAL) / n  # (N, 90): sums over items to values - 0.5
    support = []
    for k in range(SIZE):
        sign = math.copysign(1.0, values[k] - NEUTRAL) if values[k] != NEUTRAL else 0.0
        # Items pushing the way the mean went; with no net push, the strongest either way.
        order = [i for i in np.argsort(-np.abs(contributions[:, k]), kind="stable")
                 if contributions[i, k] != 0 and (sign == 0 or contributions[i, k] * sign > 0)]
        support.append(tuple(Support(items[i], float(contributions[i, k])) for i in order[:SUPPORT_PER_DIMENSION]))
    return ProfileInference(
        method=method,
        items=tuple(items),
        item_values=tuple(tuple(float(v) for v in row) for row in rows),
        values=values,
        direction=threshold(values),
        support=tuple(support),
    )


class ProfileInferrer(ABC):
    """Labels behaviour items with directions; ``infer`` aggregates them the AlignX way."""

    method: str

    def infer(self, items: Sequence[BehaviourItem], progress: Progress | None = None) -> ProfileInference:
        """The inference over ``items`` (at least one); ``progress(done, total)`` is called as items finish."""
        items = list(items)
        if not items:
            raise ValueError("there is no behaviour to infer a profile from")
        return aggregate(self.method, items, self.label(items, progress))

    @abstractmethod
    def label(self, items: Sequence[BehaviourItem], progress: Progress | None = None) -> list[tuple[float, ...]]:
        """One direction (90 values in [0, 1]) per item."""


# --- embedding inferrer -------------------------------------------------------------------

@dataclass(frozen=True)
class EmbeddingInferrerConfig:
    """``scale``: the similarity margin at which an item's value reaches 0.5 + 0.5 * tanh(1) ~ 0.88.

    An item's score on dimension k is s = cos(d, p_k - n_k), where d is the item's vector
    and p_k, n_k its pole embeddings; this is sim(d, p_k) - sim(d, n_k) divided by the
    poles' distance, so that dimensions whose labels differ by one word ("Likes X" /
    "Dislikes X") are not muted. The value is 0.5 + 0.5 * tanh(s / scale). On the P-Soups
    pairs, |s| has median 0.055 and 95th percentile 0.16; scale 0.8 puts the AlignX
    threshold (0.6, i.e. |s| >= 0.16) at that 95th percentile, so one item moves about
    5 of 90 dimensions past it, and a mean over items only where the items agree.

    ``cache_size``: text embeddings remembered, so inferring again after a few new ratings
    embeds only the new texts.
    """

    scale: float = 0.8
    cache_size: int = 4096

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, (int, float)) and self.scale > 0):
            raise ValueError(f"scale must be a positive number; got {self.scale!r}")
        if not isinstance(self.cache_size, int) or self.cache_size < 0:
            raise ValueError(f"cache_size must be a whole number >= 0; got {self.cache_size!r}")


class EmbeddingInferrer(ProfileInferrer):
    """Scores items by embedding similarity to the pole labels (all-MiniLM-L6-v2).

    An item's vector is its chosen text's embedding minus its rejected text's (either may
    be missing). A pair cancels what both answers share (topic, register), so it isolates
    the preference; a single text (a comment, one rated answer) also carries its topic and
    tone, so a warm comment about pets lifts most "Likes ..." dimensions a little and
    "Likes pets" most. It reads length and style only as far as the embedding does.
    """

    method = "embedding"

    def __init__(self, embedder: Embedder, config: EmbeddingInferrerConfig | None = None) -> None:
        self.embedder = embedder
        self.config = config or EmbeddingInferrerConfig()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()  # text digest -> (384,)
        self._cache_lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Each distinct text's embedding, encoding only those not remembered from earlier calls."""
        digests = {t: hashlib.sha256(t.encode("utf-8")).hexdigest() for t in dict.fromkeys(texts)}
        with self._cache_lock:
            found = {t: self._cache[d] for t, d in digests.items() if d in self._cache}
        missing = [t for t in digests if t not in found]
        encoded = self.embedder.encode(missing)  # (M, 384)
        found.update(zip(missing, encoded))
        with self._cache_lock:
            for t, digest in digests.items():
                self._cache[digest] = found[t]
                self._cache.move_to_end(digest)
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)
        return found

    def scores(self, items: Sequence[BehaviourItem]) -> np.ndarray:
        """Raw similarity margins s, shape (N, 90); 0 for an item whose two sides embed alike."""
        embedded = self.embed([t for item in items for t in (item.chosen, item.rejected) if t is not None])
        poles = pole_vectors(self.embedder)  # (90, 2, 384)
        vectors = np.zeros((len(items), poles.shape[-1]), dtype=np.float32)  # (N, 384)
        for n, item in enumerate(items):
            # The person's side counts positively; what they turned down counts negatively.
            if item.chosen is not None:
                vectors[n] += embedded[item.chosen]
            if item.rejected is not None:
                vectors[n] -= embedded[item.rejected]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # (N, 1)
        unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 1e-6)
        return unit @ pole_axes(self.embedder).T  # (N, 384) @ (384, 90) -> (N, 90)

    def label(self, items: Sequence[BehaviourItem], progress: Progress | None = None) -> list[tuple[float, ...]]:
        if progress is not None:
            progress(0, len(items))
        values = NEUTRAL + NEUTRAL * np.tanh(self.scores(items) / self.config.scale)  # (N, 90) in (0, 1)
        if progress is not None:
            progress(len(items), len(items))
        return [tuple(float(v) for v in row) for row in values]


# --- model inferrer -----------------------------------------------------------------------

_MARKER = "\u0000PERSONALIGN_CHOICES\u0000"
_NULL_TEXT = "N/A"
_QUESTION = "Which describes this person better? Answer with one letter."


def _describe(item: BehaviourItem, width: int) -> str:
    """The item as the model reads it, each text cut to ``width`` characters."""
    prompt, chosen, rejected = (_clip(t or "", width) for t in (item.prompt, item.chosen, item.rejected))
    return {
        "ugc": f'This person commented on a post.\nPost: "{prompt}"\nTheir comment: "{chosen}"',
        "pair": f'This person was shown two answers to: "{prompt}"\nThey preferred: "{chosen}"\nover: "{rejected}"',
        "up": f'This person liked this answer to "{prompt}":\n"{chosen}"',
        "down": f'This person disliked this answer to "{prompt}":\n"{rejected}"',
    }[item.shape]


def _null_item(shape: str) -> BehaviourItem:
    """A content-free item of one shape, for calibration (Zhao et al. 2021, contextual calibration)."""
    return {
        "ugc": BehaviourItem("ugc", _NULL_TEXT, chosen=_NULL_TEXT),
        "pair": BehaviourItem("pair", _NULL_TEXT, chosen=_NULL_TEXT, rejected=_NULL_TEXT),
        "up": BehaviourItem("thumb", _NULL_TEXT, chosen=_NULL_TEXT),
        "down": BehaviourItem("thumb", _NULL_TEXT, rejected=_NULL_TEXT),
    }[shape]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class ModelInferrerConfig:
    """``batch_size``: dimensions per forward pass (each row holds a copy of the item's KV cache);
    ``max_field_chars``: longest text per item field shown to the model (halved until the
    prompt fits the context); ``cache_size``: labelled items remembered."""

    batch_size: int = 30
    max_field_chars: int = 600
    cache_size: int = 4096

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_field_chars", "cache_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")


class ModelInferrer(ProfileInferrer):
    """Has the chat model label each item on the 90 dimensions.

    Per item and dimension, the prompt is the item, then "A: <positive pole> / B: <negative
    pole>", and the label is the gap log p(A) - log p(B) of the reply's first token, minus
    the same gap for a content-free item of the same shape (which removes the model's
    letter and pole-wording biases), through a sigmoid: p(positive) in [0, 1].

    The item text is a shared prefix: it runs through the model once, and its KV cache is
    repeated over a batch of dimension suffixes, so an item costs one prefix plus 90 short
    suffixes. The engine's lock is held per item, so chat replies wait at most one item.
    """

    method = "model"

    def __init__(self, engine: Engine, config: ModelInferrerConfig | None = None) -> None:
        self.engine = engine
        self.config = config or ModelInferrerConfig()
        self._cache: OrderedDict[tuple[str, str], tuple[float, ...]] = OrderedDict()
        self._nulls: dict[tuple[str, str], np.ndarray] = {}
        self._cache_lock = threading.Lock()

    @property
    def model_name(self) -> str:
        return self.engine.loaded.name

    def cached(self, item: BehaviourItem) -> tuple[float, ...] | None:
        """The stored label of ``item`` under the current model, if it was labelled before."""
        with self._cache_lock:
            return self._cache.get((self.model_name, item.key))

    def label(self, items: Sequence[BehaviourItem], progress: Progress | None = None) -> list[tuple[float, ...]]:
        out: list[tuple[float, ...]] = []
        if progress is not None:
            progress(0, len(items))
        for done, item in enumerate(items, 1):
            values = self.cached(item)
            if values is None:
                with _holding(self.engine):
                    gaps = self.logit_gaps(item) - self.null_gaps(item.shape)  # (90,)
                values = tuple(float(v) for v in _sigmoid(gaps))
                self._remember(item, values)
            out.append(values)
            if progress is not None:
                progress(done, len(items))
        return out

    def _remember(self, item: BehaviourItem, values: tuple[float, ...]) -> None:
        with self._cache_lock:
            self._cache[(self.model_name, item.key)] = values
            self._cache.move_to_end((self.model_name, item.key))
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)

    def null_gaps(self, shape: str) -> np.ndarray:
        """The A/B gaps of a content-free item of one shape, (90,): computed once per model, then remembered."""
        key = (self.model_name, shape)
        with self._cache_lock:
            gaps = self._nulls.get(key)
        if gaps is None:
            gaps = self.logit_gaps(_null_item(shape))
            with self._cache_lock:
                self._nulls[key] = gaps
        return gaps

    # Prompt pieces ------------------------------------------------------------------------

    def prompt_parts(self, item: BehaviourItem) -> tuple[list[int], list[list[int]]]:
        """Token ids of the shared prefix and of each dimension's suffix (the choices and the reply opener)."""
        tokenizer = self.engine.loaded.tokenizer
        limit = self.engine.max_context()
        width = self.config.max_field_chars
        while True:
            body = f"{_describe(item, width)}\n\n{_QUESTION}\n{_MARKER}"
            rendered = self.engine.render([{"role": "user", "content": body}])
            head, _, tail = rendered.partition(_MARKER)
            prefix = tokenizer(head, add_special_tokens=False)["input_ids"]
            suffixes = [
                tokenizer(f"A: {d.positive}\nB: {d.negative}{tail}", add_special_tokens=False)["input_ids"]
                for d in DIMENSIONS
            ]
            if len(prefix) + max(len(s) for s in suffixes) <= limit:
                return list(prefix), [list(s) for s in suffixes]
            if width <= 20:
                raise ValueError(f"the model's context ({limit} tokens) is too short to label behaviour items")
            width //= 2

    def answer_ids(self) -> tuple[int, int]:
        """The first token of the replies "A" and "B"."""
        tokenizer = self.engine.loaded.tokenizer
        a, b = (tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in ("A", "B"))
        if a == b:
            raise ValueError("the tokenizer gives the answers 'A' and 'B' the same first token")
        return int(a), int(b)

    # The model ------------------------------------------------------------------------------

    def logit_gaps(self, item: BehaviourItem) -> np.ndarray:
        """log p(A) - log p(B) for every dimension, uncalibrated: shape (90,). Caller holds the model."""
        import torch

        loaded = self.engine.loaded
        model, device = loaded.model, loaded.device
        prefix, suffixes = self.prompt_parts(item)
        a_id, b_id = self.answer_ids()
        pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else loaded.eou_token_id
        keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        p = len(prefix)
        gaps = np.zeros(SIZE, dtype=np.float64)
        with torch.inference_mode():
            prefix_ids = torch.tensor([prefix], dtype=torch.long, device=device)  # (1, P)
            shared = model(input_ids=prefix_ids, use_cache=True, **keep).past_key_values
            # Batching dimensions of similar suffix length keeps padding (wasted compute) small.
            order = sorted(range(SIZE), key=lambda k: len(suffixes[k]))
            for start in range(0, SIZE, self.config.batch_size):
                dims = order[start : start + self.config.batch_size]
                chunk = [suffixes[k] for k in dims]
                b, w = len(chunk), max(len(s) for s in chunk)
                # Left padding inside the suffix block puts every row's last token at the end,
                # so one logit row per sequence suffices; explicit positions keep each real token
                # where it would be without padding.
                ids = torch.full((b, w), pad, dtype=torch.long)  # (B, W)
                mask = torch.ones((b, p + w), dtype=torch.long)  # (B, P + W): prefix, then suffix
                positions = torch.zeros((b, w), dtype=torch.long)  # (B, W)
                for r, s in enumerate(chunk):
                    offset = w - len(s)
                    ids[r, offset:] = torch.tensor(s, dtype=torch.long)
                    mask[r, p : p + offset] = 0
                    positions[r, offset:] = torch.arange(p, p + len(s))
                cache = copy.deepcopy(shared)
                cache.batch_repeat_interleave(b)  # (1, H, P, d) -> (B, H, P, d) per layer
                logits = model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=positions.to(device),
                    past_key_values=cache,
                    use_cache=True,
                    **keep,
                ).logits[:, -1, :].float()  # (B, V)
                logprobs = torch.log_softmax(logits, dim=-1)
                gaps[dims] = (logprobs[:, a_id] - logprobs[:, b_id]).cpu().numpy()
        return gaps


def _accepts(model: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _holding(engine: Engine) -> AbstractContextManager:
    """Exclusive use of the engine's model, the lock that chat replies hold while generating."""
    return engine.exclusive()


# --- proposals ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SliderChange:
    """One proposed slider move: from ``current`` to the pole ``proposed``, with the evidence."""

    index: int
    dimension: Dimension
    current: float
    proposed: float  # 0.0 or 1.0
    value: float  # the inferred mean, continuous
    support: tuple[Support, ...]

    @property
    def strength(self) -> float:
        """How far the inferred mean lies from neutral, 0 (none) to 1 (all items at the pole)."""
        return abs(self.value - NEUTRAL) * 2

    @property
    def pole(self) -> str:
        """The label of the proposed pole."""
        return self.dimension.positive if self.proposed == 1.0 else self.dimension.negative


_EPS = 1e-9  # 0.6 - 0.5 is 0.0999... in floating point; a value at the threshold counts


def _pole_of(value: float) -> float:
    return 1.0 if value >= POSITIVE_AT else 0.0 if value <= NEGATIVE_AT else NEUTRAL


def propose_changes(
    current_direction: Sequence[float], inference: ProfileInference, min_change: float = 0.1
) -> list[SliderChange]:
    """The slider changes the inference argues for, strongest first.

    A dimension is proposed when its thresholded inferred value is a pole, that pole is not
    where the current slider already renders (0.75 already reads as the positive pole), and
    the inferred mean lies at least ``min_change`` from neutral. Dimensions the behaviour
    leaves neutral are never proposed: no evidence is not evidence for neutrality. With the
    default 0.1 (the AlignX threshold's distance), a pole that only the empty-profile rule
    picked is not proposed either.
    """
    current = check_direction(current_direction)
    if not 0.0 <= min_change <= NEUTRAL:
        raise ValueError(f"min_change must lie in [0, 0.5]; got {min_change}")
    changes = [
        SliderChange(k, DIMENSIONS[k], current[k], proposed, inference.values[k], inference.support[k])
        for k, proposed in enumerate(inference.direction)
        if proposed != NEUTRAL
        and abs(inference.values[k] - NEUTRAL) >= min_change - _EPS
        and _pole_of(current[k]) != proposed
    ]
    return sorted(changes, key=lambda c: (-c.strength, c.index))
