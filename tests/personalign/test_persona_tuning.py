"""Tuning a persona: its pairs, training its own adapter, replies that use it, replacing and removing it."""

from __future__ import annotations

import json

import pytest

import storage
from personalign.engine import Engine
from personalign.errors import NotFoundError, UserError
from personalign.generation import GenerationConfig
from personalign.models import ADAPTER_METADATA
from personalign.persona import PairwiseItem, Persona, UGCItem
from personalign.persona_tuning import TuningSettings, tuning_pairs
from personalign.profile_inference import BehaviourItem
from personalign.services import build_services

GREEDY = GenerationConfig(max_new_tokens=4, temperature=0.0)
FAST = TuningSettings(min_pairs=4, epochs=1, max_steps=2, batch_size=2)
CHOICES = tuple(PairwiseItem(f"Question {n}?", f"Short {n}.", f"A long and winding answer number {n}.")
                for n in range(5))


@pytest.fixture
def tuning(services):
    services.tuning.settings = FAST
    return services.tuning


@pytest.fixture
def persona_id(services) -> int:
    persona = Persona(pairwise=CHOICES, ugc=(UGCItem("A post", "my comment"),)).with_values({0: 1.0})
    return services.personas.create(None, "Terse", persona).id


def _folders(tuning) -> list[str]:
    return sorted(p.name for p in tuning.root.glob("*/*"))


def test_only_two_sided_choices_become_pairs_framed_by_the_persona() -> None:
    persona = Persona().with_values({0: 1.0})
    items = [BehaviourItem("ugc", "post", chosen="comment"), BehaviourItem("thumb", "q", chosen="liked"),
             BehaviourItem("pair", "Explain rain.", chosen="Water falls.", rejected="Rain is..."),
             BehaviourItem("pick", "Say hi.", chosen="Hi.", rejected="Hi.")]
    (pair,) = tuning_pairs(persona, items)
    assert (pair.chosen, pair.rejected, pair.record) == ("Water falls.", "Rain is...", 2)
    prompt = "\n".join(m["content"] for m in pair.messages)
    assert persona.profile in prompt and "Explain rain." in prompt


def test_state_counts_the_pairs_and_too_few_are_refused(services, tuning) -> None:
    few = services.personas.create(None, "Few", Persona(pairwise=CHOICES[:3])).id
    state = tuning.state(None, few)
    assert (state.pairs, state.min_pairs, state.adapter, state.can_tune) == (3, 4, None, False)
    with pytest.raises(UserError, match="3 pairwise choices; tuning needs at least 4"):
        tuning.tune(None, few)
    assert _folders(tuning) == []


def test_tuning_records_an_adapter_that_persona_replies_use(services, tuning, persona_id) -> None:
    steps = []
    state = tuning.tune(None, persona_id, progress=lambda done, total, note: steps.append((done, total)))
    assert steps[-1] == (2, 2)
    assert state.adapter is not None and state.adapter.problem is None
    assert (state.adapter.steps, state.adapter.pairs + state.adapter.probe_pairs) == (2, 5)
    folder = tuning.adapter_for(None, persona_id)
    meta = json.loads((folder / ADAPTER_METADATA).read_text())
    assert (meta["purpose"], meta["kind"], meta["persona_id"]) == ("preference", "pba", persona_id)

    assert tuning.adapter_for(None, persona_id, "none") is None
    tuned = list(services.chat.send(None, None, "Hi", persona_id=persona_id, mode="pba", generation=GREEDY))[-1]
    assert tuned.prompt.startswith("[the persona's tuned adapter answers]")
    plain = list(services.chat.send(None, None, "Hi", persona_id=persona_id, mode="none", generation=GREEDY))[-1]
    assert "tuned adapter" not in plain.prompt


def test_chat_picks_count_only_with_consent(services, tuning, persona_id) -> None:
    user_id = services.accounts.user_id(None)
    with services.chat._db.session() as s:
        storage.add_preference_event(session=s, user_id=user_id, persona_id=persona_id, kind="pick",
                                     prompt="From chat?", chosen="Yes.", rejected="Well, perhaps...")
    assert tuning.state(None, persona_id).pairs == 5
    services.profiles.set_learning(None, persona_id, True)
    assert tuning.state(None, persona_id).pairs == 6


def test_tuning_again_replaces_the_adapter_and_its_folder(tuning, persona_id) -> None:
    tuning.tune(None, persona_id)
    first = _folders(tuning)
    tuning.tune(None, persona_id)
    second = _folders(tuning)
    assert len(first) == len(second) == 1 and first != second
    assert tuning.adapter_for(None, persona_id).name == second[0]


def test_removing_goes_back_to_the_shared_model(services, tuning, persona_id) -> None:
    tuning.tune(None, persona_id)
    list(services.chat.send(None, None, "Hi", persona_id=persona_id, mode="pba", generation=GREEDY))
    state = tuning.remove(None, persona_id)
    assert state.adapter is None and tuning.adapter_for(None, persona_id) is None and _folders(tuning) == []
    reply = list(services.chat.send(None, None, "Hi", persona_id=persona_id, mode="pba", generation=GREEDY))[-1]
    assert "tuned adapter" not in reply.prompt


def test_an_adapter_for_other_weights_or_without_files_is_not_used(services, tuning, persona_id) -> None:
    tuning.tune(None, persona_id)
    folder = tuning.adapter_for(None, persona_id)
    user_id = services.accounts.user_id(None)
    with services.chat._db.session() as s:
        row = storage.get_persona_adapter(session=s, user_id=user_id, persona_id=persona_id)
        storage.set_persona_adapter(session=s, user_id=user_id, persona_id=persona_id, path=row.path,
                                    model="another-model", kind="pba", pairs=4, steps=2, probe_pairs=0)
    assert "trained on another-model" in tuning.state(None, persona_id).adapter.problem
    assert tuning.adapter_for(None, persona_id) is None

    with services.chat._db.session() as s:
        storage.set_persona_adapter(session=s, user_id=user_id, persona_id=persona_id, path=row.path,
                                    model=tuning.base_name(), kind="pba", pairs=4, steps=2, probe_pairs=0)
    (folder / "adapter_config.json").unlink()
    assert "files are missing" in tuning.state(None, persona_id).adapter.problem
    assert tuning.adapter_for(None, persona_id) is None


def test_another_users_persona_can_be_neither_seen_nor_tuned(services, tuning, persona_id) -> None:
    services.accounts.create_user("bob", "a long password")
    with pytest.raises(NotFoundError):
        tuning.state("bob", persona_id)
    with pytest.raises(NotFoundError):
        tuning.tune("bob", persona_id)
    with pytest.raises(NotFoundError):
        tuning.remove("bob", persona_id)
    assert tuning.adapter_for("bob", persona_id) is None


def test_the_studio_answers_with_the_adapter_unless_asked_not_to(services, tuning, persona_id) -> None:
    from personalign.studio import Setting

    tuning.tune(None, persona_id)
    settings = [Setting("tuned", persona_id, "pba"), Setting("untuned", persona_id, "pba", tuned=False)]
    comparison = services.studio.compare(None, "Hi", settings, GREEDY)
    assert [a.tuned for a in comparison.answers] == [True, False]
    assert settings[1].describe().endswith("untuned")


def test_a_deleted_personas_folder_is_removed_when_the_app_starts(services, tuning, persona_id, tmp_path,
                                                                  tiny_llm) -> None:
    tuning.tune(None, persona_id)
    kept = services.personas.create(None, "Kept", Persona(pairwise=CHOICES))
    tuning.tune(None, kept.id)
    services.personas.delete(None, persona_id)
    assert len(_folders(tuning)) == 2  # the cascade dropped the record, not the files

    db = storage.Database.open(tmp_path / "personalign.db")  # the app started again on the same data
    try:
        restarted = build_services(db, Engine(tiny_llm)).tuning
        assert _folders(restarted) == [restarted.adapter_for(None, kept.id).name]
    finally:
        db.close()
