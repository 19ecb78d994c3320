"""Service fixtures: the services over a real SQLite file and the tiny random model."""

import pytest

import storage
from personalign.engine import Engine
from personalign.services import Services, build_services


@pytest.fixture
def services(tmp_path, tiny_llm) -> Services:
    db = storage.Database.open(tmp_path / "personalign.db")
    engine = Engine(tiny_llm)
    services = build_services(db, engine)
    yield services
    services.chat.flush_memories()  # no memory file is written into a closed database
    # The model is shared by the session: take off any persona adapter the test left applied.
    with engine.exclusive():
        pass
    db.close()
