"""Typed reads and writes for everything Personalign stores; the only module that queries.

Every function that touches user data takes ``user_id`` and only ever sees that
user's rows: for another user's row, getters return None, deletes return False
and other writes raise NotFound, exactly as for a row that does not exist.
Invalid input raises ValueError before anything is written. Callers own the
session and so the transaction; this module knows nothing about engines, files,
the UI or the language model.
"""

import logging
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_core import ErrorDetails
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, SQLModel, col, delete, func, insert, select

from .models import (
    Conversation,
    ConversationPublic,
    Feedback,
    FeedbackBase,
    FeedbackPublic,
    MemorySnapshot,
    MemorySnapshotBase,
    MemorySnapshotPublic,
    Message,
    MessagePublic,
    Persona,
    PersonaAdapter,
    PersonaAdapterBase,
    PersonaAdapterPublic,
    PersonaPublic,
    PersonaVersion,
    PersonaVersionBase,
    PersonaVersionPublic,
    PreferenceEvent,
    PreferenceEventPublic,
    StudioRun,
    StudioRunPublic,
    User,
    UserCreate,
    UserPublic,
    utcnow,
)
from .passwords import hash_password, verify_password

logger = logging.getLogger(__name__)

LOCAL_USERNAME = "local"


class NotFound(LookupError):
    """The row does not exist or belongs to another user; callers cannot tell which."""


Owned = TypeVar("Owned", Persona, PersonaVersion, Conversation, Message, StudioRun)
Edited = TypeVar("Edited", Persona, Conversation)
Row = TypeVar("Row", bound=SQLModel)


def _owned(session: Session, model: type[Owned], row_id: int, user_id: int) -> Owned | None:
    """The one ownership check: the row, if it exists and belongs to ``user_id``."""
    row = session.get(model, row_id)
    return row if row is not None and row.user_id == user_id else None


def _require(session: Session, model: type[Owned], row_id: int, user_id: int) -> Owned:
    row = _owned(session, model, row_id, user_id)
    if row is None:
        raise NotFound(f"{model.__name__} {row_id} not found")
    return row


def _require_persona(session: Session, persona_id: int | None, user_id: int) -> None:
    if persona_id is not None:
        _require(session, Persona, persona_id, user_id)


def _describe(error: ErrorDetails) -> str:
    if error["type"] == "value_error":  # raised by our own validators, already a full sentence
        return str(error.get("ctx", {}).get("error", error["msg"]))
    return f"{'.'.join(map(str, error['loc']))}: {error['msg']}"


def _valid(model: type[Row], /, **values: Any) -> Row:
    """``model.model_validate(values)``, with pydantic's report reduced to a short ValueError."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ValueError("; ".join(_describe(error) for error in exc.errors())) from exc


def _insert(session: Session, model: type[Row], /, **values: Any) -> Row:
    row = _valid(model, **values)
    session.add(row)
    session.flush()
    return row


def _update(session: Session, row: Edited, **changes: Any) -> Edited:
    """Apply ``changes`` after validating them by the table's own rules; bump updated_at."""
    valid = _valid(type(row), **(row.model_dump() | changes))
    for name in changes:
        setattr(row, name, getattr(valid, name))
    row.updated_at = utcnow()
    session.add(row)
    session.flush()
    return row


def _put(session: Session, existing: Row | None, table: type[Row], content: SQLModel, stamp: str,
         **keys: Any) -> Row:
    """Insert ``content`` as a ``table`` row with ``keys``, or overwrite ``existing`` with it and
    restamp its ``stamp`` column: for tables that hold one row per owner object."""
    if existing is None:
        row = table(**keys, **content.model_dump())
    else:
        row = existing
        for name, value in content.model_dump().items():
            setattr(row, name, value)
        setattr(row, stamp, utcnow())
    session.add(row)
    session.flush()
    return row


def _drop(session: Session, row: SQLModel | None) -> bool:
    """Delete ``row`` if there is one; whether there was."""
    if row is None:
        return False
    session.delete(row)
    session.flush()
    return True


def _delete(session: Session, model: type[Owned], row_id: int, user_id: int) -> bool:
    row = _owned(session, model, row_id, user_id)
    if row is None:
        return False
    session.delete(row)
    session.flush()
    # The schema's ON DELETE clauses changed rows the session may hold; reload them.
    session.expire_all()
    return True


# --- users -----------------------------------------------------------------


def _user_named(session: Session, username: str) -> User | None:
    # The column is COLLATE NOCASE, so "Alice" finds "alice".
    return session.exec(select(User).where(User.username == username)).first()


def create_user(*, session: Session, username: str, password: str) -> UserPublic:
    """Create a password-protected user; ValueError for a bad or taken name or a short password."""
    new = _valid(UserCreate, username=username, password=password)
    if new.username.lower() == LOCAL_USERNAME or _user_named(session, new.username) is not None:
        raise ValueError(f"username {new.username!r} is not available")
    user = _insert(session, User, username=new.username, password_hash=hash_password(new.password))
    logger.info("created user %s", user.username)
    return UserPublic.model_validate(user)


def authenticate(*, session: Session, username: str, password: str) -> UserPublic | None:
    """The user if the password is right, else None (also for unknown or password-less users)."""
    user = _user_named(session, username)
    if not verify_password(password, user.password_hash if user is not None else None):
        return None
    return UserPublic.model_validate(user)


def get_or_create_local_user(*, session: Session) -> UserPublic:
    """The single-user mode's user: it has no password and can never authenticate."""
    user = _user_named(session, LOCAL_USERNAME) or _insert(session, User, username=LOCAL_USERNAME)
    return UserPublic.model_validate(user)


def get_user(*, session: Session, username: str) -> UserPublic | None:
    """The user with this name (case-insensitive), or None."""
    user = _user_named(session, username)
    return None if user is None else UserPublic.model_validate(user)


def list_users(*, session: Session) -> list[UserPublic]:
    """All users, oldest first."""
    return [UserPublic.model_validate(u) for u in session.exec(select(User).order_by(col(User.id)))]


# --- personas ----------------------------------------------------------------


def _persona_public(persona: Persona, version: PersonaVersion) -> PersonaPublic:
    return PersonaPublic.model_validate(
        persona, update={"current_version_number": version.number, "data": version.data}
    )


def _current_version(session: Session, persona: Persona) -> PersonaVersion:
    # .one(): every persona is created together with its first version.
    return session.exec(select(PersonaVersion).where(col(PersonaVersion.id) == persona.current_version_id)).one()


def _add_version(session: Session, persona: Persona, content: PersonaVersionBase) -> PersonaVersion:
    # Numbered inside the INSERT itself, so concurrent saves cannot pick the same number.
    next_number = (
        select(func.coalesce(func.max(PersonaVersion.number), 0) + 1)
        .where(PersonaVersion.persona_id == persona.id)
        .scalar_subquery()
    )
    values = content.model_dump() | {"persona_id": persona.id, "user_id": persona.user_id, "created_at": utcnow()}
    version: PersonaVersion = session.exec(
        insert(PersonaVersion).values(number=next_number, **values).returning(PersonaVersion)
    ).scalar_one()
    _update(session, persona, current_version_id=version.id)
    return version


def create_persona(*, session: Session, user_id: int, name: str, data: dict[str, Any], note: str = "") -> PersonaPublic:
    """Create a persona together with its version 1 holding ``data``."""
    content = _valid(PersonaVersionBase, data=data, note=note)
    persona = _insert(session, Persona, user_id=user_id, name=name)
    return _persona_public(persona, _add_version(session, persona, content))


def list_personas(*, session: Session, user_id: int) -> list[PersonaPublic]:
    """The user's personas, most recently updated first."""
    rows = session.exec(
        select(Persona, PersonaVersion)
        .join(PersonaVersion, col(PersonaVersion.id) == Persona.current_version_id)
        .where(Persona.user_id == user_id)
        .order_by(col(Persona.updated_at).desc(), col(Persona.id).desc())
    )
    return [_persona_public(persona, version) for persona, version in rows]


def get_persona(*, session: Session, user_id: int, persona_id: int) -> PersonaPublic | None:
    """The persona with its current data, or None."""
    persona = _owned(session, Persona, persona_id, user_id)
    return None if persona is None else _persona_public(persona, _current_version(session, persona))


def rename_persona(*, session: Session, user_id: int, persona_id: int, name: str) -> PersonaPublic:
    """Rename a persona; its versions are untouched."""
    persona = _update(session, _require(session, Persona, persona_id, user_id), name=name)
    return _persona_public(persona, _current_version(session, persona))


def set_persona_learning(*, session: Session, user_id: int, persona_id: int, enabled: bool) -> PersonaPublic:
    """Give or withdraw consent to keep chat ratings with this persona as its behaviour."""
    persona = _update(session, _require(session, Persona, persona_id, user_id), learn_from_chat=bool(enabled))
    return _persona_public(persona, _current_version(session, persona))


def delete_persona(*, session: Session, user_id: int, persona_id: int) -> bool:
    """Delete a persona and all its versions; conversations and messages keep existing without it."""
    return _delete(session, Persona, persona_id, user_id)


def save_persona_version(
    *, session: Session, user_id: int, persona_id: int, data: dict[str, Any], note: str = ""
) -> PersonaVersionPublic:
    """Store ``data`` as the persona's new current version; older versions stay as they were."""
    content = _valid(PersonaVersionBase, data=data, note=note)
    persona = _require(session, Persona, persona_id, user_id)
    return PersonaVersionPublic.model_validate(_add_version(session, persona, content))


def list_persona_versions(*, session: Session, user_id: int, persona_id: int) -> list[PersonaVersionPublic]:
    """The persona's versions, newest first."""
    versions = session.exec(
        select(PersonaVersion)
        .where(PersonaVersion.user_id == user_id, PersonaVersion.persona_id == persona_id)
        .order_by(col(PersonaVersion.number).desc())
    )
    return [PersonaVersionPublic.model_validate(v) for v in versions]


def get_persona_version(*, session: Session, user_id: int, version_id: int) -> PersonaVersionPublic | None:
    """One persona version, or None."""
    version = _owned(session, PersonaVersion, version_id, user_id)
    return None if version is None else PersonaVersionPublic.model_validate(version)


def restore_persona_version(
    *, session: Session, user_id: int, persona_id: int, version_id: int
) -> PersonaVersionPublic:
    """Make an old version current again by copying it into a new version, so nothing is lost."""
    old = _require(session, PersonaVersion, version_id, user_id)
    if old.persona_id != persona_id:
        raise NotFound(f"PersonaVersion {version_id} not found")
    return save_persona_version(
        session=session,
        user_id=user_id,
        persona_id=persona_id,
        data=old.data,
        note=f"restored from version {old.number}",
    )


# --- conversations -------------------------------------------------------------


def create_conversation(
    *,
    session: Session,
    user_id: int,
    title: str,
    persona_id: int | None = None,
    mode: str = "none",
    memory: str = "dense",
) -> ConversationPublic:
    """Start a conversation, optionally tied to one of the user's personas."""
    _require_persona(session, persona_id, user_id)
    conversation = _insert(
        session, Conversation, user_id=user_id, title=title, persona_id=persona_id, mode=mode, memory=memory
    )
    return ConversationPublic.model_validate(conversation)


def list_conversations(*, session: Session, user_id: int) -> list[ConversationPublic]:
    """The user's conversations, most recently active first."""
    conversations = session.exec(
        select(Conversation)
        .where(Conversation.user_id == user_id)
        .order_by(col(Conversation.updated_at).desc(), col(Conversation.id).desc())
    )
    return [ConversationPublic.model_validate(c) for c in conversations]


def get_conversation(*, session: Session, user_id: int, conversation_id: int) -> ConversationPublic | None:
    """One conversation, or None."""
    conversation = _owned(session, Conversation, conversation_id, user_id)
    return None if conversation is None else ConversationPublic.model_validate(conversation)


def rename_conversation(*, session: Session, user_id: int, conversation_id: int, title: str) -> ConversationPublic:
    """Give a conversation a new title."""
    conversation = _require(session, Conversation, conversation_id, user_id)
    return ConversationPublic.model_validate(_update(session, conversation, title=title))


def update_conversation_settings(
    *,
    session: Session,
    user_id: int,
    conversation_id: int,
    persona_id: int | None,
    mode: str,
    memory: str | None = None,
) -> ConversationPublic:
    """Change which persona (or none), mode and (if given) memory policy a conversation uses from now on."""
    conversation = _require(session, Conversation, conversation_id, user_id)
    _require_persona(session, persona_id, user_id)
    changes: dict[str, Any] = {"persona_id": persona_id, "mode": mode}
    if memory is not None:
        changes["memory"] = memory
    conversation = _update(session, conversation, **changes)
    return ConversationPublic.model_validate(conversation)


def delete_conversation(*, session: Session, user_id: int, conversation_id: int) -> bool:
    """Delete a conversation with its messages and their feedback."""
    return _delete(session, Conversation, conversation_id, user_id)


# --- messages ------------------------------------------------------------------


def add_message(
    *,
    session: Session,
    user_id: int,
    conversation_id: int,
    role: str,
    content: str,
    persona_version_id: int | None = None,
    mode: str | None = None,
    prompt: str | None = None,
) -> MessagePublic:
    """Append a message ("user" or "assistant") and mark the conversation as just active."""
    conversation = _require(session, Conversation, conversation_id, user_id)
    if persona_version_id is not None:
        _require(session, PersonaVersion, persona_version_id, user_id)
    message = _insert(
        session,
        Message,
        conversation_id=conversation_id,
        user_id=user_id,
        role=role,
        content=content,
        persona_version_id=persona_version_id,
        mode=mode,
        prompt=prompt,
    )
    _update(session, conversation)
    return MessagePublic.model_validate(message)


def list_messages(*, session: Session, user_id: int, conversation_id: int) -> list[MessagePublic]:
    """A conversation's messages in the order they were added."""
    messages = session.exec(
        select(Message)
        .where(Message.user_id == user_id, Message.conversation_id == conversation_id)
        .order_by(col(Message.id))
    )
    return [MessagePublic.model_validate(m) for m in messages]


def count_messages(*, session: Session, user_id: int, conversation_id: int) -> int:
    """How many messages a conversation holds (0 for one that is not the user's)."""
    return session.exec(
        select(func.count()).select_from(Message)
        .where(Message.user_id == user_id, Message.conversation_id == conversation_id)
    ).one()


def last_messages(*, session: Session, user_id: int, conversation_id: int, limit: int) -> list[MessagePublic]:
    """A conversation's newest ``limit`` messages, oldest first.

    A turn on a streaming memory needs only these, not a history of thousands of messages.
    """
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ValueError(f"limit must be a whole number >= 0; got {limit!r}")
    newest = session.exec(
        select(Message)
        .where(Message.user_id == user_id, Message.conversation_id == conversation_id)
        .order_by(col(Message.id).desc())
        .limit(limit)
    ).all()
    return [MessagePublic.model_validate(m) for m in reversed(newest)]


def get_message(*, session: Session, user_id: int, message_id: int) -> MessagePublic | None:
    """One message, or None."""
    message = _owned(session, Message, message_id, user_id)
    return None if message is None else MessagePublic.model_validate(message)


def delete_message(*, session: Session, user_id: int, message_id: int) -> bool:
    """Delete one message and its feedback."""
    return _delete(session, Message, message_id, user_id)


# --- feedback ------------------------------------------------------------------


def set_feedback(*, session: Session, user_id: int, message_id: int, value: int) -> FeedbackPublic | None:
    """Rate a message +1 or -1 (replacing an earlier rating), or clear the rating with 0."""
    rating = None if value == 0 else _valid(FeedbackBase, value=value).value
    _require(session, Message, message_id, user_id)
    if rating is None:
        session.exec(delete(Feedback).where(col(Feedback.user_id) == user_id, col(Feedback.message_id) == message_id))
        return None
    # An upsert, so two quick clicks handled by two worker threads cannot collide.
    upsert = (
        sqlite_insert(Feedback)
        .values(user_id=user_id, message_id=message_id, value=rating, created_at=utcnow())
        .on_conflict_do_update(index_elements=["user_id", "message_id"], set_={"value": rating})
        .returning(Feedback)
    )
    feedback = session.exec(upsert, execution_options={"populate_existing": True}).scalar_one()
    return FeedbackPublic.model_validate(feedback)


def list_feedback(*, session: Session, user_id: int, conversation_id: int | None = None) -> list[FeedbackPublic]:
    """The user's ratings, oldest first, optionally only those in one conversation."""
    query = select(Feedback).where(Feedback.user_id == user_id)
    if conversation_id is not None:
        query = query.join(Message, col(Message.id) == Feedback.message_id).where(
            Message.conversation_id == conversation_id
        )
    return [FeedbackPublic.model_validate(f) for f in session.exec(query.order_by(col(Feedback.id)))]


# --- memory snapshots ----------------------------------------------------------


def _snapshot_row(session: Session, user_id: int, conversation_id: int) -> MemorySnapshot | None:
    return session.exec(
        select(MemorySnapshot).where(
            MemorySnapshot.user_id == user_id, MemorySnapshot.conversation_id == conversation_id
        )
    ).first()


def set_memory_snapshot(
    *,
    session: Session,
    user_id: int,
    conversation_id: int,
    path: str,
    policy: str,
    model: str,
    last_message_id: int,
    message_count: int,
    kv_bytes: int,
) -> MemorySnapshotPublic:
    """Record (or replace) the saved compressed cache of a conversation."""
    _require(session, Conversation, conversation_id, user_id)
    content = _valid(
        MemorySnapshotBase,
        path=path,
        policy=policy,
        model=model,
        last_message_id=last_message_id,
        message_count=message_count,
        kv_bytes=kv_bytes,
    )
    row = _put(session, _snapshot_row(session, user_id, conversation_id), MemorySnapshot, content, "updated_at",
               conversation_id=conversation_id, user_id=user_id)
    return MemorySnapshotPublic.model_validate(row)


def get_memory_snapshot(*, session: Session, user_id: int, conversation_id: int) -> MemorySnapshotPublic | None:
    """The conversation's saved cache record, or None."""
    row = _snapshot_row(session, user_id, conversation_id)
    return None if row is None else MemorySnapshotPublic.model_validate(row)


def delete_memory_snapshot(*, session: Session, user_id: int, conversation_id: int) -> bool:
    """Forget the conversation's saved cache record (the caller removes the file)."""
    return _drop(session, _snapshot_row(session, user_id, conversation_id))


# --- persona adapters ------------------------------------------------------------


def _adapter_row(session: Session, user_id: int, persona_id: int) -> PersonaAdapter | None:
    return session.exec(
        select(PersonaAdapter).where(PersonaAdapter.user_id == user_id, PersonaAdapter.persona_id == persona_id)
    ).first()


def set_persona_adapter(
    *,
    session: Session,
    user_id: int,
    persona_id: int,
    path: str,
    model: str,
    kind: str,
    pairs: int,
    steps: int,
    probe_pairs: int,
    accuracy_before: float | None = None,
    accuracy_after: float | None = None,
) -> PersonaAdapterPublic:
    """Record (or replace, after retraining) the persona's own trained adapter."""
    _require(session, Persona, persona_id, user_id)
    content = _valid(
        PersonaAdapterBase,
        path=path,
        model=model,
        kind=kind,
        pairs=pairs,
        steps=steps,
        probe_pairs=probe_pairs,
        accuracy_before=accuracy_before,
        accuracy_after=accuracy_after,
    )
    # A replacement is a new adapter, so it is dated by this training, not the first.
    row = _put(session, _adapter_row(session, user_id, persona_id), PersonaAdapter, content, "created_at",
               persona_id=persona_id, user_id=user_id)
    return PersonaAdapterPublic.model_validate(row)


def get_persona_adapter(*, session: Session, user_id: int, persona_id: int) -> PersonaAdapterPublic | None:
    """The persona's adapter record, or None."""
    row = _adapter_row(session, user_id, persona_id)
    return None if row is None else PersonaAdapterPublic.model_validate(row)


def delete_persona_adapter(*, session: Session, user_id: int, persona_id: int) -> bool:
    """Forget the persona's adapter record (the caller removes the files)."""
    return _drop(session, _adapter_row(session, user_id, persona_id))


def list_persona_adapters(*, session: Session, user_id: int) -> list[PersonaAdapterPublic]:
    """The user's adapter records, oldest first; the folders not among them are orphans."""
    rows = session.exec(
        select(PersonaAdapter).where(PersonaAdapter.user_id == user_id).order_by(col(PersonaAdapter.id))
    )
    return [PersonaAdapterPublic.model_validate(r) for r in rows]


# --- preference events -----------------------------------------------------------


def add_preference_event(
    *,
    session: Session,
    user_id: int,
    persona_id: int,
    kind: str,
    prompt: str,
    chosen: str | None = None,
    rejected: str | None = None,
    message_id: int | None = None,
) -> PreferenceEventPublic:
    """Keep one rating (kind "thumb") or pick (kind "pick") as behaviour of the persona."""
    _require(session, Persona, persona_id, user_id)
    if message_id is not None:
        _require(session, Message, message_id, user_id)
    if not (chosen or rejected):
        raise ValueError("a preference event needs a chosen or a rejected answer")
    if kind == "pick" and not (chosen and rejected):
        raise ValueError("a pick needs both the chosen and the rejected answer")
    event = _insert(
        session,
        PreferenceEvent,
        user_id=user_id,
        persona_id=persona_id,
        kind=kind,
        prompt=prompt,
        chosen=chosen or None,
        rejected=rejected or None,
        message_id=message_id,
    )
    return PreferenceEventPublic.model_validate(event)


def list_preference_events(*, session: Session, user_id: int, persona_id: int) -> list[PreferenceEventPublic]:
    """The persona's stored ratings and picks, oldest first."""
    events = session.exec(
        select(PreferenceEvent)
        .where(PreferenceEvent.user_id == user_id, PreferenceEvent.persona_id == persona_id)
        .order_by(col(PreferenceEvent.id))
    )
    return [PreferenceEventPublic.model_validate(e) for e in events]


def delete_preference_events_for_message(*, session: Session, user_id: int, message_id: int) -> int:
    """Drop the events that came from one message (its rating was cleared or changed); the count."""
    result = session.exec(
        delete(PreferenceEvent).where(
            col(PreferenceEvent.user_id) == user_id, col(PreferenceEvent.message_id) == message_id
        )
    )
    session.flush()
    return int(result.rowcount or 0)


# --- studio runs -----------------------------------------------------------------


def save_studio_run(*, session: Session, user_id: int, kind: str, title: str, data: dict[str, Any]) -> StudioRunPublic:
    """Keep one studio result (a comparison or a sweep) as plain JSON."""
    return StudioRunPublic.model_validate(_insert(session, StudioRun, user_id=user_id, kind=kind, title=title, data=data))


def list_studio_runs(*, session: Session, user_id: int) -> list[StudioRunPublic]:
    """The user's saved studio results, newest first."""
    runs = session.exec(
        select(StudioRun).where(StudioRun.user_id == user_id).order_by(col(StudioRun.id).desc())
    )
    return [StudioRunPublic.model_validate(r) for r in runs]


def get_studio_run(*, session: Session, user_id: int, run_id: int) -> StudioRunPublic | None:
    """One saved studio result, or None."""
    run = _owned(session, StudioRun, run_id, user_id)
    return None if run is None else StudioRunPublic.model_validate(run)


def delete_studio_run(*, session: Session, user_id: int, run_id: int) -> bool:
    """Delete one saved studio result."""
    return _delete(session, StudioRun, run_id, user_id)
