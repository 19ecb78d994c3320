import json

import pytest

from personalign.persona import (
    PairwiseItem,
    Persona,
    PersonaFormatError,
    UGCItem,
    dumps,
    from_record,
    loads,
    to_record,
)
from tests.shared_data import load_alignx


def make_persona() -> Persona:
    return Persona(
        demographics="A 9-year-old who loves dinosaurs.",
        ugc=(UGCItem("Best dinosaur?", "T-rex, obviously!"),),
        pairwise=(PairwiseItem("Explain rain.", "Water falls from clouds.", "Precipitation occurs when..."),),
    ).with_values({0: 1.0, 16: 0.9})


def test_json_round_trip_keeps_everything():
    persona = make_persona()
    again = loads(dumps(persona))
    assert again == persona
    record = json.loads(dumps(persona))
    assert record["profile"] == "Young, Concise communication style"
    assert record["User-Generated Content"] == [{"prompt": "Best dinosaur?", "comment": "T-rex, obviously!"}]


def test_a_real_benchmark_record_imports_as_a_persona():
    record = load_alignx("p_soups_student_phd.json")[0]
    persona = from_record(record)
    assert persona.profile == record["profile"]
    assert len(persona.pairwise) == len(record["Pair-wise Comparative Feedback"])
    assert persona.pairwise[0].chosen == record["Pair-wise Comparative Feedback"][0]["chosen"]


def test_missing_fields_mean_neutral_and_empty():
    assert from_record({}) == Persona()


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"Preference Direction": [0.5, 0.5]}', "90"),
        ('{"Preference Direction": "high"}', "list of 90 numbers"),
        ('{"profile": "Likes volcanoes"}', "unknown"),
        ('{"User-Generated Content": [{"prompt": "p"}]}', "item 1 needs text fields prompt, comment"),
        ('{"Pair-wise Comparative Feedback": {"a": 1}}', "must be a list"),
        ('{"Demographic Information": 5}', "must be text"),
        ('{"User-Generated Content": [{"prompt": " ", "comment": "c"}]}', "'post' is empty"),
    ],
)
def test_invalid_json_gives_a_clear_error(text, message):
    with pytest.raises(PersonaFormatError, match=message):
        loads(text)


def test_several_problems_are_reported_together():
    with pytest.raises(PersonaFormatError) as err:
        from_record({"Preference Direction": [2] * 90, "Demographic Information": 1})
    assert "[0, 1]" in str(err.value) and "must be text" in str(err.value)


def test_oversized_text_is_rejected():
    with pytest.raises(PersonaFormatError, match="longer than"):
        Persona(demographics="x" * 20_001)


def test_to_record_is_json_ready():
    assert json.loads(json.dumps(to_record(Persona())))["profile"] == ""
