"""The chat service: conversations, aligned replies streamed from the shared model, feedback.

A reply is built from the stored history, the chosen persona version and the alignment
mode through the pure prompt builders, streamed from the engine, and stored with the exact
prompt the model received. The user's message is stored before generation starts and a
stopped reply is stored as far as it got, so nothing typed or generated is lost.
It knows no UI and no SQL; the engine owns the model and its lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import storage
from personalign.accounts import AccountService
from personalign.engine import Engine
from personalign.errors import NotFoundError, UserError, user_errors
from personalign.generation import GenerationConfig
from personalign.personas import PersonaService
from personalign.prompts import Message, Mode, build_messages

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 8_000
TITLE_CHARS = 48


@dataclass(frozen=True)
class ConversationSummary:
    id: int
    title: str
    persona_id: int | None
    mode: str
    updated_at: datetime


@dataclass(frozen=True)
class ChatTurn:
    """One stored message as the chat shows it."""

    id: int
    role: str
    content: str
    prompt: str | None
    feedback: int


@dataclass(frozen=True)
class ReplyUpdate:
    """The reply so far; the last update of a stream has `done` set and the stored ids."""

    conversation_id: int
    text: str
    prompt: str
    done: bool = False
    stopped: bool = False
    assistant_message_id: int | None = None
    tokens_per_second: float | None = None


class ChatService:
    """Chat operations for one signed-in user at a time, over one shared engine."""

    def __init__(self, db: storage.Database, engine: Engine, accounts: AccountService, personas: PersonaService) -> None:
        self._db = db
        self._engine = engine
        self._accounts = accounts
        self._personas = personas
        self._stops: dict[str | None, threading.Event] = {}
        self._stops_lock = threading.Lock()

    # Conversations -------------------------------------------------------------------------

    def conversations(self, user: str | None) -> list[ConversationSummary]:
        with self._db.session() as s:
            rows = storage.list_conversations(session=s, user_id=self._accounts.user_id(user))
        return [_summary(c) for c in rows]

    def new_conversation(self, user: str | None, title: str = "New chat", persona_id: int | None = None,
                         mode: Mode | str = Mode.NONE) -> ConversationSummary:
        with self._db.session() as s, user_errors():
            row = storage.create_conversation(session=s, user_id=self._accounts.user_id(user), title=title,
                                              persona_id=persona_id, mode=Mode(mode).value)
        return _summary(row)

    def conversation(self, user: str | None, conversation_id: int) -> ConversationSummary:
        with self._db.session() as s:
            row = storage.get_conversation(session=s, user_id=self._accounts.user_id(user), conversation_id=conversation_id)
        if row is None:
            raise NotFoundError(f"Conversation {conversation_id} was not found.")
        return _summary(row)

    def rename(self, user: str | None, conversation_id: int, title: str) -> None:
        with self._db.session() as s, user_errors():
            storage.rename_conversation(session=s, user_id=self._accounts.user_id(user),
                                        conversation_id=conversation_id, title=title)

    def delete(self, user: str | None, conversation_id: int) -> None:
        with self._db.session() as s:
            if not storage.delete_conversation(session=s, user_id=self._accounts.user_id(user),
                                               conversation_id=conversation_id):
                raise NotFoundError(f"Conversation {conversation_id} was not found.")

    def turns(self, user: str | None, conversation_id: int) -> list[ChatTurn]:
        self.conversation(user, conversation_id)  # not theirs reads as not found, not as empty
        user_id = self._accounts.user_id(user)
        with self._db.session() as s, user_errors():
            messages = storage.list_messages(session=s, user_id=user_id, conversation_id=conversation_id)
            votes = {f.message_id: f.value for f in storage.list_feedback(session=s, user_id=user_id,
                                                                            conversation_id=conversation_id)}
        return [ChatTurn(m.id, m.role, m.content, m.prompt, votes.get(m.id, 0)) for m in messages]

    # Replies -------------------------------------------------------------------------------

    def send(self, user: str | None, conversation_id: int | None, text: str, *, persona_id: int | None,
             mode: Mode | str, generation: GenerationConfig) -> Iterator[ReplyUpdate]:
        """Store the user's message and stream an aligned reply; a None conversation starts one."""
        text = _check_message(text)
        mode = Mode(mode)
        if conversation_id is None:
            conversation_id = self.new_conversation(user, _title(text), persona_id, mode).id
        user_id = self._accounts.user_id(user)
        with self._db.session() as s, user_errors():
            storage.update_conversation_settings(session=s, user_id=user_id, conversation_id=conversation_id,
                                                 persona_id=persona_id, mode=mode.value)
            storage.add_message(session=s, user_id=user_id, conversation_id=conversation_id, role="user", content=text)
        return self._reply(user, conversation_id, persona_id, mode, generation)

    def regenerate(self, user: str | None, conversation_id: int, *, persona_id: int | None, mode: Mode | str,
                   generation: GenerationConfig) -> Iterator[ReplyUpdate]:
        """Replace the last reply with a new one for the same user message."""
        turns = self.turns(user, conversation_id)
        if not turns or (turns[-1].role == "assistant" and len(turns) < 2):
            raise UserError("There is no message to answer again yet.")
        if turns[-1].role == "assistant":
            with self._db.session() as s:
                storage.delete_message(session=s, user_id=self._accounts.user_id(user), message_id=turns[-1].id)
        return self._reply(user, conversation_id, persona_id, Mode(mode), generation)

    def preview_prompt(self, user: str | None, conversation_id: int | None, text: str, *,
                       persona_id: int | None, mode: Mode | str) -> str:
        """The exact prompt the model would receive if `text` were sent now."""
        history = self._history(user, conversation_id) if conversation_id is not None else []
        messages = self._messages(user, history, text, persona_id, Mode(mode), max_new_tokens=0)[0]
        return self._engine.render(messages)

    def stop(self, user: str | None) -> None:
        """Stop the user's reply in progress, if any; it is stored as far as it got."""
        with self._stops_lock:
            event = self._stops.get(user)
        if event is not None:
            event.set()

    def feedback(self, user: str | None, message_id: int, value: int) -> None:
        """Thumbs up (+1), down (-1) or cleared (0) on one of the user's messages."""
        with self._db.session() as s, user_errors():
            storage.set_feedback(session=s, user_id=self._accounts.user_id(user), message_id=message_id, value=value)

    def _reply(self, user: str | None, conversation_id: int, persona_id: int | None, mode: Mode,
               generation: GenerationConfig) -> Iterator[ReplyUpdate]:
        history = self._history(user, conversation_id)
        if not history or history[-1]["role"] != "user":
            raise UserError("The conversation does not end with a message to answer.")
        messages, version_id = self._messages(user, history[:-1], history[-1]["content"], persona_id, mode,
                                              generation.max_new_tokens)
        prompt = self._engine.render(messages)
        stop = threading.Event()
        with self._stops_lock:
            self._stops[user] = stop
        return self._stream(user, conversation_id, messages, prompt, version_id, mode, generation, stop)

    def _stream(self, user, conversation_id, messages, prompt, version_id, mode, generation, stop) -> Iterator[ReplyUpdate]:
        text = ""
        tokens = self._engine.stream(messages, generation, stop_event=stop)
        try:
            yield ReplyUpdate(conversation_id, text, prompt)
            for text in tokens:
                yield ReplyUpdate(conversation_id, text, prompt)
        finally:
            # Runs on normal end, on stop, and when the caller abandons the stream: the model
            # is released at once and whatever was generated is kept.
            tokens.close()
            with self._stops_lock:
                if self._stops.get(user) is stop:
                    del self._stops[user]
            message_id = self._store_reply(user, conversation_id, text, prompt, version_id, mode)
        stats = self._engine.last_stats
        yield ReplyUpdate(conversation_id, text, prompt, done=True, stopped=stop.is_set(),
                          assistant_message_id=message_id,
                          tokens_per_second=getattr(stats, "tokens_per_second", None))

    def _store_reply(self, user, conversation_id, text, prompt, version_id, mode) -> int | None:
        if not text:
            return None
        with self._db.session() as s:
            row = storage.add_message(session=s, user_id=self._accounts.user_id(user), conversation_id=conversation_id,
                                      role="assistant", content=text, persona_version_id=version_id, mode=mode.value,
                                      prompt=prompt)
        return row.id

    def _history(self, user: str | None, conversation_id: int) -> list[Message]:
        return [{"role": t.role, "content": t.content} for t in self.turns(user, conversation_id)]

    def _messages(self, user, history: list[Message], text: str, persona_id: int | None, mode: Mode,
                  max_new_tokens: int) -> tuple[list[Message], int | None]:
        """Prompt messages that fit the model's context, dropping the oldest turns first."""
        persona, version_id = None, None
        if mode is not Mode.NONE:
            if persona_id is None:
                raise UserError(f"{mode.label} needs a persona: pick one, or choose mode 'none'.")
            state = self._personas.load(user, persona_id)
            persona, version_id = state.persona, state.version_id
        budget = self._engine.max_context() - max_new_tokens
        while True:
            messages = build_messages(mode, persona, history, text)
            if self._engine.count_tokens(messages) <= budget:
                return messages, version_id
            if not history:
                raise UserError("This message and persona are too long for the model's context; shorten them.")
            history = history[2:]


def _check_message(text: str) -> str:
    text = (text or "").strip()
    if not text:
        raise UserError("Type a message first.")
    if len(text) > MAX_MESSAGE_CHARS:
        raise UserError(f"That message is {len(text):,} characters; the limit is {MAX_MESSAGE_CHARS:,}.")
    return text


def _title(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


def _summary(row: storage.ConversationPublic) -> ConversationSummary:
    return ConversationSummary(row.id, row.title, row.persona_id, row.mode, row.updated_at)
