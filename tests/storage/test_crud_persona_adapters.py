"""Persona adapters: one trained adapter record per persona, replaced on retraining."""

import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlmodel import Session

import storage
from storage import Database, NotFound, UserPublic


def _persona(session: Session, user: UserPublic, name: str = "p") -> storage.PersonaPublic:
    return storage.create_persona(session=session, user_id=user.id, name=name, data={})


def _adapter(session: Session, user: UserPublic, persona_id: int, **changes: Any) -> storage.PersonaAdapterPublic:
    values: dict[str, Any] = {"path": f"{persona_id}/a", "model": "tiny", "kind": "pba", "pairs": 12, "steps": 30,
                              "probe_pairs": 4, "accuracy_before": 0.5, "accuracy_after": 0.75}
    values.update(changes)
    return storage.set_persona_adapter(session=session, user_id=user.id, persona_id=persona_id, **values)


def test_adapter_round_trips(session: Session, alice: UserPublic) -> None:
    persona = _persona(session, alice)
    assert storage.get_persona_adapter(session=session, user_id=alice.id, persona_id=persona.id) is None
    adapter = _adapter(session, alice, persona.id)
    assert (adapter.persona_id, adapter.user_id, adapter.path, adapter.model, adapter.kind) == (
        persona.id, alice.id, f"{persona.id}/a", "tiny", "pba"
    )
    assert (adapter.pairs, adapter.steps, adapter.probe_pairs) == (12, 30, 4)
    assert (adapter.accuracy_before, adapter.accuracy_after) == (0.5, 0.75)
    assert adapter.created_at.tzinfo is not None
    assert storage.get_persona_adapter(session=session, user_id=alice.id, persona_id=persona.id) == adapter


def test_accuracies_are_optional(session: Session, alice: UserPublic) -> None:
    persona = _persona(session, alice)
    adapter = storage.set_persona_adapter(
        session=session, user_id=alice.id, persona_id=persona.id, path="a", model="m", kind="raw", pairs=1, steps=1,
        probe_pairs=0,
    )
    assert adapter.accuracy_before is None and adapter.accuracy_after is None
    assert storage.get_persona_adapter(session=session, user_id=alice.id, persona_id=persona.id) == adapter


def test_adapter_is_one_per_persona_and_replaced(
    session: Session, alice: UserPublic, monkeypatch: pytest.MonkeyPatch
) -> None:
    persona = _persona(session, alice)
    first = _adapter(session, alice, persona.id)
    retrained_at = datetime(2100, 1, 1, tzinfo=UTC)
    monkeypatch.setattr(storage.crud, "utcnow", lambda: retrained_at)
    second = _adapter(session, alice, persona.id, path="b", kind="raw", pairs=40, accuracy_after=None)
    assert second.id == first.id and second.persona_id == persona.id
    assert (second.path, second.kind, second.pairs, second.accuracy_after) == ("b", "raw", 40, None)
    assert second.created_at == retrained_at
    assert storage.list_persona_adapters(session=session, user_id=alice.id) == [second]
    assert storage.get_persona_adapter(session=session, user_id=alice.id, persona_id=persona.id) == second


def test_delete_forgets_the_record_once(session: Session, alice: UserPublic) -> None:
    persona = _persona(session, alice)
    _adapter(session, alice, persona.id)
    assert storage.delete_persona_adapter(session=session, user_id=alice.id, persona_id=persona.id) is True
    assert storage.delete_persona_adapter(session=session, user_id=alice.id, persona_id=persona.id) is False
    assert storage.get_persona_adapter(session=session, user_id=alice.id, persona_id=persona.id) is None


def test_adapter_goes_with_its_persona(db: Database, session: Session, alice: UserPublic) -> None:
    persona = _persona(session, alice)
    _adapter(session, alice, persona.id)
    storage.delete_persona(session=session, user_id=alice.id, persona_id=persona.id)
    assert storage.get_persona_adapter(session=session, user_id=alice.id, persona_id=persona.id) is None
    assert storage.list_persona_adapters(session=session, user_id=alice.id) == []
    session.commit()
    with closing(sqlite3.connect(db.path)) as conn:
        assert conn.execute("SELECT count(*) FROM persona_adapters").fetchone() == (0,)


def test_other_users_cannot_get_set_or_delete_it(session: Session, alice: UserPublic, bob: UserPublic) -> None:
    persona = _persona(session, alice)
    adapter = _adapter(session, alice, persona.id)
    assert storage.get_persona_adapter(session=session, user_id=bob.id, persona_id=persona.id) is None
    assert storage.delete_persona_adapter(session=session, user_id=bob.id, persona_id=persona.id) is False
    with pytest.raises(NotFound):
        _adapter(session, bob, persona.id, path="stolen")
    assert storage.list_persona_adapters(session=session, user_id=bob.id) == []
    assert storage.get_persona_adapter(session=session, user_id=alice.id, persona_id=persona.id) == adapter


def test_adapter_for_a_missing_persona_is_not_found(session: Session, alice: UserPublic) -> None:
    with pytest.raises(NotFound):
        _adapter(session, alice, 10**9)


@pytest.mark.parametrize(
    "changes",
    [{"kind": "x"}, {"accuracy_after": 1.5}, {"accuracy_before": -0.1}, {"path": ""}, {"model": ""}, {"pairs": -1},
     {"steps": -1}, {"probe_pairs": -1}],
    ids=lambda changes: "-".join(f"{k}={v}" for k, v in changes.items()),
)
def test_bad_values_are_rejected(session: Session, alice: UserPublic, changes: dict[str, Any]) -> None:
    persona = _persona(session, alice)
    with pytest.raises(ValueError):
        _adapter(session, alice, persona.id, **changes)
    assert storage.get_persona_adapter(session=session, user_id=alice.id, persona_id=persona.id) is None


def test_bad_values_leave_the_old_record_alone(session: Session, alice: UserPublic) -> None:
    persona = _persona(session, alice)
    adapter = _adapter(session, alice, persona.id)
    with pytest.raises(ValueError):
        _adapter(session, alice, persona.id, path="new", accuracy_after=2.0)
    assert storage.get_persona_adapter(session=session, user_id=alice.id, persona_id=persona.id) == adapter


def test_list_is_per_user_and_oldest_first(session: Session, alice: UserPublic, bob: UserPublic) -> None:
    first = _adapter(session, alice, _persona(session, alice, "one").id)
    second = _adapter(session, alice, _persona(session, alice, "two").id, kind="raw")
    theirs = _adapter(session, bob, _persona(session, bob).id)
    assert storage.list_persona_adapters(session=session, user_id=alice.id) == [first, second]
    assert storage.list_persona_adapters(session=session, user_id=bob.id) == [theirs]
