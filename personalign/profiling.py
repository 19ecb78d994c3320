"""The profile service: infer a persona's direction from its behaviour and apply what the user accepts.

Behaviour is the current persona version's UGC and pairwise items, plus the ratings and
picks kept from chat while the persona's "learn from my ratings in chat" consent is on.
A proposal names the version it was computed from; accepting it saves a new version with
only the accepted dimensions changed, and is refused if the persona has moved on since,
so nothing the user saved in between is overwritten.

It knows no UI and no SQL (storage's typed functions do the queries); the inferrers own
the models.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import storage
from personalign.accounts import AccountService
from personalign.embeddings import Embedder, default_embedder
from personalign.engine import Engine
from personalign.errors import NotFoundError, UserError, user_errors
from personalign.persona import Persona, from_record, to_record
from personalign.personas import PersonaService, PersonaState
from personalign.profile_inference import (
    BehaviourItem,
    EmbeddingInferrer,
    ModelInferrer,
    ProfileInference,
    ProfileInferrer,
    Progress,
    SliderChange,
    items_from_events,
    items_from_persona,
    propose_changes,
    unique_items,
)

logger = logging.getLogger(__name__)

METHODS = ("embedding", "model")


@dataclass(frozen=True)
class Proposal:
    """Slider changes inferred for one persona version, and the inference behind them."""

    persona_id: int
    base_version_id: int
    base_version_number: int
    method: str
    inference: ProfileInference
    changes: tuple[SliderChange, ...]
    chat_items: int  # how many of the items came from chat ratings

    @property
    def item_count(self) -> int:
        return self.inference.item_count


@dataclass(frozen=True)
class Behaviour:
    """What a persona has shown of itself: its own items, then the chat's it consented to keep."""

    row: storage.PersonaPublic
    persona: Persona  # the current version
    items: tuple[BehaviourItem, ...]  # without repeats
    chat_items: int  # how many of them came from chat ratings and picks

    def hint(self) -> str:
        """How to give the persona more behaviour, for a message that says it has too little."""
        more = "add posts (UGC) or pairwise choices to " + self.row.name
        return more if self.row.learn_from_chat else more + ", or turn on learning from your ratings and rate answers in chat"


def gather_behaviour(db: storage.Database, user_id: int, persona_id: int) -> Behaviour:
    """The persona's behaviour now; ``NotFoundError`` when it is not the user's."""
    with db.session() as s:
        row = storage.get_persona(session=s, user_id=user_id, persona_id=persona_id)
        if row is None:
            raise NotFoundError(f"Persona {persona_id} was not found.")
        # Chat ratings count only while the user consents to learning from them.
        events = storage.list_preference_events(session=s, user_id=user_id, persona_id=persona_id) \
            if row.learn_from_chat else []
    persona = from_record(row.data)
    own = items_from_persona(persona)
    items = unique_items([*own, *items_from_events(events)])
    return Behaviour(row, persona, tuple(items), len(items) - len(unique_items(own)))


class ProfileService:
    """Profile inference and consent, scoped to one signed-in user per call."""

    def __init__(
        self,
        db: storage.Database,
        accounts: AccountService,
        personas: PersonaService,
        engine: Engine | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        self._db = db
        self._accounts = accounts
        self._personas = personas
        # Building an inferrer loads nothing: the embedder loads on its first encode.
        self._inferrers: dict[str, ProfileInferrer] = {
            "embedding": EmbeddingInferrer(embedder if embedder is not None else default_embedder())
        }
        if engine is not None:
            self._inferrers["model"] = ModelInferrer(engine)

    def _persona_row(self, user_id: int, persona_id: int) -> storage.PersonaPublic:
        with self._db.session() as s:
            row = storage.get_persona(session=s, user_id=user_id, persona_id=persona_id)
        if row is None:
            raise NotFoundError(f"Persona {persona_id} was not found.")
        return row

    def propose(self, user: str | None, persona_id: int, method: str = "embedding",
                progress: Progress | None = None) -> Proposal:
        """Infer the persona's direction from its behaviour and list the slider changes it argues for."""
        if method not in METHODS:
            raise UserError(f"Unknown inference method {method!r}; choose one of {', '.join(METHODS)}.")
        inferrer = self._inferrers.get(method)
        if inferrer is None:
            raise UserError("Inference with the chat model needs the model, and this app runs without one.")
        behaviour = gather_behaviour(self._db, self._accounts.user_id(user), persona_id)
        if not behaviour.items:
            raise UserError(f"There is no behaviour to learn from yet: {behaviour.hint()}.")
        inference = inferrer.infer(list(behaviour.items), progress)
        changes = tuple(propose_changes(behaviour.persona.direction, inference))
        logger.info("inferred %d changes for persona %d from %d items (%s)", len(changes), persona_id,
                    len(behaviour.items), method)
        row = behaviour.row
        return Proposal(
            persona_id=row.id,
            base_version_id=row.current_version_id,
            base_version_number=row.current_version_number,
            method=method,
            inference=inference,
            changes=changes,
            chat_items=behaviour.chat_items,
        )

    def accept(self, user: str | None, persona_id: int, base_version_id: int, accepted: Sequence[int],
               proposal: Proposal) -> PersonaState:
        """Save a new version with the accepted changes (by dimension index) applied to ``base_version_id``.

        Refused when the persona's current version is no longer ``base_version_id``: the
        proposal was computed from an older state, and applying it would silently undo
        whatever was saved since.
        """
        if proposal.persona_id != persona_id or proposal.base_version_id != base_version_id:
            raise UserError("These proposals were made for another persona or version; infer again.")
        chosen = sorted({int(i) for i in accepted})
        if not chosen:
            raise UserError("Select at least one proposed change to accept.")
        by_index = {c.index: c for c in proposal.changes}
        unknown = [i for i in chosen if i not in by_index]
        if unknown:
            raise UserError(f"Dimension {unknown[0]} is not among the proposed changes.")
        user_id = self._accounts.user_id(user)
        note = f"accepted {len(chosen)} inferred change{'s' if len(chosen) != 1 else ''}"
        # One session: the staleness check and the save see the same state.
        with self._db.session() as s, user_errors():
            row = storage.get_persona(session=s, user_id=user_id, persona_id=persona_id)
            if row is None:
                raise NotFoundError(f"Persona {persona_id} was not found.")
            if row.current_version_id != base_version_id:
                raise UserError(
                    f"{row.name} has changed since these changes were proposed (it is now at version "
                    f"{row.current_version_number}); infer again so that nothing you saved is overwritten."
                )
            persona = from_record(row.data).with_values({i: by_index[i].proposed for i in chosen})
            storage.save_persona_version(session=s, user_id=user_id, persona_id=persona_id,
                                         data=to_record(persona), note=note)
        return self._personas.load(user, persona_id)

    def learning(self, user: str | None, persona_id: int) -> bool:
        """Whether chat ratings with this persona are kept and learned from."""
        return self._persona_row(self._accounts.user_id(user), persona_id).learn_from_chat

    def set_learning(self, user: str | None, persona_id: int, enabled: bool) -> bool:
        """Give or withdraw consent to keep and learn from chat ratings with this persona; the new state."""
        user_id = self._accounts.user_id(user)
        with self._db.session() as s, user_errors():
            row = storage.set_persona_learning(session=s, user_id=user_id, persona_id=persona_id, enabled=bool(enabled))
        return row.learn_from_chat
