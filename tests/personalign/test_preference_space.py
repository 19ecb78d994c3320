from personalign.preference_space import (
    DIMENSIONS,
    GROUPS,
    SIZE,
    dimensions_in,
    neutral_direction,
)
from tests.shared_data import load_alignx


def test_labels_match_published_space_exactly():
    published = load_alignx("preference_dimensions.json")["dimensions"]
    assert SIZE == len(published) == 90
    for dim, ref in zip(DIMENSIONS, published):
        assert (dim.index, dim.positive, dim.negative) == (ref["index"], ref["positive"], ref["negative"])


def test_groups_have_published_sizes_in_order():
    sizes = [len(dimensions_in(g)) for g in GROUPS]
    assert sizes == [2, 5, 3, 4, 3, 3, 3, 17, 7, 43]
    assert [d.index for g in GROUPS for d in dimensions_in(g)] == list(range(90))


def test_search_matches_poles_and_group_case_insensitively():
    hits = [d.index for d in DIMENSIONS if d.matches("CONCISE")]
    assert hits == [16]
    assert all(d.matches("") for d in DIMENSIONS)
    assert {d.group for d in DIMENSIONS if d.matches("murray")} == {"Murray's psychological needs"}


def test_neutral_direction():
    assert neutral_direction() == (0.5,) * 90
