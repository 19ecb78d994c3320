"""Streaming memory in the chat: saved with the conversation, resumed from the file, rebuilt when it cannot be."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import storage
from personalign import memory_store
from personalign.accounts import AccountService
from personalign.chat import ChatService
from personalign.engine import Engine
from personalign.errors import UserError
from personalign.generation import GenerationConfig
from personalign.memory_store import MemoryStore
from personalign.personas import PersonaService

GREEDY = GenerationConfig(max_new_tokens=6, temperature=0.0)
SD = "streaming-dialogue"


def _send(chat, conversation_id, text, **kwargs):
    updates = list(chat.send(None, conversation_id, text, persona_id=None, mode="none", generation=GREEDY, **kwargs))
    assert updates[-1].done
    return updates


def _rebuilt(updates) -> bool:
    return any(u.status.startswith("Rebuilding") for u in updates)


def _fresh_chat(services, tiny_llm) -> ChatService:
    """A second app process over the same database and memory folder: nothing in RAM."""
    services.chat.flush_memories()  # the first process's exit waits for its memory files
    db = services.chat._db
    engine = Engine(tiny_llm)
    accounts = AccountService(db)
    return ChatService(db, engine, accounts, PersonaService(db, accounts),
                       MemoryStore(db, engine, services.chat._memories.root))


def _chat_with_turns(services, turns: int = 3) -> int:
    conversation_id = _send(services.chat, None, "My locker code is 4721", memory=SD)[-1].conversation_id
    for n in range(turns - 1):
        _send(services.chat, conversation_id, f"Filler message {n}")
    return conversation_id


def _snapshot(services, conversation_id):
    services.chat.flush_memories()
    with services.chat._db.session() as s:
        user_id = services.accounts.user_id(None)
        return storage.get_memory_snapshot(session=s, user_id=user_id, conversation_id=conversation_id)


def test_streaming_turns_read_only_the_new_message_and_report_the_meter(services) -> None:
    conversation_id = _chat_with_turns(services, 2)
    last = _send(services.chat, conversation_id, "Third")[-1]
    assert last.prompt.startswith(f"[{SD} memory:") and "My locker code" not in last.prompt
    assert last.meter is not None and last.meter.policy == SD
    assert last.meter.dense_kv_bytes > last.meter.kv_bytes > 0
    assert services.chat.conversation(None, conversation_id).memory == SD


def test_a_turn_on_the_memory_reads_the_whole_history_only_to_rebuild_it(services, tiny_llm, monkeypatch) -> None:
    conversation_id = _chat_with_turns(services)
    listed = []
    real = storage.list_messages
    monkeypatch.setattr(storage, "list_messages", lambda **kw: listed.append(kw) or real(**kw))
    _send(services.chat, conversation_id, "In RAM")
    reopened = _fresh_chat(services, tiny_llm)
    _send(reopened, conversation_id, "From the file")
    assert listed == []  # a long chat's turn costs the same whatever its length
    reopened.flush_memories()
    (services.chat._memories.root / _snapshot(services, conversation_id).path).unlink()
    updates = _send(_fresh_chat(services, tiny_llm), conversation_id, "Rebuilt")
    assert _rebuilt(updates) and len(listed) == 1  # rebuilding replays every stored message, once


def test_memory_is_saved_with_the_conversation_and_resumed_without_rebuilding(services, tiny_llm) -> None:
    conversation_id = _chat_with_turns(services)
    record = _snapshot(services, conversation_id)
    turns = services.chat.turns(None, conversation_id)
    assert record.message_count == len(turns) and record.last_message_id == turns[-1].id
    assert (services.chat._memories.root / record.path).is_file()
    reopened = _fresh_chat(services, tiny_llm)
    updates = _send(reopened, conversation_id, "Do you remember?")
    assert not _rebuilt(updates) and updates[-1].meter.utterances > 6


@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_missing_or_broken_memory_file_is_rebuilt_from_the_messages(services, tiny_llm, damage) -> None:
    conversation_id = _chat_with_turns(services)
    path = services.chat._memories.root / _snapshot(services, conversation_id).path
    if damage == "deleted":
        path.unlink()
    else:
        path.write_bytes(b"\x00" * 64)
    reopened = _fresh_chat(services, tiny_llm)
    updates = _send(reopened, conversation_id, "Do you remember?")
    assert _rebuilt(updates) and updates[-1].text
    assert len(reopened.turns(None, conversation_id)) == 8  # nothing lost, the new turn added
    reopened.flush_memories()
    assert _snapshot(services, conversation_id).message_count == 8  # and saved again


def test_rebuilt_memory_holds_one_sink_per_stored_utterance(services, tiny_llm) -> None:
    conversation_id = _chat_with_turns(services)
    live = _send(services.chat, conversation_id, "Next")[-1].meter
    (services.chat._memories.root / _snapshot(services, conversation_id).path).unlink()
    updates = _send(_fresh_chat(services, tiny_llm), conversation_id, "Again")
    assert _rebuilt(updates) and updates[-1].meter.utterances == live.utterances + 2


def test_answer_again_resumes_from_the_memory_before_the_turn(services) -> None:
    conversation_id = _chat_with_turns(services)
    updates = list(services.chat.regenerate(None, conversation_id, persona_id=None, mode="none", generation=GREEDY))
    assert updates[-1].done and not _rebuilt(updates)
    assert _snapshot(services, conversation_id).last_message_id == updates[-1].assistant_message_id


def test_switching_policy_rebuilds_under_the_new_one(services) -> None:
    conversation_id = _chat_with_turns(services)
    updates = _send(services.chat, conversation_id, "Switch", memory="dense")
    assert not _rebuilt(updates) and updates[-1].meter.policy == "dense"
    updates = _send(services.chat, conversation_id, "And back", memory=SD)
    assert _rebuilt(updates) and updates[-1].meter.policy == SD


def test_deleting_the_conversation_deletes_its_memory_file(services) -> None:
    conversation_id = _chat_with_turns(services, 1)
    path = services.chat._memories.root / _snapshot(services, conversation_id).path
    assert path.is_file()
    services.chat.delete(None, conversation_id)
    assert not path.exists()


def test_unknown_policy_is_a_user_error(services) -> None:
    with pytest.raises(UserError, match="memory policy"):
        services.chat.new_conversation(None, memory="photographic")


def test_persona_strength_needs_dense_memory(services) -> None:
    conversation_id = _chat_with_turns(services, 1)
    guided = GenerationConfig(max_new_tokens=4, temperature=0.0, persona_strength=1.0)
    with pytest.raises(UserError, match="dense"):
        services.chat.send(None, conversation_id, "Hi", persona_id=None, mode="none", generation=guided)


def test_stopping_during_a_streaming_reply_keeps_text_and_memory_in_step(services) -> None:
    conversation_id = _chat_with_turns(services, 1)
    long = GenerationConfig(max_new_tokens=100, temperature=0.0)
    stream = services.chat.send(None, conversation_id, "Tell me a story", persona_id=None, mode="none",
                                generation=long)
    for update in stream:
        if len(update.text) > 3:
            services.chat.stop(None)
            break
    rest = list(stream)
    assert rest[-1].stopped
    turns = services.chat.turns(None, conversation_id)
    assert _snapshot(services, conversation_id).last_message_id == turns[-1].id
    assert not _rebuilt(_send(services.chat, conversation_id, "Go on"))



def _gated_writes(monkeypatch, started: threading.Event | None = None) -> tuple[threading.Event, list[str]]:
    """Memory files wait for the returned event to be set (``started`` is set as one begins);
    the list names each file written."""
    gate, written, real = threading.Event(), [], memory_store.write_memory_file

    def write(state, path):
        if started is not None:
            started.set()
        assert gate.wait(10)
        written.append(path.name)
        return real(state, path)

    monkeypatch.setattr(memory_store, "write_memory_file", write)
    return gate, written


def test_the_memory_file_is_written_after_the_reply_and_the_newest_state_wins(services, monkeypatch) -> None:
    conversation_id = _chat_with_turns(services, 1)
    services.chat.flush_memories()
    gate, written = _gated_writes(monkeypatch)
    _send(services.chat, conversation_id, "Second")  # done while its file waits
    _send(services.chat, conversation_id, "Third")
    with services.chat._db.session() as s:
        user_id = services.accounts.user_id(None)
        before = storage.get_memory_snapshot(session=s, user_id=user_id, conversation_id=conversation_id)
    assert before.message_count == 2  # the record still names the file as the first turn left it
    gate.set()
    record = _snapshot(services, conversation_id)  # flushes
    assert record.message_count == len(services.chat.turns(None, conversation_id)) == 6
    assert 1 <= len(written) <= 2  # the second turn's state, if overtaken while queued, is never written


def test_deleting_a_chat_drops_its_memory_file_still_queued(services, monkeypatch) -> None:
    kept, dropped = _chat_with_turns(services, 1), _chat_with_turns(services, 1)
    services.chat.flush_memories()
    gate, written = _gated_writes(monkeypatch)
    _send(services.chat, kept, "Second")  # its file is being written: the gate holds it
    _send(services.chat, dropped, "Second")  # its file waits in the queue behind
    services.chat.delete(None, dropped)
    gate.set()
    services.chat.flush_memories()
    user_id = services.accounts.user_id(None)
    assert written == [f"{kept}.pt"] and not services.chat._memories.path(user_id, dropped).exists()
    assert _snapshot(services, kept).message_count == 4


def test_deleting_a_chat_waits_for_its_memory_file_being_written(services, monkeypatch) -> None:
    conversation_id = _chat_with_turns(services, 1)
    services.chat.flush_memories()
    started = threading.Event()
    gate, written = _gated_writes(monkeypatch, started)
    _send(services.chat, conversation_id, "Second")
    assert started.wait(10)
    deleting = threading.Thread(target=services.chat.delete, args=(None, conversation_id))
    deleting.start()
    deleting.join(0.2)
    assert deleting.is_alive()  # it waits for the write in progress, so no file lands after it
    gate.set()
    deleting.join(10)
    path = services.chat._memories.path(services.accounts.user_id(None), conversation_id)
    assert not deleting.is_alive() and written == [path.name] and not path.exists()


EXITING = """
import sys, time
from pathlib import Path
import storage
from personalign import memory_store
from personalign.engine import Engine
from personalign.generation import GenerationConfig
from personalign.services import build_services
from tests.conftest import make_tiny_llm

real = memory_store.write_memory_file
memory_store.write_memory_file = lambda state, path: time.sleep(1) or real(state, path)  # still writing at exit
chat = build_services(storage.Database.open(Path(sys.argv[1])), Engine(make_tiny_llm())).chat
updates = list(chat.send(None, None, "Hello", persona_id=None, mode="none", memory="streaming-dialogue",
                         generation=GenerationConfig(max_new_tokens=3, temperature=0)))
print(updates[-1].conversation_id)
"""


def test_quitting_the_app_waits_for_the_memory_files_being_written(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-c", EXITING, str(tmp_path / "chat.db")], check=False,
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    conversation_id = int(done.stdout.split()[-1])
    db = storage.Database.open(tmp_path / "chat.db")
    try:
        with db.session() as s:
            user_id = storage.get_or_create_local_user(session=s).id
            record = storage.get_memory_snapshot(session=s, user_id=user_id, conversation_id=conversation_id)
    finally:
        db.close()
    assert record is not None and (tmp_path / "memory" / record.path).stat().st_size > 0
