"""The services the UI and CLI call, built once over one database and one shared engine.

This is the seam between the edges (Gradio, the terminal) and the core: an edge gets a
`Services` and never sees the model, the database engine or SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import storage
from personalign.accounts import AccountService
from personalign.chat import ChatService
from personalign.engine import Engine
from personalign.memory_store import MemoryStore
from personalign.persona_tuning import TuningService
from personalign.personas import PersonaService
from personalign.profiling import ProfileService
from personalign.studio import StudioService


@dataclass(frozen=True)
class Services:
    accounts: AccountService
    personas: PersonaService
    chat: ChatService
    model_info: dict[str, Any]
    studio: StudioService
    profiles: ProfileService
    tuning: TuningService


def build_services(db: storage.Database, engine: Engine) -> Services:
    """Wire the services over one database and one engine shared by all users."""
    accounts = AccountService(db)
    personas = PersonaService(db, accounts)
    # Saved conversation memories sit beside the database, in the same data folder.
    memories = MemoryStore(db, engine, db.path.parent / "memory")
    tuning = TuningService(db, accounts, engine, db.path.parent / "adapters")
    return Services(accounts, personas, ChatService(db, engine, accounts, personas, memories, tuning), engine.info(),
                    studio=StudioService(db, accounts, personas, engine, tuning),
                    profiles=ProfileService(db, accounts, personas, engine), tuning=tuning)
