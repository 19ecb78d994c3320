"""Shared fixtures: a tiny random chat model built fully offline, and the real embedded model.

``make_tiny_llm()`` / the ``tiny_llm`` fixture give a ``LoadedModel`` in well under a
second: a 2-layer random Llama over a byte-level tokenizer (every UTF-8 byte is one
token, so multi-byte characters span several tokens) with a ChatML template.
Replies from it are gibberish but deterministic under greedy decoding.
"""

from __future__ import annotations

import os
from pathlib import Path

# Tests never reach a model hub; set before transformers is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch

from personalign.embedded import CHATML_TEMPLATE
from personalign.models import LoadedModel

TINY_SPECIALS = ("<unk>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 (as in SmolLM2)


def make_tiny_tokenizer():
    """A byte-level BPE tokenizer (no merges) with ChatML specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for the bytes
    vocab = {tok: i for i, tok in enumerate([*TINY_SPECIALS, *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(TINY_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<|im_end|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=512,
    )


def make_tiny_model(vocab_size: int):
    """A random 2-layer Llama (hidden 64, 4 heads, 2 KV heads), seeded for repeatability."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the global RNG
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def make_tiny_llm() -> LoadedModel:
    """Build the tiny offline ``LoadedModel`` (CPU, float32, end-of-turn ``<|im_end|>`` = id 2)."""
    tokenizer = make_tiny_tokenizer()
    return LoadedModel.from_parts(make_tiny_model(len(tokenizer)), tokenizer, name="tiny-random-llama")


def random_utterance(seed: int, length: int) -> list[int]:
    """Deterministic ids of one ``length``-token utterance for the tiny model: byte tokens 3..258,
    then its EoU (``<|im_end|>``, id 2), as the compressing caches see a closed utterance."""
    generator = torch.Generator().manual_seed(seed)
    return [*torch.randint(3, 259, (length - 1,), generator=generator).tolist(), 2]


@pytest.fixture(scope="session")
def tiny_llm() -> LoadedModel:
    """The tiny random chat model, shared by the session (do not mutate it)."""
    return make_tiny_llm()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny model saved as a model folder, for what loads by path (``--model``, adapters)."""
    llm = make_tiny_llm()
    folder = tmp_path_factory.mktemp("tiny-model")
    llm.model.save_pretrained(folder)
    llm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def embedded_llm() -> LoadedModel:
    """The real embedded SmolLM2-135M-Instruct on CPU (converted once into the default cache)."""
    from personalign.models import ModelConfig, load_model

    return load_model(ModelConfig(device="cpu"))
