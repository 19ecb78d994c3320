"""The chat service: conversations, aligned replies streamed from the shared model, feedback.

A reply is built from the stored history, the chosen persona version and the alignment
mode through the pure prompt builders, streamed from the engine (with the persona's tuned
adapter, when it has one), and stored with the exact prompt the model received. The user's
message is stored before generation starts and a stopped reply is stored as far as it got,
so nothing typed or generated is lost.
It knows no UI and no SQL; the engine owns the model and its lock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import storage
from personalign.accounts import AccountService
from personalign.engine import Engine, TokenStream
from personalign.errors import NotFoundError, UserError, user_errors
from personalign.generation import GenerationConfig
from personalign.memory import MemoryMeter, MemoryPolicy
from personalign.memory_store import MemoryStore, Position, Turns
from personalign.persona import Persona
from personalign.persona_tuning import TuningService
from personalign.personas import PersonaService
from personalign.prompts import Message, Mode, build_messages
from personalign.stops import UserStops

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 8_000
TITLE_CHARS = 48


@dataclass(frozen=True)
class ConversationSummary:
    id: int
    title: str
    persona_id: int | None
    mode: str
    memory: str
    updated_at: datetime


@dataclass(frozen=True)
class ChatTurn:
    """One stored message as the chat shows it."""

    id: int
    role: str
    content: str
    prompt: str | None
    feedback: int
    mode: str | None = None
    persona_version_id: int | None = None


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
    new_tokens: int | None = None  # on the last update: tokens the model generated for the reply
    status: str = ""  # what is happening before the first token (e.g. a memory being rebuilt)
    meter: MemoryMeter | None = None  # on the last update: what the model holds of the chat


class ChatService:
    """Chat operations for one signed-in user at a time, over one shared engine."""

    def __init__(self, db: storage.Database, engine: Engine, accounts: AccountService, personas: PersonaService,
                 memories: MemoryStore, tuning: TuningService | None = None) -> None:
        self._db = db
        self._engine = engine
        self._accounts = accounts
        self._personas = personas
        self._memories = memories
        self._tuning = tuning
        self._stops = UserStops()

    # Conversations -------------------------------------------------------------------------

    def conversations(self, user: str | None) -> list[ConversationSummary]:
        with self._db.session() as s:
            rows = storage.list_conversations(session=s, user_id=self._accounts.user_id(user))
        return [_summary(c) for c in rows]

    def new_conversation(self, user: str | None, title: str = "New chat", persona_id: int | None = None,
                         mode: Mode | str = Mode.NONE,
                         memory: MemoryPolicy | str = MemoryPolicy.DENSE) -> ConversationSummary:
        with self._db.session() as s, user_errors():
            row = storage.create_conversation(session=s, user_id=self._accounts.user_id(user), title=title,
                                              persona_id=persona_id, mode=Mode(mode).value,
                                              memory=_policy(memory).value)
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
        user_id = self._accounts.user_id(user)
        self.conversation(user, conversation_id)
        self._memories.forget(user_id, conversation_id)
        with self._db.session() as s:
            if not storage.delete_conversation(session=s, user_id=user_id, conversation_id=conversation_id):
                raise NotFoundError(f"Conversation {conversation_id} was not found.")

    def turns(self, user: str | None, conversation_id: int) -> list[ChatTurn]:
        self.conversation(user, conversation_id)  # not theirs reads as not found, not as empty
        user_id = self._accounts.user_id(user)
        with self._db.session() as s, user_errors():
            messages = storage.list_messages(session=s, user_id=user_id, conversation_id=conversation_id)
            votes = {f.message_id: f.value for f in storage.list_feedback(session=s, user_id=user_id,
                                                                            conversation_id=conversation_id)}
        return [ChatTurn(m.id, m.role, m.content, m.prompt, votes.get(m.id, 0), m.mode, m.persona_version_id)
                for m in messages]

    # Replies -------------------------------------------------------------------------------

    def send(self, user: str | None, conversation_id: int | None, text: str, *, persona_id: int | None,
             mode: Mode | str, generation: GenerationConfig,
             memory: MemoryPolicy | str | None = None) -> Iterator[ReplyUpdate]:
        """Store the user's message and stream an aligned reply; a None conversation starts one.

        ``memory`` switches the conversation's memory policy from this turn on (None keeps it).
        """
        text = check_message(text)
        mode = Mode(mode)
        policy = None if memory is None else _policy(memory)
        if conversation_id is None:
            conversation_id = self.new_conversation(user, _title(text), persona_id, mode,
                                                    policy or MemoryPolicy.DENSE).id
        user_id = self._accounts.user_id(user)
        with self._db.session() as s, user_errors():
            storage.update_conversation_settings(session=s, user_id=user_id, conversation_id=conversation_id,
                                                 persona_id=persona_id, mode=mode.value,
                                                 memory=None if policy is None else policy.value)
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

    def flush_memories(self) -> None:
        """Wait until the memory of every finished turn is written to its file (saving runs after the reply)."""
        self._memories.flush()

    def stop(self, user: str | None) -> None:
        """Stop the user's reply in progress, if any; it is stored as far as it got."""
        self._stops.stop(user)

    def feedback(self, user: str | None, message_id: int, value: int) -> None:
        """Thumbs up (+1), down (-1) or cleared (0) on one of the user's messages.

        With the persona's consent to learn from chat, a rated reply is also kept as the
        persona's behaviour (its question, and the reply as chosen or rejected).
        """
        user_id = self._accounts.user_id(user)
        with self._db.session() as s, user_errors():
            storage.set_feedback(session=s, user_id=user_id, message_id=message_id, value=value)
            storage.delete_preference_events_for_message(session=s, user_id=user_id, message_id=message_id)
            learning = self._learning_context(s, user_id, message_id)
            if learning is not None and value:
                persona_id, question, answer = learning
                side = {"chosen": answer} if value > 0 else {"rejected": answer}
                storage.add_preference_event(session=s, user_id=user_id, persona_id=persona_id, kind="thumb",
                                             prompt=question, message_id=message_id, **side)

    def alternative(self, user: str | None, conversation_id: int, *, persona_id: int | None, mode: Mode | str,
                    generation: GenerationConfig) -> Iterator[str]:
        """A second answer to the last question, streamed and NOT stored, to pick between.

        It reads the whole (trimmed) history like dense memory, whatever the chat's policy,
        so the conversation's saved memory is left untouched.
        """
        stored = self.turns(user, conversation_id)
        if len(stored) < 2 or stored[-1].role != "assistant":
            raise UserError("There is no answer to compare with yet: send a message first.")
        history = [_message(t) for t in stored[:-2]]
        messages, _ = self._messages(user, history, stored[-2].content, persona_id, Mode(mode),
                                     generation.max_new_tokens)
        return self._engine.stream(messages, generation, stop_event=self._stops.register(user),
                                   adapter=self._adapter(user, persona_id, Mode(mode)))

    def pick(self, user: str | None, conversation_id: int, *, alternative: str, keep_alternative: bool) -> None:
        """Settle a pick between the stored last answer and an alternative.

        The chosen answer is the one the chat keeps; with the persona's consent the pair is
        kept as its behaviour (chosen over rejected).
        """
        alternative = (alternative or "").strip()
        stored = self.turns(user, conversation_id)
        if not alternative or len(stored) < 2 or stored[-1].role != "assistant":
            raise UserError("There is nothing to pick between: ask for two answers first.")
        question, current = stored[-2], stored[-1]
        chosen, rejected = (alternative, current.content) if keep_alternative else (current.content, alternative)
        user_id = self._accounts.user_id(user)
        with self._db.session() as s, user_errors():
            learning = self._learning_context(s, user_id, current.id)
            if keep_alternative:
                storage.delete_message(session=s, user_id=user_id, message_id=current.id)
                storage.add_message(session=s, user_id=user_id, conversation_id=conversation_id, role="assistant",
                                    content=alternative, persona_version_id=current.persona_version_id,
                                    mode=current.mode, prompt=current.prompt)
            if learning is not None:
                storage.add_preference_event(session=s, user_id=user_id, persona_id=learning[0], kind="pick",
                                             prompt=question.content, chosen=chosen, rejected=rejected)

    def _learning_context(self, s, user_id: int, message_id: int) -> tuple[int, str, str] | None:
        """(persona id, question, answer) when a reply may be learned from: it is an answer in a
        chat with a persona whose owner consented; else None."""
        message = storage.get_message(session=s, user_id=user_id, message_id=message_id)
        if message is None or message.role != "assistant":
            return None
        conversation = storage.get_conversation(session=s, user_id=user_id, conversation_id=message.conversation_id)
        persona = None if conversation.persona_id is None else storage.get_persona(
            session=s, user_id=user_id, persona_id=conversation.persona_id)
        if persona is None or not persona.learn_from_chat:
            return None
        earlier = [m for m in storage.list_messages(session=s, user_id=user_id, conversation_id=conversation.id)
                   if m.id < message.id and m.role == "user"]
        return (persona.id, earlier[-1].content, message.content) if earlier else None

    def _reply(self, user: str | None, conversation_id: int, persona_id: int | None, mode: Mode,
               generation: GenerationConfig) -> Iterator[ReplyUpdate]:
        policy = MemoryPolicy(self.conversation(user, conversation_id).memory)
        if policy.streaming:
            return self._reply_from_memory(user, conversation_id, persona_id, mode, generation, policy)
        stored = self.turns(user, conversation_id)
        _check_answerable(stored)
        history = [_message(t) for t in stored]
        messages, version_id = self._messages(user, history[:-1], history[-1]["content"], persona_id, mode,
                                              generation.max_new_tokens)
        # The guidance baseline: the same (trimmed) chat with no persona framing or system prompt.
        plain = None if mode is Mode.NONE else [
            *[m for m in messages[:-1] if m["role"] != "system"], {"role": "user", "content": history[-1]["content"]}]
        adapter = self._adapter(user, persona_id, mode)
        stop = self._stops.register(user)
        tokens = self._engine.stream(messages, generation, stop_event=stop, unconditioned=plain, adapter=adapter)
        return self._stream(user, conversation_id, tokens, _shown(tokens.prompt, adapter), version_id, mode, stop)

    def _reply_from_memory(self, user, conversation_id, persona_id, mode, generation,
                           policy) -> Iterator[ReplyUpdate]:
        """Answer on top of the conversation's streaming memory: only the new turn is read.

        Only the newest two messages and the count come from the database: the memory stands
        for the rest, and the whole history is read only if the memory must be rebuilt.
        """
        user_id = self._accounts.user_id(user)
        with self._db.session() as s, user_errors():
            count = storage.count_messages(session=s, user_id=user_id, conversation_id=conversation_id)
            newest = storage.last_messages(session=s, user_id=user_id, conversation_id=conversation_id, limit=2)
        _check_answerable(newest)
        persona, version_id = self._persona(user, persona_id, mode)
        if generation.persona_strength:
            raise UserError("Persona strength needs dense memory (it compares two full prompts); "
                            "set it to 0 or switch this chat's memory to dense.")
        question = newest[-1]
        messages = build_messages(mode, persona, [], question.content)
        at = Position(count - 1, newest[-2].id if len(newest) > 1 else None)
        adapter = self._adapter(user, persona_id, mode)
        return self._memory_stream(user, conversation_id, policy, at, question.id, messages, version_id, mode,
                                   generation, adapter)

    def _memory_stream(self, user, conversation_id, policy, at, question_id, messages, version_id, mode,
                       generation, adapter) -> Iterator[ReplyUpdate]:
        user_id = self._accounts.user_id(user)
        stop = self._stops.register(user)
        try:
            memory = yield from self._acquire(user, conversation_id, policy, at, stop, adapter)
            if memory is None:  # stopped while rebuilding: nothing generated, nothing lost
                yield ReplyUpdate(conversation_id, "", "", done=True, stopped=True)
                return
            self._memories.begin(user_id, conversation_id, memory)
            tokens = self._engine.stream_turn(memory, messages, generation, stop_event=stop, adapter=adapter)
            # Read before the first token: generation has not started, so the count is the earlier turns'.
            prompt = _shown(f"[{policy.value} memory: {memory.cached_tokens():,} cached tokens, then]\n{tokens.prompt}",
                            adapter)
        except BaseException:
            self._stops.release(user, stop)
            raise

        def commit(reply_id: int | None) -> None:
            count = at.message_count + 1 + (reply_id is not None)  # the earlier messages, the question, the reply
            self._memories.commit(user_id, conversation_id, memory, Position(count, reply_id or question_id))

        yield from self._stream(user, conversation_id, tokens, prompt, version_id, mode, stop, after_store=commit)

    def _acquire(self, user, conversation_id, policy, at, stop, adapter):
        """The memory at ``at``, yielding progress updates while it has to be rebuilt; None if stopped."""
        acquiring = self._memories.acquire(
            self._accounts.user_id(user), conversation_id, policy, at,
            lambda: self._replay(user, self.turns(user, conversation_id)[:at.message_count]), adapter)
        while True:
            try:
                done, total = next(acquiring)
            except StopIteration as finished:
                return finished.value
            if stop.is_set():
                acquiring.close()
                return None
            if done == 1 or done == total or done % 10 == 0:
                yield ReplyUpdate(conversation_id, "", "", status=f"Rebuilding the {policy.value} memory from the "
                                  f"stored chat: turn {done:,} of {total:,}")

    def _replay(self, user: str | None, stored: list[ChatTurn]) -> Turns:
        """Stored messages as (prompt messages, reply) turns, framed as they were when answered."""
        turns: Turns = []
        for turn in stored:
            if turn.role == "user":
                turns.append(([{"role": "user", "content": turn.content}], ""))
            elif turns and not turns[-1][1]:
                framed = self._framed(user, turn, turns[-1][0][-1]["content"])
                turns[-1] = (framed, turn.content)
        return turns

    def _framed(self, user: str | None, reply: ChatTurn, question: str) -> list[Message]:
        """The prompt messages a stored reply answered: its mode and persona version, if still there."""
        try:
            mode = Mode(reply.mode or Mode.NONE)
            persona = self._personas.version(user, reply.persona_version_id) if reply.persona_version_id else None
            if mode is not Mode.NONE and persona is not None:
                return build_messages(mode, persona, [], question)
        except (NotFoundError, ValueError):
            pass  # the persona version was deleted: the plain question is the best replay left
        return [{"role": "user", "content": question}]

    def _stream(self, user, conversation_id, tokens: TokenStream, prompt, version_id, mode, stop,
                after_store=None) -> Iterator[ReplyUpdate]:
        text = ""
        try:
            yield ReplyUpdate(conversation_id, text, prompt)
            for text in tokens:
                yield ReplyUpdate(conversation_id, text, prompt)
        finally:
            # Runs on normal end, on stop, and when the caller abandons the stream: the model
            # is released at once and whatever was generated is kept.
            tokens.close()
            self._stops.release(user, stop)
            message_id = self._store_reply(user, conversation_id, text, prompt, version_id, mode)
            if after_store is not None:
                after_store(message_id)
        stats = tokens.stats  # this reply's own: the engine is shared, and another reply may have ended since
        yield ReplyUpdate(conversation_id, text, prompt, done=True, stopped=stop.is_set(),
                          assistant_message_id=message_id,
                          tokens_per_second=getattr(stats, "tokens_per_second", None),
                          new_tokens=getattr(stats, "new_tokens", None),
                          meter=getattr(stats, "memory", None))

    def _store_reply(self, user, conversation_id, text, prompt, version_id, mode) -> int | None:
        if not text:
            return None
        with self._db.session() as s:
            row = storage.add_message(session=s, user_id=self._accounts.user_id(user), conversation_id=conversation_id,
                                      role="assistant", content=text, persona_version_id=version_id, mode=mode.value,
                                      prompt=prompt)
        return row.id

    def _history(self, user: str | None, conversation_id: int) -> list[Message]:
        return [_message(t) for t in self.turns(user, conversation_id)]

    def _adapter(self, user: str | None, persona_id: int | None, mode: Mode) -> Path | None:
        return None if self._tuning is None else self._tuning.adapter_for(user, persona_id, mode)

    def _persona(self, user: str | None, persona_id: int | None, mode: Mode) -> tuple[Persona | None, int | None]:
        """The persona (and its current version id) a mode needs; (None, None) for plain chat."""
        if mode is Mode.NONE:
            return None, None
        if persona_id is None:
            raise UserError(f"{mode.label} needs a persona: pick one, or choose mode 'none'.")
        state = self._personas.load(user, persona_id)
        return state.persona, state.version_id

    def _messages(self, user, history: list[Message], text: str, persona_id: int | None, mode: Mode,
                  max_new_tokens: int) -> tuple[list[Message], int | None]:
        """Prompt messages that fit the model's context, dropping the oldest turns first."""
        persona, version_id = self._persona(user, persona_id, mode)
        budget = self._engine.max_context() - max_new_tokens

        def dropping(pairs: int) -> list[Message]:
            return build_messages(mode, persona, history[2 * pairs:], text)

        def fits(pairs: int) -> bool:
            return self._engine.count_tokens(dropping(pairs)) <= budget

        # Fewer turns never take more tokens, so the fewest to drop is found by bisection: a
        # few renders of the history, not one per dropped turn (minutes at 2,000 turns).
        low, high = 0, (len(history) + 1) // 2  # fits(high) drops everything
        if fits(low):
            return dropping(low), version_id
        if not fits(high):
            raise UserError("This message and persona are too long for the model's context; shorten them.")
        while high - low > 1:  # fits(high) and not fits(low)
            middle = (low + high) // 2
            low, high = (low, middle) if fits(middle) else (middle, high)
        return dropping(high), version_id


def check_message(text: str, what: str = "message") -> str:
    """The message stripped; a UserError when it is empty or longer than the limit."""
    text = (text or "").strip()
    if not text:
        raise UserError(f"Type a {what} first.")
    if len(text) > MAX_MESSAGE_CHARS:
        raise UserError(f"That {what} is {len(text):,} characters; the limit is {MAX_MESSAGE_CHARS:,}.")
    return text


def _shown(prompt: str, adapter: Path | None) -> str:
    """The prompt as the chat shows it, noting when the persona's tuned adapter answered."""
    return prompt if adapter is None else f"[the persona's tuned adapter answers]\n{prompt}"


def _title(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


def _summary(row: storage.ConversationPublic) -> ConversationSummary:
    return ConversationSummary(row.id, row.title, row.persona_id, row.mode, row.memory, row.updated_at)


def _check_answerable(messages: list[ChatTurn] | list[storage.MessagePublic]) -> None:
    if not messages or messages[-1].role != "user":
        raise UserError("The conversation does not end with a message to answer.")


def _message(turn: ChatTurn) -> Message:
    return {"role": turn.role, "content": turn.content}


def _policy(memory: MemoryPolicy | str) -> MemoryPolicy:
    try:
        return MemoryPolicy(memory)
    except ValueError:
        choices = ", ".join(p.value for p in MemoryPolicy)
        raise UserError(f"Unknown memory policy {memory!r}; choose one of {choices}.") from None
