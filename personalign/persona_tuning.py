"""Tuning to a persona: its own DPO adapter, trained on its pairwise choices, used for its replies.

The issue's "light training on the persona's pairwise history", inside the app. A persona's
choices (pairwise items it holds, and the picks kept from chat with its consent) become DPO
pairs framed by its PBA prompt, the framing the population adapter was measured with
(benchmarks/RESULTS.md); ``preference_training`` trains the adapter on the shared model,
with the adapter switched off as the reference. Thumbs alone are left out: one rated answer
is not a pair.

The adapter is written to ``<root>/<user id>/<persona id>-<time>/`` and recorded in the
database, one per persona; retraining replaces both, and folders no record names are
removed. Replies with the persona (any mode but "none") then run with it applied
(``adapter_slot``). An adapter is used only on the weights it was trained on: the same
model, and the same app-wide adapter or none.

Training holds the shared model, so every other reply waits until it ends; the defaults keep
it to a few minutes on a CPU.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import storage
from personalign.accounts import AccountService
from personalign.adapter_slot import weights_name
from personalign.adapter_training import LoraSettings, planned_steps, top_layers
from personalign.engine import Engine
from personalign.errors import NotFoundError, UserError, user_errors
from personalign.models import LoadedModel
from personalign.persona import Persona
from personalign.preference_training import (
    PreferencePair,
    PreferenceTrainingConfig,
    train_preference,
)
from personalign.profile_inference import BehaviourItem
from personalign.profiling import gather_behaviour
from personalign.prompts import Mode, build_messages

logger = logging.getLogger(__name__)

KIND = "pba"  # the prompt framing of the training pairs, recorded with the adapter
Progress = Callable[[int, int, str], None]  # (done, total, what is happening)


@dataclass(frozen=True)
class TuningSettings:
    """How a persona is tuned. The defaults follow the measured P-Soups run (lr 5e-4, β 0.1,
    r 8 on q/v) with more passes, since one person has tens of pairs, not hundreds."""

    min_pairs: int = 4
    epochs: int = 3
    max_steps: int = 40
    batch_size: int = 4
    lr: float = 5e-4
    beta: float = 0.1
    top_layers: int | None = None  # adapt only the last N layers (faster); None: all
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_pairs < 2:
            raise ValueError("tuning needs at least 2 pairs")


@dataclass(frozen=True)
class TunedAdapter:
    """A persona's recorded adapter, and whether replies can use it now."""

    pairs: int
    steps: int
    probe_pairs: int
    accuracy_before: float | None
    accuracy_after: float | None
    created_at: datetime
    model: str
    problem: str | None  # why replies do not use it (another model, missing files); None when they do


@dataclass(frozen=True)
class TuningState:
    """What the persona tab shows: how many pairs there are to learn from, and the adapter."""

    persona_id: int
    pairs: int  # complete pairs in the persona's behaviour now
    min_pairs: int
    adapter: TunedAdapter | None
    unavailable: str | None  # why this model cannot be tuned at all; None when it can

    @property
    def can_tune(self) -> bool:
        return self.unavailable is None and self.pairs >= self.min_pairs


def tuning_pairs(persona: Persona, items: Sequence[BehaviourItem]) -> list[PreferencePair]:
    """The DPO pairs in ``items`` (those with both a chosen and a rejected answer), framed by ``persona``."""
    pairs = []
    for index, item in enumerate(items):
        if item.shape != "pair" or item.chosen == item.rejected or not item.prompt.strip():
            continue
        messages = tuple(build_messages(Mode.PBA, persona, [], item.prompt))
        pairs.append(PreferencePair(messages, item.chosen, item.rejected, index))
    return pairs


def training_config(settings: TuningSettings, loaded: LoadedModel) -> PreferenceTrainingConfig:
    """The DPO run ``settings`` ask for on ``loaded``'s model."""
    layers = None if settings.top_layers is None else top_layers(loaded.model, settings.top_layers)
    return PreferenceTrainingConfig(kind=KIND, beta=settings.beta, lr=settings.lr, epochs=settings.epochs,
                                    max_steps=settings.max_steps, batch_size=settings.batch_size, seed=settings.seed,
                                    lora=LoraSettings(layers=layers))


class TuningService:
    """Per-persona adapters for one shared engine, scoped to one signed-in user per call."""

    def __init__(self, db: storage.Database, accounts: AccountService, engine: Engine, root: Path,
                 settings: TuningSettings | None = None) -> None:
        self._db = db
        self._accounts = accounts
        self._engine = engine
        self.root = Path(root)
        self.settings = settings or TuningSettings()
        # A deleted persona's record goes with it (ON DELETE CASCADE) but its folder stays;
        # nothing trains before the services exist, so every user's orphans can go now.
        for folder in self.root.glob("*/"):
            if folder.name.isdigit():
                self._prune(int(folder.name))

    def base_name(self) -> str:
        """The weights a persona adapter is trained on: the model, with the app-wide adapter if any."""
        loaded = self._engine.loaded
        return weights_name(loaded, loaded.adapter)

    def unavailable(self) -> str | None:
        """Why personas cannot be tuned on this model, or None."""
        if self._engine.loaded.adapter is not None:
            return ("the app runs with an app-wide adapter (--adapter); tuning trains on the base model alone, "
                    "so start the app without it to tune personas")
        return None

    def state(self, user: str | None, persona_id: int) -> TuningState:
        user_id = self._accounts.user_id(user)
        behaviour = gather_behaviour(self._db, user_id, persona_id)
        return TuningState(persona_id, len(tuning_pairs(behaviour.persona, behaviour.items)), self.settings.min_pairs,
                           self._recorded(user_id, persona_id), self.unavailable())

    def adapter_for(self, user: str | None, persona_id: int | None, mode: Mode | str = Mode.PBA) -> Path | None:
        """The adapter folder a reply with this persona in ``mode`` runs with; None when the mode leaves
        the persona out, or it has no usable adapter."""
        if persona_id is None or Mode(mode) is Mode.NONE:
            return None
        row = self._row(self._accounts.user_id(user), persona_id)
        if row is None or self._problem(row) is not None:
            return None
        return self.root / row.path

    def tune(self, user: str | None, persona_id: int, progress: Progress | None = None) -> TuningState:
        """Train the persona's adapter on its pairs now, replacing any earlier one; the new state.

        Refused (``UserError``) with fewer than ``min_pairs`` pairs or on a model that cannot
        take persona adapters. Nothing is recorded unless training finishes.
        """
        reason = self.unavailable()
        if reason is not None:
            raise UserError(f"Tuning is not available: {reason}.")
        user_id = self._accounts.user_id(user)
        behaviour = gather_behaviour(self._db, user_id, persona_id)
        pairs = tuning_pairs(behaviour.persona, behaviour.items)
        if len(pairs) < self.settings.min_pairs:
            raise UserError(f"{behaviour.row.name} has {len(pairs)} pairwise choice{'s' if len(pairs) != 1 else ''}; "
                            f"tuning needs at least {self.settings.min_pairs}: {behaviour.hint()} "
                            "(in chat, ask for a second answer and pick the better one).")
        relative = f"{user_id}/{persona_id}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 1_000_000:06d}"
        out = self.root / relative
        if progress is not None:
            progress(0, 1, "waiting for the model")
        try:
            with self._engine.exclusive() as loaded:
                config = training_config(self.settings, loaded)
                logger.info("tuning persona %d: %d pairs, at most %d steps", persona_id, len(pairs),
                            planned_steps(len(pairs), config.batch_size, config.epochs, config.max_steps))

                def step(done: int, total: int, loss: float) -> None:
                    if progress is not None:
                        progress(done, total, f"training step {done} of {total} (DPO loss {loss:.3f})")

                report = train_preference(loaded, pairs, config, out, progress=step, run_info={
                    "persona_id": persona_id, "pairs": len(pairs), "chat_items": behaviour.chat_items})
                with self._db.session() as s, user_errors():
                    storage.set_persona_adapter(
                        session=s, user_id=user_id, persona_id=persona_id, path=relative, model=self.base_name(),
                        kind=KIND, pairs=report.train_pairs, steps=report.steps, probe_pairs=report.probe_pairs,
                        accuracy_before=report.probe_accuracy_before, accuracy_after=report.probe_accuracy_after)
                # Under the lock: no other tuning is writing a folder that is not recorded yet.
                self._prune(user_id)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        logger.info("tuned persona %d on %d pairs: %d steps in %.0f s", persona_id, len(pairs), report.steps,
                    report.seconds)
        return self.state(user, persona_id)

    def remove(self, user: str | None, persona_id: int) -> TuningState:
        """Forget the persona's adapter: replies go back to the shared model."""
        user_id = self._accounts.user_id(user)
        with self._db.session() as s:
            if storage.get_persona(session=s, user_id=user_id, persona_id=persona_id) is None:
                raise NotFoundError(f"Persona {persona_id} was not found.")
            storage.delete_persona_adapter(session=s, user_id=user_id, persona_id=persona_id)
        with self._engine.exclusive():  # the folder may be applied to the model right now
            self._prune(user_id)
        return self.state(user, persona_id)

    # --- helpers ---------------------------------------------------------------------------

    def _row(self, user_id: int, persona_id: int) -> storage.PersonaAdapterPublic | None:
        with self._db.session() as s:
            return storage.get_persona_adapter(session=s, user_id=user_id, persona_id=persona_id)

    def _recorded(self, user_id: int, persona_id: int) -> TunedAdapter | None:
        row = self._row(user_id, persona_id)
        if row is None:
            return None
        return TunedAdapter(row.pairs, row.steps, row.probe_pairs, row.accuracy_before, row.accuracy_after,
                            row.created_at, row.model, self._problem(row))

    def _problem(self, row: storage.PersonaAdapterPublic) -> str | None:
        base = self.base_name()
        if row.model != base:
            return f"it was trained on {row.model}, and the app now runs {base}; tune again"
        if not (self.root / row.path / "adapter_config.json").is_file():
            return "its files are missing; tune again"
        # Tuning refuses an app-wide adapter, so base_name() differing above covers that case too.
        return None

    def _prune(self, user_id: int) -> None:
        """Remove the user's adapter folders that no record names (replaced, removed, or of deleted personas).

        Callers hold the engine lock or run before any tuning can start, so no folder being written is lost."""
        folder = self.root / str(user_id)
        if not folder.is_dir():
            return
        with self._db.session() as s:
            kept = {Path(r.path).name for r in storage.list_persona_adapters(session=s, user_id=user_id)}
        for child in folder.iterdir():
            if child.is_dir() and child.name not in kept:
                shutil.rmtree(child, ignore_errors=True)
