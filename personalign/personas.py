"""The persona service: what the UI and CLI call to keep a user's personas.

It turns `Persona` values into stored versions and back, scoped to one user on every
call, and maps storage's not-found into a `NotFoundError` with a readable message. It
knows nothing of the UI, the model or SQL (storage's typed functions do the queries).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import storage
from personalign.accounts import AccountService
from personalign.errors import NotFoundError, user_errors
from personalign.persona import Persona, dumps, from_record, loads, to_record


@dataclass(frozen=True)
class PersonaSummary:
    id: int
    name: str
    version_number: int
    updated_at: datetime


@dataclass(frozen=True)
class PersonaState:
    """One persona as it stands at one version."""

    id: int
    name: str
    version_id: int
    version_number: int
    persona: Persona


@dataclass(frozen=True)
class VersionSummary:
    id: int
    number: int
    note: str
    created_at: datetime


class PersonaService:
    """Typed persona operations for one signed-in user at a time."""

    def __init__(self, db: storage.Database, accounts: AccountService) -> None:
        self._db = db
        self._accounts = accounts

    def list(self, user: str | None) -> list[PersonaSummary]:
        with self._db.session() as s:
            rows = storage.list_personas(session=s, user_id=self._accounts.user_id(user))
        return [PersonaSummary(p.id, p.name, p.current_version_number, p.updated_at) for p in rows]

    def create(self, user: str | None, name: str, persona: Persona, note: str = "created") -> PersonaState:
        with self._db.session() as s, user_errors():
            row = storage.create_persona(
                session=s, user_id=self._accounts.user_id(user), name=name, data=to_record(persona), note=note
            )
        return _state(row)

    def load(self, user: str | None, persona_id: int) -> PersonaState:
        with self._db.session() as s:
            row = storage.get_persona(session=s, user_id=self._accounts.user_id(user), persona_id=persona_id)
        if row is None:
            raise NotFoundError(f"Persona {persona_id} was not found.")
        return _state(row)

    def save(self, user: str | None, persona_id: int, persona: Persona, note: str = "") -> PersonaState:
        """Store the persona as a new version; earlier versions stay restorable."""
        with self._db.session() as s, user_errors():
            storage.save_persona_version(
                session=s, user_id=self._accounts.user_id(user), persona_id=persona_id, data=to_record(persona), note=note
            )
        return self.load(user, persona_id)

    def versions(self, user: str | None, persona_id: int) -> list[VersionSummary]:
        with self._db.session() as s:
            rows = storage.list_persona_versions(session=s, user_id=self._accounts.user_id(user), persona_id=persona_id)
        return [VersionSummary(v.id, v.number, v.note, v.created_at) for v in rows]

    def restore(self, user: str | None, persona_id: int, version_id: int) -> PersonaState:
        """Make an earlier version current again, as a new version (nothing is overwritten)."""
        with self._db.session() as s, user_errors():
            storage.restore_persona_version(
                session=s, user_id=self._accounts.user_id(user), persona_id=persona_id, version_id=version_id
            )
        return self.load(user, persona_id)

    def version(self, user: str | None, version_id: int) -> Persona:
        """The persona as it was at one stored version."""
        with self._db.session() as s:
            row = storage.get_persona_version(session=s, user_id=self._accounts.user_id(user), version_id=version_id)
        if row is None:
            raise NotFoundError(f"Persona version {version_id} was not found.")
        return from_record(row.data)

    def rename(self, user: str | None, persona_id: int, name: str) -> PersonaState:
        with self._db.session() as s, user_errors():
            storage.rename_persona(session=s, user_id=self._accounts.user_id(user), persona_id=persona_id, name=name)
        return self.load(user, persona_id)

    def delete(self, user: str | None, persona_id: int) -> None:
        with self._db.session() as s:
            if not storage.delete_persona(session=s, user_id=self._accounts.user_id(user), persona_id=persona_id):
                raise NotFoundError(f"Persona {persona_id} was not found.")

    def export_json(self, user: str | None, persona_id: int) -> str:
        """The current version as AlignX-shaped JSON text."""
        return dumps(self.load(user, persona_id).persona)

    def import_json(self, user: str | None, name: str, text: str | bytes) -> PersonaState:
        """A new persona from JSON text; invalid JSON raises PersonaFormatError and stores nothing."""
        return self.create(user, name, loads(text), note="imported")


def _state(row: storage.PersonaPublic) -> PersonaState:
    return PersonaState(row.id, row.name, row.current_version_id, row.current_version_number, from_record(row.data))
