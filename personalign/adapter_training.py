"""What every LoRA training run shares: wrapping the loaded model, its output folder, its record.

Two trainers build on this: ``memory_training`` (SMR/LMR sinks) and ``preference_training``
(DPO on pairwise choices). Each trains low-rank adapters on the attention projections of a
``LoadedModel`` the app may be sharing, so the wrap must leave no trace: ``lora_session``
removes the LoRA layers and puts back every ``requires_grad`` flag and the train/eval mode
when it ends, however it ends. The adapter folder holds peft's files and
``ADAPTER_METADATA``, which ``models.apply_adapter`` reads to refuse an adapter trained for
another model.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import torch

from personalign.models import (
    ADAPTER_METADATA,
    LoadedModel,
    base_fingerprint,
    check_adapter_fits,
)

TARGET_MODULES = ("q_proj", "v_proj")
"""Both published recipes adapt the query and value projections only: the default."""
MAX_GRAD_NORM = 1.0

Item = TypeVar("Item")
ProgressFn = Callable[[int, int, float], None]


@dataclass(frozen=True)
class LoraSettings:
    """The adapter's shape. ``layers``: the decoder layers to adapt (None: all of them).

    Adapting only the top layers is a speed choice: gradients then stop at the lowest adapted
    layer, so the backward pass skips everything below it. ``modules``: the linear layers
    adapted in each, by their name in the model (``k_proj`` as well lets training shape the
    keys a later query looks up, which q/v alone cannot).
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    layers: tuple[int, ...] | None = None
    modules: tuple[str, ...] = TARGET_MODULES

    def __post_init__(self) -> None:
        for name in ("rank", "alpha"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout!r}")
        if self.layers is not None and (
            not self.layers or any(not isinstance(i, int) or i < 0 for i in self.layers)
        ):
            raise ValueError(f"layers must be None or non-negative layer indices; got {self.layers!r}")
        if (not isinstance(self.modules, tuple) or not self.modules
                or any(not isinstance(m, str) or not m.isidentifier() for m in self.modules)
                or len(set(self.modules)) != len(self.modules)):
            raise ValueError(f"modules must be distinct module names such as q_proj; got {self.modules!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.modules), "layers": None if self.layers is None else list(self.layers)}


def top_layers(model: Any, count: int) -> tuple[int, ...]:
    """The indices of the model's last ``count`` decoder layers (all of them if it has fewer)."""
    total = int(model.config.num_hidden_layers)
    if count < 1:
        raise ValueError(f"the number of layers to adapt must be positive; got {count}")
    return tuple(range(max(0, total - count), total))


def check_out_dir(out_dir: Path | str) -> Path:
    """``out_dir`` as a Path, refused if it is a file or a non-empty folder that holds no adapter."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the adapter")
    if out.is_dir() and any(out.iterdir()) and not (out / "adapter_config.json").is_file():
        raise ValueError(f"--out {out} is a non-empty folder that holds no adapter; choose a new or empty folder")
    return out


@contextmanager
def lora_session(loaded: LoadedModel, settings: LoraSettings, seed: int,
                 start_from: Path | None = None) -> Iterator[Any]:
    """``loaded.model`` wrapped in LoRA layers, seeded; unwrapped and restored on exit.

    The layers are fresh, or, with ``start_from``, that saved adapter's weights to train on (a
    second stage after a first, as two runs); its shape must be ``settings``'. The global RNG is
    left untouched (the seed governs LoRA init and dropout only). A 4-bit or 8-bit base is
    trained as it stands, frozen with float32 LoRA weights, rather than through peft's
    ``prepare_model_for_kbit_training``: that casts the base to float32 for good, which the
    app's shared model must not undergo, and a 135M model needs none of its savings.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if loaded.adapter is not None:
        raise ValueError(f"{loaded.name} already carries the adapter {loaded.adapter}; train on the base model alone")
    if start_from is not None:
        start_from = check_adapter_fits(loaded, start_from)
    model = loaded.model
    training = model.training
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    _check_modules_exist(model, settings.modules)
    lora = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.modules), task_type="CAUSAL_LM",
                      layers_to_transform=None if settings.layers is None else list(settings.layers))
    devices = [loaded.device.index or 0] if loaded.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with warnings.catch_warnings():  # peft probes a deprecated transformers property on every wrap
            warnings.simplefilter("ignore", FutureWarning)
            if start_from is None:
                peft_model = get_peft_model(model, lora)
            else:
                peft_model = PeftModel.from_pretrained(model, str(start_from), is_trainable=True)
        try:
            if start_from is not None:
                _check_same_shape(peft_model.peft_config["default"], lora, start_from)
            yield peft_model
        finally:
            peft_model.unload()  # drops the LoRA layers, back to the original modules
            for name, p in model.named_parameters():
                p.requires_grad_(requires_grad.get(name, p.requires_grad))
            model.train(training)


def _check_modules_exist(model: Any, modules: Sequence[str]) -> None:
    """Refuse module names the model lacks, naming the ones it has, before peft wraps anything."""
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [m for m in modules if m not in linear]
    if missing:
        raise ValueError(f"the model has no {', '.join(missing)} layers to adapt; "
                         f"its linear layers are {', '.join(sorted(linear))}")


def _check_same_shape(saved: Any, wanted: Any, path: Path) -> None:
    """Refuse to go on from an adapter whose rank, alpha or adapted modules differ from the run's settings."""
    def shape(c: Any) -> dict[str, Any]:
        layers = c.layers_to_transform
        return {"rank": c.r, "alpha": c.lora_alpha, "modules": sorted(c.target_modules),
                "layers": None if layers is None else sorted([layers] if isinstance(layers, int) else layers)}

    have, want = shape(saved), shape(wanted)
    differ = [f"{k} {have[k]} (asked for {want[k]})" for k in have if have[k] != want[k]]
    if differ:
        raise ValueError(f"the adapter in {path} has {', '.join(differ)}; train with its settings to go on from it")


def write_metadata(out: Path, loaded: LoadedModel, purpose: str, settings: LoraSettings,
                   run: Mapping[str, Any]) -> None:
    """Write ``ADAPTER_METADATA`` beside the adapter: the base model it fits, its purpose, the run."""
    meta = {
        "purpose": purpose,
        "base_model": loaded.name,
        "base_config": base_fingerprint(loaded.model),
        "eou_token_id": loaded.eou_token_id,
        "lora": settings.to_dict(),
        **run,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (out / ADAPTER_METADATA).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def planned_steps(items: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps for ``epochs`` passes over ``items`` in batches, capped at ``max_steps``."""
    total = math.ceil(items / batch_size) * epochs
    return total if max_steps is None else min(total, max_steps)


def optimize(model: Any, items: Sequence[Item], step: Callable[[list[Item]], float], *, lr: float, batch_size: int,
             total: int, seed: int, progress: ProgressFn | None = None) -> tuple[list[float], float]:
    """Run ``total`` AdamW steps over shuffled batches of ``items``; return the losses and the seconds.

    ``step(batch)`` computes the batch's loss, calls ``backward`` on it (once, or per item
    when it accumulates) and returns its value; the gradient is then clipped and applied.
    Each epoch is a fresh seeded shuffle; the last epoch stops at ``total``.
    ``progress(step, total, loss)`` follows every step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    order = random.Random(seed)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    while len(losses) < total:
        epoch = order.sample(list(items), len(items))
        for i in range(0, len(epoch), batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = step(epoch[i:i + batch_size])
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            losses.append(loss)
            if progress is not None:
                progress(len(losses), total, loss)
            if len(losses) == total:
                break
    return losses, time.perf_counter() - start
