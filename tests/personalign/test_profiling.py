"""The profile service over a real SQLite file: proposals, accepting them as a new version, consent, scoping."""

from __future__ import annotations

import pytest

import storage
from personalign.engine import Engine
from personalign.errors import NotFoundError, UserError
from personalign.persona import PairwiseItem, Persona, UGCItem
from personalign.preference_space import DIMENSIONS, NEUTRAL
from personalign.profiling import ProfileService
from personalign.services import Services, build_services

PETS = next(d.index for d in DIMENSIONS if d.positive == "Likes pets")

LONG = (
    "Well, that is a great question, and there is quite a lot to say about it. France, as you may know, has a long "
    "and rich history, and its capital has moved around over the centuries, but after all is said and done the "
    "answer would be that the capital of France is Paris."
)
PET_LOVER = Persona(
    ugc=(
        UGCItem("How was your weekend?", "I spent the whole weekend playing with my dogs and cats; my pets are my family."),
        UGCItem("Any plans?", "Taking my puppy to the vet, then a long walk with both dogs. My pets come first."),
    ),
)


@pytest.fixture
def app(tmp_path, tiny_llm) -> tuple[Services, storage.Database]:
    db = storage.Database.open(tmp_path / "personalign.db")
    yield build_services(db, Engine(tiny_llm)), db
    db.close()


@pytest.fixture
def services(app) -> Services:
    return app[0]


def user_id(services: Services, name: str | None) -> int:
    return services.accounts.user_id(name)


def test_services_carry_the_profile_service(services):
    assert isinstance(services.profiles, ProfileService)


def test_no_behaviour_is_a_clear_error(services):
    state = services.personas.create(None, "Empty", Persona())
    with pytest.raises(UserError, match="no behaviour to learn from"):
        services.profiles.propose(None, state.id)


def test_unknown_method_and_persona(services):
    state = services.personas.create(None, "P", PET_LOVER)
    with pytest.raises(UserError, match="Unknown inference method"):
        services.profiles.propose(None, state.id, method="magic")
    with pytest.raises(NotFoundError):
        services.profiles.propose(None, state.id + 100)


def test_propose_from_the_persona_and_accept_some(services):
    state = services.personas.create(None, "Pet lover", PET_LOVER)
    proposal = services.profiles.propose(None, state.id)
    assert (proposal.persona_id, proposal.base_version_id, proposal.base_version_number) == (state.id, state.version_id, 1)
    assert proposal.method == "embedding" and proposal.item_count == 2 and proposal.chat_items == 0
    assert proposal.changes[0].index == PETS  # the strongest evidence: the topic they keep writing about
    assert all(c.proposed in (0.0, 1.0) and c.current == NEUTRAL for c in proposal.changes)
    assert [c.strength for c in proposal.changes] == sorted((c.strength for c in proposal.changes), reverse=True)

    accepted = [PETS]
    saved = services.profiles.accept(None, state.id, state.version_id, accepted, proposal)
    assert saved.version_number == 2
    assert saved.persona.direction[PETS] == 1.0
    untouched = [i for i in range(len(DIMENSIONS)) if i != PETS]
    assert all(saved.persona.direction[i] == state.persona.direction[i] for i in untouched)
    assert saved.persona.ugc == PET_LOVER.ugc and saved.persona.pairwise == PET_LOVER.pairwise
    assert services.personas.versions(None, state.id)[0].note == "accepted 1 inferred change"


def test_accepting_several_says_how_many(services):
    state = services.personas.create(None, "Pet lover", PET_LOVER)
    proposal = services.profiles.propose(None, state.id)
    assert len(proposal.changes) >= 2
    chosen = [c.index for c in proposal.changes[:2]]
    saved = services.profiles.accept(None, state.id, state.version_id, chosen, proposal)
    assert services.personas.versions(None, state.id)[0].note == "accepted 2 inferred changes"
    assert [saved.persona.direction[i] for i in chosen] == [c.proposed for c in proposal.changes[:2]]


def test_a_stale_base_version_is_refused(services):
    state = services.personas.create(None, "Pet lover", PET_LOVER)
    proposal = services.profiles.propose(None, state.id)
    services.personas.save(None, state.id, PET_LOVER.with_values({0: 1.0}), "moved a slider")
    with pytest.raises(UserError, match="has changed since"):
        services.profiles.accept(None, state.id, state.version_id, [proposal.changes[0].index], proposal)
    assert len(services.personas.versions(None, state.id)) == 2  # nothing saved
    assert services.personas.load(None, state.id).persona.direction[0] == 1.0


def test_accept_checks_what_it_is_given(services):
    state = services.personas.create(None, "Pet lover", PET_LOVER)
    proposal = services.profiles.propose(None, state.id)
    with pytest.raises(UserError, match="Select at least one"):
        services.profiles.accept(None, state.id, state.version_id, [], proposal)
    not_proposed = next(i for i in range(len(DIMENSIONS)) if i not in {c.index for c in proposal.changes})
    with pytest.raises(UserError, match="not among the proposed"):
        services.profiles.accept(None, state.id, state.version_id, [not_proposed], proposal)
    with pytest.raises(UserError, match="another persona or version"):
        services.profiles.accept(None, state.id, state.version_id + 1, [proposal.changes[0].index], proposal)
    assert len(services.personas.versions(None, state.id)) == 1


def test_chat_ratings_count_only_with_consent(app):
    services, db = app
    state = services.personas.create(None, "Chatter", Persona())
    with db.session() as s:
        storage.add_preference_event(session=s, user_id=user_id(services, None), persona_id=state.id, kind="pick",
                                     prompt="What is the capital of France?", chosen="Paris.", rejected=LONG)
        storage.add_preference_event(session=s, user_id=user_id(services, None), persona_id=state.id, kind="thumb",
                                     prompt="Weekend?", chosen="Playing with my dogs and cats all weekend.")
    assert services.profiles.learning(None, state.id) is False
    with pytest.raises(UserError, match="turn on learning"):
        services.profiles.propose(None, state.id)

    assert services.profiles.set_learning(None, state.id, True) is True
    assert services.profiles.learning(None, state.id) is True
    proposal = services.profiles.propose(None, state.id)
    assert proposal.item_count == 2 and proposal.chat_items == 2
    assert {i.source for i in proposal.inference.items} == {"pick", "thumb"}
    assert services.profiles.set_learning(None, state.id, False) is False


def test_model_method_runs_on_the_engine(services):
    state = services.personas.create(None, "P", Persona(pairwise=(PairwiseItem("Q?", "Yes.", "No, never."),)))
    calls = []
    proposal = services.profiles.propose(None, state.id, method="model", progress=lambda d, t: calls.append((d, t)))
    assert proposal.method == "model" and proposal.item_count == 1
    assert calls[-1] == (1, 1)


def test_model_method_without_an_engine(app):
    services, db = app
    profiles = ProfileService(db, services.accounts, services.personas)
    state = services.personas.create(None, "P", PET_LOVER)
    with pytest.raises(UserError, match="needs the model"):
        profiles.propose(None, state.id, method="model")


def test_users_see_only_their_own_personas(services):
    services.accounts.create_user("alice", "a long enough password")
    services.accounts.create_user("bob", "another long password")
    state = services.personas.create("alice", "Alice's", PET_LOVER)
    proposal = services.profiles.propose("alice", state.id)
    with pytest.raises(NotFoundError):
        services.profiles.propose("bob", state.id)
    with pytest.raises(NotFoundError):
        services.profiles.accept("bob", state.id, state.version_id, [proposal.changes[0].index], proposal)
    with pytest.raises(NotFoundError):
        services.profiles.set_learning("bob", state.id, True)
    with pytest.raises(NotFoundError):
        services.profiles.learning("bob", state.id)
    assert services.profiles.learning("alice", state.id) is False
    assert len(services.personas.versions("alice", state.id)) == 1
