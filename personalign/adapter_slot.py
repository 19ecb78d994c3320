"""The shared model's one swappable LoRA slot, for adapters that belong to a persona, not the app.

An app-wide adapter (``--adapter``) is applied once at load and never changes. A persona's own
adapter (``persona_tuning``) applies only to that persona's replies, and the app serves many
personas over one model, so the slot swaps adapters in place: peft injects LoRA layers into
the shared model's modules, and ``unload`` puts the original modules back. Replies run one at
a time under the engine lock, so the slot is only ever touched by the lock's holder, and
consecutive replies with the same adapter pay for no swap at all.

Each slot state has its own ``LoadedModel`` view whose ``name`` tells the weights apart
(``"<model> + <adapter folder>"``): a streaming memory made under one adapter records that
name and so is never resumed under other weights.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any

from personalign import graph_decode
from personalign.errors import UserError
from personalign.models import LoadedModel, ModelLoadError, check_adapter_fits

log = logging.getLogger(__name__)


class AdapterError(UserError):
    """A persona's adapter cannot be applied to the loaded model."""


def weights_name(loaded: LoadedModel, adapter: Path | None) -> str:
    """The name of ``loaded``'s weights with ``adapter`` applied on top (``loaded.name`` without one)."""
    return loaded.name if adapter is None else f"{loaded.name} + {Path(adapter).name}"


class AdapterSlot:
    """Applies at most one persona adapter to ``loaded.model`` at a time; callers hold the engine lock."""

    def __init__(self, loaded: LoadedModel) -> None:
        self._base = loaded
        self._applied: Path | None = None
        self._wrapper: Any = None  # the PeftModel around loaded.model while an adapter is applied
        self._requires_grad: dict[str, bool] = {}  # peft freezes the base; put the flags back on removal

    @property
    def applied(self) -> Path | None:
        return self._applied

    def view(self, adapter: Path | None) -> LoadedModel:
        """The ``LoadedModel`` that stands for the base with ``adapter`` applied (nothing is applied)."""
        if adapter is None:
            return self._base
        return dataclasses.replace(self._base, name=weights_name(self._base, adapter), adapter=Path(adapter))

    def use(self, adapter: Path | None) -> LoadedModel:
        """Apply ``adapter`` (or none) to the shared model and return its view; ``AdapterError`` if it does not fit."""
        adapter = None if adapter is None else Path(adapter)
        if adapter != self._applied:
            self._remove()
            if adapter is not None:
                self._apply(adapter)
        return self.view(adapter)

    def _apply(self, adapter: Path) -> None:
        from peft import PeftModel

        if self._base.adapter is not None and self._base.quantization != "none":
            # The app-wide adapter stays a live peft wrapper on a quantized base; a second
            # wrapper around it would stack two adapters in ways peft does not undo cleanly.
            raise AdapterError(f"A persona adapter cannot be used here: {self._base.name} runs quantized with the "
                               f"app-wide adapter {self._base.adapter.name}.")
        self._requires_grad = {name: p.requires_grad for name, p in self._base.model.named_parameters()}
        try:
            check_adapter_fits(self._base, adapter)
            with warnings.catch_warnings():  # peft probes a deprecated transformers property on every wrap
                warnings.simplefilter("ignore", FutureWarning)
                # In place: the LoRA layers replace modules inside loaded.model, so every caller
                # of loaded.model (generation, caches, guidance) runs through them.
                self._wrapper = PeftModel.from_pretrained(self._base.model, str(adapter))
        except (ModelLoadError, RuntimeError, ValueError, KeyError, OSError) as exc:
            raise AdapterError(f"The persona's adapter in {adapter.name} cannot be applied: {exc}. "
                               "Tune the persona again, or remove its adapter.") from exc
        self._base.model.eval()
        graph_decode.forget(self._base.model)
        self._applied = adapter
        log.info("applied persona adapter %s", adapter.name)

    def _remove(self) -> None:
        if self._wrapper is None:
            return
        self._wrapper.unload()  # the original modules go back; loaded.model is itself again
        graph_decode.forget(self._base.model)
        for name, p in self._base.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        self._wrapper, self._applied = None, None
