from personalign.presets import PRESETS


def test_presets_are_valid_and_distinct():
    profiles = {name: p.profile for name, p in PRESETS.items()}
    assert profiles["Neutral"] == ""
    assert "Concise communication style" in profiles["Elementary-school student"]
    assert "Detailed communication style" in profiles["PhD researcher"]
    assert len(set(profiles.values())) == len(PRESETS)
