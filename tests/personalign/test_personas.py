import json

import pytest

from personalign.errors import NotFoundError, UserError
from personalign.persona import Persona, PersonaFormatError, UGCItem


def test_create_save_and_restore_keeps_every_version(services):
    p = services.personas
    first = p.create(None, "Me", Persona().with_values({16: 1.0}))
    second = p.save(None, first.id, first.persona.with_values({16: 0.0}), "detailed now")
    assert (first.version_number, second.version_number) == (1, 2)
    assert second.persona.profile == "Detailed communication style"
    restored = p.restore(None, first.id, first.version_id)
    assert restored.version_number == 3
    assert restored.persona == first.persona
    assert [v.number for v in p.versions(None, first.id)] == [3, 2, 1]
    assert p.version(None, second.version_id).profile == "Detailed communication style"


def test_export_import_round_trip(services):
    p = services.personas
    state = p.create(None, "Me", Persona(demographics="Chef", ugc=(UGCItem("Best knife?", "A santoku."),)))
    text = p.export_json(None, state.id)
    assert json.loads(text)["Demographic Information"] == "Chef"
    imported = p.import_json(None, "copy", text)
    assert imported.persona == state.persona and imported.id != state.id


def test_invalid_import_stores_nothing(services):
    with pytest.raises(PersonaFormatError):
        services.personas.import_json(None, "bad", b"{oops")
    assert services.personas.list(None) == []


def test_users_see_only_their_own_personas(services):
    services.accounts.create_user("alice", "password-a")
    services.accounts.create_user("bob", "password-b")
    mine = services.personas.create("alice", "Alice's", Persona())
    assert [s.name for s in services.personas.list("alice")] == ["Alice's"]
    assert services.personas.list("bob") == []
    with pytest.raises(NotFoundError):
        services.personas.load("bob", mine.id)
    with pytest.raises(NotFoundError):
        services.personas.save("bob", mine.id, Persona())
    with pytest.raises(NotFoundError):
        services.personas.delete("bob", mine.id)
    assert services.personas.load("alice", mine.id).version_number == 1


def test_bad_names_are_user_errors(services):
    with pytest.raises(UserError):
        services.personas.create(None, "", Persona())
