"""Streaming memory in the chat: saved with the conversation, resumed from the file, rebuilt when it cannot be."""

from __future__ import annotations

import pytest

import storage
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
    _send(_fresh_chat(services, tiny_llm), conversation_id, "From the file")
    assert listed == []  # a long chat's turn costs the same whatever its length
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
