"""Loading a chat model: the embedded default or any Hugging Face causal LM.

Nothing is loaded at import time; ``load_model`` does all the work and turns every
failure a user can cause (bad id, no GPU, no chat template...) into ``ModelLoadError``.
A trained LoRA adapter (``ModelConfig.adapter``, e.g. from ``train-memory``) is applied
after the base loads: merged into the weights when they are unquantized, kept as a
peft wrapper on a 4/8-bit base, whose packed weights cannot take a merge.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from personalign.embedded import (
    EMBEDDED_MODEL,
    EMBEDDED_NAME,
    EmbeddedModelError,
    ensure_embedded_model,
)

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("auto", "none", "4bit", "8bit")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
# Context lengths beyond this are rarely usable on one consumer device (KV cache memory).
MAX_CONTEXT_CAP = 32_768
_FALLBACK_CONTEXT = 2_048
# Assistant text used to find the end-of-turn token in a chat template.
_PROBE_REPLY = "PersonalignProbeReply"
ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes into an adapter folder
ADAPTER_METADATA = "personalign-adapter.json"
"""Written by our trainers beside the adapter: its purpose, the base model it fits, the run."""
_LEGACY_ADAPTER_METADATA = "personalign-memory.json"  # the name memory adapters were first saved with
# Config fields that decide whether an adapter's weights fit a base model.
_FINGERPRINT_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
)


class ModelLoadError(Exception):
    """The model could not be loaded; the message is written to be shown to a user."""


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how. ``cache_dir`` holds the converted embedded model
    (default: ``default_cache_dir()``); hub models use the usual Hugging Face cache."""

    model: str = EMBEDDED_MODEL
    quantize: str = "auto"  # auto|none|4bit|8bit
    device: str = "auto"  # auto|cpu|cuda
    cache_dir: Path | None = None
    adapter: Path | None = None  # a peft LoRA folder to apply on top (ModelLoadError if it is not one)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("model must be a non-empty Hugging Face id, local folder, or 'embedded'")
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}; got {self.quantize!r}")
        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}; got {self.device!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, Path):
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if self.adapter is not None:
            object.__setattr__(self, "adapter", check_adapter_folder(self.adapter))


def check_adapter_folder(path: Path | str) -> Path:
    """Return ``path`` as a Path if it is a folder holding a peft adapter config, else raise ``ModelLoadError``."""
    path = Path(path).expanduser()
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise ModelLoadError(f"Adapter folder {path} {what}; give the folder that train-memory wrote (--out).")
    if not (path / ADAPTER_CONFIG).is_file():
        raise ModelLoadError(
            f"Adapter folder {path} holds no {ADAPTER_CONFIG}, so it is not a LoRA adapter; "
            "give the folder that train-memory wrote (--out)."
        )
    return path


def base_fingerprint(model: Any) -> dict[str, Any]:
    """The config fields an adapter's weight shapes depend on, for the check in ``apply_adapter``."""
    config = getattr(model, "config", None)
    return {name: getattr(config, name, None) for name in _FINGERPRINT_FIELDS}


@dataclass
class LoadedModel:
    """A model ready for chat, plus what generation needs to know about it."""

    model: Any  # transformers PreTrainedModel (causal LM)
    tokenizer: Any  # transformers tokenizer with a chat template
    device: torch.device
    name: str
    quantization: str  # none|4bit|8bit
    dtype: torch.dtype
    eou_token_id: int
    stop_token_ids: frozenset[int]
    load_seconds: float
    adapter: Path | None = None  # the LoRA folder applied on top of the base, if any
    # Its ADAPTER_METADATA, read once at load ({} without one): what it was trained for and how.
    adapter_metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_parts(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        quantization: str = "none",
        dtype: torch.dtype | None = None,
        load_seconds: float = 0.0,
    ) -> LoadedModel:
        """Wrap an in-memory model and tokenizer: puts the model in eval mode and
        derives device, dtype, end-of-turn and stop tokens from them."""
        eou = find_eou_token_id(tokenizer)
        if eou is None:
            raise ModelLoadError(f"Model '{name}' defines no end-of-turn or end-of-sequence token; chat needs one.")
        return cls(
            model=model.eval(),
            tokenizer=tokenizer,
            device=model.device,
            name=name,
            quantization=quantization,
            dtype=dtype or model.dtype,
            eou_token_id=eou,
            stop_token_ids=stop_token_ids_for(model, tokenizer, eou),
            load_seconds=load_seconds,
        )

    @property
    def context_length(self) -> int:
        """Tokens the model can attend to (prompt + reply), capped at ``MAX_CONTEXT_CAP``."""
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = getattr(text_config, "max_position_embeddings", None)
        if not limit:
            tok_limit = getattr(self.tokenizer, "model_max_length", None)
            # Tokenizers without a limit report a huge sentinel (~1e30).
            limit = tok_limit if tok_limit and tok_limit < 10_000_000 else _FALLBACK_CONTEXT
        return int(min(limit, MAX_CONTEXT_CAP))


def _resolve_device(requested: str) -> torch.device:
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise ModelLoadError("--device cuda was asked for, but no CUDA GPU was found. Start with --device cpu.")
    if requested == "cuda" or (requested == "auto" and has_cuda):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _resolve_quantization(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "4bit" if device.type == "cuda" else "none"
    if requested in ("4bit", "8bit") and device.type != "cuda":
        bits = requested[0]
        if torch.cuda.is_available():  # a GPU exists, but the CPU was chosen
            raise ModelLoadError(
                f"{bits}-bit quantization runs only on a CUDA GPU, but --device cpu was chosen. "
                "Start with --device cuda, or with --quantize none to stay on the CPU."
            )
        raise ModelLoadError(
            f"{bits}-bit quantization needs a CUDA GPU, and none was found. "
            "Start with --quantize none to run unquantized on the CPU (slower, more memory)."
        )
    return requested


def _quantization_kwargs(quantization: str) -> dict[str, Any]:
    """from_pretrained kwargs for the chosen quantization (bitsandbytes only when asked)."""
    if quantization == "none":
        return {}
    try:
        import bitsandbytes  # noqa: F401  (only to give a clear error when missing)
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ModelLoadError(
            f"{quantization} quantization needs the bitsandbytes package: pip install bitsandbytes "
            "(or start with --quantize none)."
        ) from exc
    if quantization == "4bit":
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": bnb}


def _resolve_source(config: ModelConfig) -> tuple[str, str]:
    """Return (what to pass to from_pretrained, display name)."""
    if config.model == EMBEDDED_MODEL:
        try:
            return str(ensure_embedded_model(config.cache_dir)), EMBEDDED_NAME
        except EmbeddedModelError as exc:
            raise ModelLoadError(str(exc)) from exc
    path = Path(config.model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"Model path {path} is a file; give the folder that holds config.json.")
        return str(path), config.model
    return config.model, config.model


def _not_found(name: str, source: str, exc: BaseException) -> ModelLoadError:
    if Path(source).is_dir():
        return ModelLoadError(
            f"Could not load model '{name}': the folder {source} does not hold a complete Hugging Face "
            f"causal LM (config, weights and tokenizer files). Details: {exc}"
        )
    return ModelLoadError(
        f"Could not load model '{name}': it is neither a local folder nor reachable on the "
        f"Hugging Face Hub (check the id, your network, or HF_HUB_OFFLINE). Details: {exc}"
    )


def find_eou_token_id(tokenizer: Any) -> int | None:
    """Return the token that closes an assistant turn in the tokenizer's chat template.

    Generic: render a one-exchange chat, and take the first special token after the
    assistant's text (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3, ...).
    Falls back to ``eos_token_id`` when the template gives no answer.
    """
    special = set(tokenizer.all_special_ids)
    special |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE_REPLY}], tokenize=False
        )
    except Exception:  # noqa: BLE001 -- templates may raise on the probe; the EOS fallback is still sound
        text = ""
    end = text.rfind(_PROBE_REPLY)
    if end >= 0:
        # Special tokens are split out before the subword model, so tokenizing the
        # tail alone yields the same special ids as tokenizing the whole text.
        for token_id in tokenizer(text[end + len(_PROBE_REPLY):], add_special_tokens=False)["input_ids"]:
            if token_id in special:
                return int(token_id)
    return tokenizer.eos_token_id


def stop_token_ids_for(model: Any, tokenizer: Any, eou: int) -> frozenset[int]:
    """Tokens that end a reply: end-of-turn, the tokenizer's EOS and the generation config's EOS(s)."""
    ids = {eou, tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple, set)) else [gen_eos])
    return frozenset(int(i) for i in ids if i is not None)


def load_model(config: ModelConfig) -> LoadedModel:
    """Load tokenizer and model as ``config`` says; raise ``ModelLoadError`` on any user-fixable failure."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    device = _resolve_device(config.device)
    quantization = _resolve_quantization(config.quantize, device)
    source, name = _resolve_source(config)
    logger.info("Loading %s on %s (quantization: %s)", name, device, quantization)

    # The tokenizer is small: loading it first fails fast on bad ids and missing templates.
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:  # not found / offline / invalid repo id
        raise _not_found(name, source, exc) from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"Model '{name}' has no chat template, and chat needs one. "
            "Pick an instruction-tuned (chat) version of the model, e.g. one named '-Instruct' or '-Chat'."
        )

    kwargs: dict[str, Any] = _quantization_kwargs(quantization)
    kwargs["dtype"] = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index}
        # On torch 2.11 + H100, cuDNN attention spent ~2.3 ms of CPU per layer call, which
        # dominates small-batch decoding; the flash / memory-efficient kernels do not.
        torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise _not_found(name, source, exc) from exc
    except (ValueError, RuntimeError, ImportError) as exc:  # unsupported architecture, OOM, ...
        raise ModelLoadError(f"Could not load model '{name}': {exc}") from exc
    loaded = LoadedModel.from_parts(
        model,
        tokenizer,
        name=name,
        quantization=quantization,
        dtype=kwargs["dtype"],
        load_seconds=time.perf_counter() - start,
    )
    if config.adapter is not None:
        loaded = apply_adapter(loaded, config.adapter)
        loaded.load_seconds = time.perf_counter() - start
    return loaded


def read_adapter_metadata(path: Path) -> dict[str, Any]:
    """``ADAPTER_METADATA`` of an adapter folder; {} for a plain peft adapter without one."""
    file = path / ADAPTER_METADATA
    if not file.is_file():
        file = path / _LEGACY_ADAPTER_METADATA
    if not file.is_file():
        return {}
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"Adapter metadata {file} cannot be read: {exc}") from exc
    if not isinstance(meta, dict):
        raise ModelLoadError(f"Adapter metadata {file} is not a JSON object.")
    return meta


def _same_model(a: str, b: str) -> bool:
    """Two model names given by a user refer to the same model: equal, or the same local folder."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def _check_adapter_base(path: Path, meta: dict[str, Any], loaded: LoadedModel) -> None:
    """Refuse an adapter whose metadata says it was trained for another model or other sinks."""
    if not meta:
        return
    trained_for = str(meta.get("base_model", "another model"))
    flag = EMBEDDED_MODEL if trained_for == EMBEDDED_NAME else trained_for  # what --model takes
    wanted = meta.get("base_config") if isinstance(meta.get("base_config"), dict) else {}
    have = base_fingerprint(loaded.model)
    differ = [f"{k} {wanted[k]} vs {have[k]}" for k in wanted if k in have and wanted[k] != have[k]]
    if differ:
        raise ModelLoadError(
            f"The adapter in {path} was trained for {trained_for}, whose shape differs from {loaded.name} "
            f"({'; '.join(differ)}). Load it with --model {flag}."
        )
    if not _same_model(trained_for, loaded.name):
        raise ModelLoadError(
            f"The adapter in {path} was trained for {trained_for}, not {loaded.name}. "
            f"Load it with --model {flag}, or train one for this model (train-memory, train-preference)."
        )
    eou = meta.get("eou_token_id")
    if eou is not None and eou != loaded.eou_token_id:
        raise ModelLoadError(
            f"The adapter in {path} was trained with end-of-utterance token {eou}, but {loaded.name} "
            f"ends turns with {loaded.eou_token_id}; its memory sinks would not match."
        )


def _fitting_adapter(loaded: LoadedModel, path: Path | str) -> tuple[Path, dict[str, Any]]:
    """``path`` and its metadata if it holds an adapter that fits ``loaded``, else ``ModelLoadError``."""
    path = check_adapter_folder(path)
    meta = read_adapter_metadata(path)
    _check_adapter_base(path, meta, loaded)
    return path, meta


def check_adapter_fits(loaded: LoadedModel, path: Path | str) -> Path:
    """``path`` as a Path if it holds an adapter whose metadata fits ``loaded``, else ``ModelLoadError``."""
    return _fitting_adapter(loaded, path)[0]


def apply_adapter(loaded: LoadedModel, path: Path | str) -> LoadedModel:
    """Apply the LoRA adapter in ``path`` to ``loaded``'s model and return the adapted ``LoadedModel``.

    The adapter is merged into unquantized weights (plain model, no runtime cost) and kept as a
    peft wrapper on a 4/8-bit base. Either way ``loaded.model`` itself is changed in place, so
    pass a model nobody else uses. Raises ``ModelLoadError`` when the adapter does not fit.
    """
    from peft import PeftModel

    path, meta = _fitting_adapter(loaded, path)
    try:
        with warnings.catch_warnings():  # peft probes a deprecated transformers property on every wrap
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(loaded.model, str(path))
    except (RuntimeError, ValueError, KeyError, OSError) as exc:  # size mismatch, unknown target modules...
        raise ModelLoadError(f"The adapter in {path} does not fit model {loaded.name}: {exc}") from exc
    if loaded.quantization == "none":
        model = model.merge_and_unload()
    logger.info("Applied adapter %s (%s)", path, "merged" if loaded.quantization == "none" else "unmerged")
    return dataclasses.replace(loaded, model=model.eval(), adapter=path, adapter_metadata=meta)
