"""SQLModel classes for every stored entity.

Each entity is a family: ``XBase`` (fields the caller supplies, with their
validation rules), ``X`` (the ``table=True`` row) and ``XPublic`` (the read
model handed out of the storage package). The tables mirror the DDL in
``migrations.py``; the database schema itself is created there, never from
this metadata. This module does not query anything.
"""

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator
from sqlalchemy import Integer, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from .columns import JSONObject, UTCDateTime
from .passwords import MIN_PASSWORD_LENGTH

# Validators raise ValueError with a sentence a person can read, because the app
# shows storage's validation messages to its users as they are.
_USERNAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


def _username(value: str) -> str:
    if not _USERNAME.fullmatch(value):
        raise ValueError("a username is 1 to 64 letters, digits, '.', '_' or '-'")
    return value


def _password(value: str) -> str:
    if len(value) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    return value


def _stripped(what: str, max_length: int) -> AfterValidator:
    def check(value: str) -> str:
        value = value.strip()
        if not 1 <= len(value) <= max_length:
            raise ValueError(f"{what} must be 1 to {max_length} characters")
        return value

    return AfterValidator(check)


def _json_copy(value: dict[str, Any]) -> dict[str, Any]:
    # Failing here rather than at flush names the problem; the copy also detaches
    # the stored dict from the caller's object.
    try:
        copy: dict[str, Any] = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"data must be plain JSON: {exc}") from exc
    return copy


Username = Annotated[str, AfterValidator(_username)]
Password = Annotated[str, AfterValidator(_password)]
PersonaName = Annotated[str, _stripped("a persona name", 100)]
Title = Annotated[str, _stripped("a title", 200)]
Mode = Annotated[str, _stripped("a mode", 50)]
Memory = Annotated[str, _stripped("a memory policy", 50)]
Kind = Annotated[str, _stripped("a kind", 50)]
Role = Literal["user", "assistant"]
JSONData = Annotated[dict[str, Any], AfterValidator(_json_copy)]


def _timestamp() -> Any:
    return Field(default_factory=utcnow, sa_type=UTCDateTime)


def _owner() -> Any:
    return Field(foreign_key="users.id", ondelete="CASCADE")


# --- users -----------------------------------------------------------------


class UserBase(SQLModel):
    username: Username = Field(unique=True, sa_type=Text)


class UserCreate(UserBase):
    password: Password


class User(UserBase, table=True):
    __tablename__ = "users"
    id: int | None = Field(default=None, primary_key=True)
    password_hash: str | None = None
    created_at: datetime = _timestamp()


class UserPublic(UserBase):
    """A user as the app sees one: never the password hash."""

    id: int
    created_at: datetime


# --- personas ----------------------------------------------------------------


class PersonaBase(SQLModel):
    name: PersonaName = Field(sa_type=Text)


class Persona(PersonaBase, table=True):
    __tablename__ = "personas"
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = _owner()
    created_at: datetime = _timestamp()
    updated_at: datetime = _timestamp()
    # No foreign key: personas and versions would reference each other in a cycle.
    current_version_id: int | None = None
    # Consent: only when set are the user's chat ratings with this persona kept as its behaviour.
    learn_from_chat: bool = False


class PersonaPublic(PersonaBase):
    """A persona together with the number and data of its current version."""

    id: int
    user_id: int
    created_at: datetime
    updated_at: datetime
    current_version_id: int
    current_version_number: int
    data: JSONData
    learn_from_chat: bool


class PersonaVersionBase(SQLModel):
    data: JSONData = Field(sa_type=JSONObject)
    note: str = ""


class PersonaVersion(PersonaVersionBase, table=True):
    __tablename__ = "persona_versions"
    __table_args__ = (UniqueConstraint("persona_id", "number"),)
    id: int | None = Field(default=None, primary_key=True)
    persona_id: int = Field(foreign_key="personas.id", ondelete="CASCADE")
    user_id: int = _owner()
    number: int
    created_at: datetime = _timestamp()


class PersonaVersionPublic(PersonaVersionBase):
    """One saved, never-changing state of a persona."""

    id: int
    persona_id: int
    user_id: int
    number: int
    created_at: datetime


# --- conversations -------------------------------------------------------------


class ConversationBase(SQLModel):
    title: Title = Field(sa_type=Text)
    mode: Mode = Field(default="none", sa_type=Text)
    memory: Memory = Field(default="dense", sa_type=Text)


class Conversation(ConversationBase, table=True):
    __tablename__ = "conversations"
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = _owner()
    persona_id: int | None = Field(default=None, foreign_key="personas.id", ondelete="SET NULL")
    created_at: datetime = _timestamp()
    updated_at: datetime = _timestamp()


class ConversationPublic(ConversationBase):
    """A conversation's header; its messages are listed separately."""

    id: int
    user_id: int
    persona_id: int | None
    created_at: datetime
    updated_at: datetime


# --- messages ------------------------------------------------------------------


class MessageBase(SQLModel):
    role: Role = Field(sa_type=Text)
    content: str
    mode: Mode | None = Field(default=None, sa_type=Text)
    # The exact prompt the model received, kept so an inspector can show it later.
    prompt: str | None = None


class Message(MessageBase, table=True):
    __tablename__ = "messages"
    id: int | None = Field(default=None, primary_key=True)
    conversation_id: int = Field(foreign_key="conversations.id", ondelete="CASCADE")
    user_id: int = _owner()
    persona_version_id: int | None = Field(default=None, foreign_key="persona_versions.id", ondelete="SET NULL")
    created_at: datetime = _timestamp()


class MessagePublic(MessageBase):
    """One message, with the persona version, mode and prompt that produced it."""

    id: int
    conversation_id: int
    user_id: int
    persona_version_id: int | None
    created_at: datetime


# --- feedback ------------------------------------------------------------------


class FeedbackBase(SQLModel):
    value: Literal[-1, 1] = Field(sa_type=Integer)


class Feedback(FeedbackBase, table=True):
    __tablename__ = "feedback"
    __table_args__ = (UniqueConstraint("user_id", "message_id"),)
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = _owner()
    message_id: int = Field(foreign_key="messages.id", ondelete="CASCADE")
    created_at: datetime = _timestamp()


class FeedbackPublic(FeedbackBase):
    """One user's +1/-1 rating of one message."""

    id: int
    user_id: int
    message_id: int
    created_at: datetime


# --- memory snapshots ----------------------------------------------------------


class MemorySnapshotBase(SQLModel):
    """Where a conversation's compressed KV cache is saved, and what it was built from."""

    path: str = Field(min_length=1)
    policy: Memory = Field(sa_type=Text)
    model: str = Field(min_length=1)
    last_message_id: int
    message_count: int = Field(ge=0)
    kv_bytes: int = Field(ge=0)


class MemorySnapshot(MemorySnapshotBase, table=True):
    __tablename__ = "memory_snapshots"
    id: int | None = Field(default=None, primary_key=True)
    conversation_id: int = Field(foreign_key="conversations.id", ondelete="CASCADE", unique=True)
    user_id: int = _owner()
    updated_at: datetime = _timestamp()


class MemorySnapshotPublic(MemorySnapshotBase):
    """The one saved cache of a conversation; the file itself lives outside the database."""

    id: int
    conversation_id: int
    user_id: int
    updated_at: datetime


# --- preference events ---------------------------------------------------------


class PreferenceEventBase(SQLModel):
    """A rating or a pick given in chat, kept as pairwise behaviour of a persona.

    A thumbs-up keeps the answer as ``chosen``, a thumbs-down as ``rejected``; a pick
    of the better of two answers keeps both.
    """

    kind: Literal["thumb", "pick"] = Field(sa_type=Text)
    prompt: str
    chosen: str | None = None
    rejected: str | None = None


class PreferenceEvent(PreferenceEventBase, table=True):
    __tablename__ = "preference_events"
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = _owner()
    persona_id: int = Field(foreign_key="personas.id", ondelete="CASCADE")
    message_id: int | None = Field(default=None, foreign_key="messages.id", ondelete="SET NULL")
    created_at: datetime = _timestamp()


class PreferenceEventPublic(PreferenceEventBase):
    id: int
    user_id: int
    persona_id: int
    message_id: int | None
    created_at: datetime


# --- studio runs ---------------------------------------------------------------


class StudioRunBase(SQLModel):
    kind: Kind = Field(sa_type=Text)
    title: Title = Field(sa_type=Text)
    data: JSONData = Field(sa_type=JSONObject)


class StudioRun(StudioRunBase, table=True):
    __tablename__ = "studio_runs"
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = _owner()
    created_at: datetime = _timestamp()


class StudioRunPublic(StudioRunBase):
    """A saved comparison or sweep from the controllability studio."""

    id: int
    user_id: int
    created_at: datetime


# --- persona adapters ----------------------------------------------------------


class PersonaAdapterBase(SQLModel):
    """Where a persona's own DPO adapter is saved, what it was trained on and how it probed."""

    # Relative to the adapters folder, so the data folder can move without breaking rows.
    path: str = Field(min_length=1)
    model: str = Field(min_length=1)
    kind: Literal["pba", "raw"] = Field(sa_type=Text)
    pairs: int = Field(ge=0)
    steps: int = Field(ge=0)
    probe_pairs: int = Field(ge=0)
    # Share of held-out probe pairs the model prefers correctly, before and after training;
    # None when there were too few pairs to probe.
    accuracy_before: float | None = Field(default=None, ge=0, le=1)
    accuracy_after: float | None = Field(default=None, ge=0, le=1)


class PersonaAdapter(PersonaAdapterBase, table=True):
    __tablename__ = "persona_adapters"
    id: int | None = Field(default=None, primary_key=True)
    persona_id: int = Field(foreign_key="personas.id", ondelete="CASCADE", unique=True)
    user_id: int = _owner()
    created_at: datetime = _timestamp()


class PersonaAdapterPublic(PersonaAdapterBase):
    """The one trained adapter of a persona; the files themselves live outside the database."""

    id: int
    persona_id: int
    user_id: int
    created_at: datetime
