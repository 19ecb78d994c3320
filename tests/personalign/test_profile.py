import pytest

from personalign.preference_space import DIMENSIONS, neutral_direction
from personalign.profile import mean_direction, parse_profile, render_profile, threshold
from tests.shared_data import load_alignx


def test_real_benchmark_profiles_round_trip_exactly():
    records = load_alignx("p_soups_student_phd.json")
    profiles = {r["profile"] for r in records}
    assert len(profiles) > 1
    for profile in profiles:
        direction = parse_profile(profile)
        assert set(direction) <= {0.0, 0.5, 1.0}
        assert render_profile(direction) == profile


def test_thresholds_are_inclusive_at_point_six_and_point_four():
    d = list(neutral_direction())
    d[0], d[1], d[2], d[3] = 0.6, 0.4, 0.59, 0.41
    assert threshold(d)[:4] == (1.0, 0.0, 0.5, 0.5)
    assert render_profile(d) == "Young, Male"


def test_neutral_dimensions_are_left_out_and_order_is_published():
    d = list(neutral_direction())
    d[89], d[16] = 0.0, 1.0
    assert render_profile(d) == "Concise communication style, Dislikes fashion"


def test_empty_profile_pushes_the_most_extreme_dimension_to_its_pole():
    d = list(neutral_direction())
    d[5], d[7] = 0.58, 0.45  # 0.58 is nearer its pole (0.42 away) than 0.45 is (0.45 away)
    assert render_profile(d) == DIMENSIONS[5].positive
    d[7] = 0.41  # now the low value is nearer 0
    assert render_profile(d) == DIMENSIONS[7].negative


def test_fully_neutral_direction_renders_empty():
    assert render_profile(neutral_direction()) == ""


def test_mean_direction_averages_items():
    a, b = [1.0] * 90, [0.0] * 90
    assert mean_direction([a, b]) == (0.5,) * 90
    with pytest.raises(ValueError):
        mean_direction([])


def test_bad_directions_and_profiles_are_rejected():
    with pytest.raises(ValueError, match="90 values"):
        render_profile([0.5] * 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        render_profile([1.5] * 90)
    with pytest.raises(ValueError, match="unknown"):
        parse_profile("Young, Likes volcanoes")
