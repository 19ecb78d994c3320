"""Where conversations' streaming memories live: in RAM while active, in a file always.

After every turn the memory is written to ``<root>/<user id>/<conversation id>.pt`` (by a
writer thread, after the reply: ``SaveQueue``) and recorded in the database with the stored
message it ends at, so reopening a long chat
resumes from the file instead of re-reading the history. A memory is used only when it
ends exactly at the conversation's last stored message before the new one and was made on
the same weights (model and persona adapter); otherwise (a missing, damaged or stale file,
a changed policy, model or adapter) it is rebuilt from the stored messages, which are the
source of truth: nothing is lost, it only costs time.

It knows storage's typed functions and the engine; it knows nothing of prompts or the UI.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import storage
from personalign.engine import Engine
from personalign.memory import (
    ConversationMemory,
    MemoryFileError,
    MemoryPolicy,
    Message,
    write_memory_file,
)

log = logging.getLogger(__name__)

Turns = list[tuple[list[Message], str]]


@dataclass(frozen=True)
class Position:
    """The stored messages a memory must cover: how many, and the id of the newest."""

    message_count: int
    last_message_id: int | None

    def of(self, memory: ConversationMemory) -> bool:
        return memory.intact and (memory.message_count, memory.last_message_id) == (
            self.message_count, self.last_message_id)


Key = tuple[int, int]  # (user id, conversation id)


@dataclass(frozen=True)
class Save:
    """One memory file to write and record: the memory's ``file_state`` as its turn left it."""

    state: dict[str, Any]
    record: dict[str, Any]  # set_memory_snapshot's fields but the session and the ids


class SaveQueue:
    """Writes memory files after their turns, off the reply's path; a conversation's newest state wins.

    Writing a 4,000-utterance memory (177 MiB in float32) took half a second after the reply's
    last token. A non-daemon thread drains the queue and ends when it is empty, so the
    interpreter's exit waits for the states still queued; a state never written (the process
    killed) leaves the previous file and record, and that memory is rebuilt from the messages.
    """

    def __init__(self, write: Callable[[Key, Save], None]) -> None:
        self._write = write
        self._queued: OrderedDict[Key, Save] = OrderedDict()
        self._writing: Key | None = None
        self._thread: threading.Thread | None = None
        self._changed = threading.Condition()

    def put(self, key: Key, save: Save) -> None:
        with self._changed:
            self._queued[key] = save  # an older state still queued is never written
            self._queued.move_to_end(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name="memory-files")
                self._thread.start()

    def settle(self, key: Key | None = None, *, drop: bool = False) -> None:
        """Wait until ``key``'s queued state is written (every key's, for None); ``drop``: unwritten."""
        with self._changed:
            if drop and key is not None:
                self._queued.pop(key, None)
            if key is None:
                self._changed.wait_for(lambda: self._writing is None and not self._queued)
            else:
                self._changed.wait_for(lambda: self._writing != key and key not in self._queued)

    def _drain(self) -> None:
        while True:
            with self._changed:
                if not self._queued:
                    self._thread = None
                    self._changed.notify_all()
                    return
                key, save = self._queued.popitem(last=False)
                self._writing = key
            try:
                self._write(key, save)
            except Exception:  # a bug must not strand the states queued behind it
                log.exception("writing the memory of conversation %s failed", key[1])
            finally:
                with self._changed:
                    self._writing = None
                    self._changed.notify_all()


class MemoryStore:
    """Per-conversation streaming memories over one engine, shared by all users."""

    def __init__(self, db: storage.Database, engine: Engine, root: Path, capacity: int = 8) -> None:
        self._db = db
        self._engine = engine
        self.root = Path(root)
        self._capacity = capacity
        # (user id, conversation id) -> (memory now, memory before its last turn); the second
        # lets "answer again" resume without a rebuild.
        self._live: OrderedDict[tuple[int, int], tuple[ConversationMemory, ConversationMemory | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._saves = SaveQueue(self._write)

    def path(self, user_id: int, conversation_id: int) -> Path:
        return self.root / self._reference(user_id, conversation_id)

    @staticmethod
    def _reference(user_id: int, conversation_id: int) -> str:
        # Stored relative to the root, so the data folder can move as a whole.
        return f"{user_id}/{conversation_id}.pt"

    def acquire(
        self, user_id: int, conversation_id: int, policy: MemoryPolicy, at: Position, turns: Callable[[], Turns],
        adapter: Path | None = None,
    ) -> Generator[tuple[int, int], None, ConversationMemory]:
        """The memory covering exactly the messages at ``at`` on the weights with ``adapter``:
        from RAM, from its file, or rebuilt.

        Yields (turns replayed, total) while rebuilding; ``turns`` gives the stored turns then.
        """
        key = (user_id, conversation_id)
        weights = self._engine.weights_name(adapter)
        with self._lock:
            current, previous = self._live.pop(key, (None, None))
        for candidate in (current, previous):
            if (candidate is not None and candidate.policy is policy and candidate.model_name == weights
                    and at.of(candidate)):
                return candidate if candidate is current else candidate.snapshot()
        memory = self._from_file(user_id, conversation_id, policy, at, adapter)
        if memory is not None:
            return memory
        if at.message_count == 0:
            memory = self._engine.empty_memory(policy, adapter)
        else:
            log.info("rebuilding the %s memory of conversation %s from %d messages on %s", policy.value,
                     conversation_id, at.message_count, weights)
            memory = yield from self._engine.rebuild_memory(policy, turns(), adapter)
        memory.message_count, memory.last_message_id = at.message_count, at.last_message_id
        return memory

    def begin(self, user_id: int, conversation_id: int, memory: ConversationMemory) -> None:
        """Note the memory as it is before a turn, so the turn can be answered again cheaply."""
        with self._lock:
            self._live[(user_id, conversation_id)] = (memory, memory.snapshot())
            self._live.move_to_end((user_id, conversation_id))
            while len(self._live) > self._capacity:
                self._live.popitem(last=False)

    def commit(self, user_id: int, conversation_id: int, memory: ConversationMemory, at: Position) -> None:
        """Record that ``memory`` now covers the messages at ``at``, and queue it to be saved."""
        if not memory.intact:
            self.forget(user_id, conversation_id)
            return
        memory.message_count, memory.last_message_id = at.message_count, at.last_message_id
        record = {"path": self._reference(user_id, conversation_id), "policy": memory.policy.value,
                  "model": memory.model_name, "last_message_id": at.last_message_id or 0,
                  "message_count": at.message_count, "kv_bytes": memory.cache.kv_bytes()}
        self._saves.put((user_id, conversation_id), Save(memory.file_state(), record))

    def flush(self) -> None:
        """Wait until every committed memory is written (a test or a benchmark about to read the files)."""
        self._saves.settle()

    def _write(self, key: Key, save: Save) -> None:
        user_id, conversation_id = key
        try:
            # The file first: a record never points at a file that is not there yet.
            write_memory_file(save.state, self.path(user_id, conversation_id))
            with self._db.session() as s:
                storage.set_memory_snapshot(session=s, user_id=user_id, conversation_id=conversation_id,
                                            **save.record)
        except (OSError, storage.NotFound) as exc:  # a full disk or a chat deleted meanwhile: RAM still serves
            log.warning("could not save the memory of conversation %s: %s", conversation_id, exc)

    def forget(self, user_id: int, conversation_id: int) -> None:
        """Drop a conversation's memory everywhere (its chat was deleted, or the memory broke)."""
        with self._lock:
            self._live.pop((user_id, conversation_id), None)
        self._saves.settle((user_id, conversation_id), drop=True)  # no write lands after the delete
        self.path(user_id, conversation_id).unlink(missing_ok=True)
        with self._db.session() as s:
            storage.delete_memory_snapshot(session=s, user_id=user_id, conversation_id=conversation_id)

    def _from_file(self, user_id: int, conversation_id: int, policy: MemoryPolicy,
                   at: Position, adapter: Path | None) -> ConversationMemory | None:
        self._saves.settle((user_id, conversation_id))  # its newest state may still be on its way
        with self._db.session() as s:
            record = storage.get_memory_snapshot(session=s, user_id=user_id, conversation_id=conversation_id)
        if record is None:
            return None
        stale = (record.policy != policy.value or record.model != self._engine.weights_name(adapter)
                 or record.message_count != at.message_count or record.last_message_id != (at.last_message_id or 0))
        if stale:
            return None
        try:
            memory = self._engine.load_memory(self.root / record.path, policy, adapter)
        except MemoryFileError as exc:
            log.warning("conversation %s: %s; rebuilding from the stored messages", conversation_id, exc)
            return None
        return memory if at.of(memory) else None
