"""Where tests find the team's shared AlignX data: ../shared/data/alignx beside the checkout."""

import json
from pathlib import Path

import pytest

ALIGNX_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alignx"


def load_alignx(name: str):
    """Load one shared AlignX JSON file, skipping the test where the shared folder is absent."""
    path = ALIGNX_DIR / name
    if not path.exists():
        pytest.skip(f"shared data not found: {name}")
    return json.loads(path.read_text())
