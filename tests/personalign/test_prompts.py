import pytest

from personalign.persona import PairwiseItem, Persona, UGCItem
from personalign.prompts import ICA_SYSTEM, PBA_SYSTEM, Mode, build_messages

PERSONA = Persona(
    demographics="A retired teacher.",
    ugc=(UGCItem("Is tea better than coffee?", "Tea, always."),),
    pairwise=(PairwiseItem("Say hi.", "Hello there!", "Greetings."),),
).with_values({16: 1.0, 47: 0.0})

ICA_GOLDEN = (
    "***Task***\n\n**Post:**\nHow do plants grow?\n\n"
    "***Historical Behavior and User Preferences***\n\n"
    "**This person has commented on some posts:**\n\n"
    "1. *Post:*\nIs tea better than coffee?\n\n*Comment:*\nTea, always.\n\n"
    "**This person has chosen or rejected comments on some posts:**\n\n"
    "1. *Post:*\nSay hi.\n\n*Chosen:*\nHello there!\n\n*Rejected:*\nGreetings.\n\n"
    "A retired teacher.\n\n***Response:***\n\n"
)

PBA_GOLDEN = (
    "***Task***\n\n**Post:**\nHow do plants grow?\n\n"
    "***User Preferences***\n\nConcise communication style, Dislikes science\n\n***Response:***\n\n"
)


def test_none_mode_is_plain_chat():
    assert build_messages("none", PERSONA, [], "How do plants grow?") == [
        {"role": "user", "content": "How do plants grow?"}
    ]


def test_ica_golden():
    assert build_messages(Mode.ICA, PERSONA, [], "How do plants grow?") == [
        {"role": "system", "content": ICA_SYSTEM},
        {"role": "user", "content": ICA_GOLDEN},
    ]
    assert ICA_SYSTEM == "Generate a task-specific response based on user historical behavior and preferences.\n"


def test_pba_golden_and_profile_override():
    assert build_messages("pba", PERSONA, [], "How do plants grow?") == [
        {"role": "system", "content": PBA_SYSTEM},
        {"role": "user", "content": PBA_GOLDEN},
    ]
    custom = build_messages("pba", PERSONA, [], "Q", profile="Young")
    assert "***User Preferences***\n\nYoung\n\n" in custom[-1]["content"]


def test_ica_with_empty_persona_keeps_the_layout():
    content = build_messages("ica", Persona(), [], "Q")[-1]["content"]
    assert content == "***Task***\n\n**Post:**\nQ\n\n***Historical Behavior and User Preferences***\n\n\n\n***Response:***\n\n"


@pytest.mark.parametrize("mode", list(Mode))
def test_multi_turn_keeps_history_raw_and_frames_only_the_new_turn(mode):
    history = [{"role": "user", "content": "Hi", "id": 7}, {"role": "assistant", "content": "Hello!"}]
    messages = build_messages(mode, PERSONA, history, "How do plants grow?")
    offset = 0 if mode is Mode.NONE else 1
    assert messages[offset : offset + 2] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert messages[-1]["role"] == "user" and "How do plants grow?" in messages[-1]["content"]
    assert len(messages) == 3 + offset


def test_persona_modes_need_a_persona():
    with pytest.raises(ValueError, match="needs a persona"):
        build_messages("ica", None, [], "Q")
    with pytest.raises(ValueError):
        build_messages("fancy", PERSONA, [], "Q")
