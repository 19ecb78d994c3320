import subprocess
import sys
from pathlib import Path

import storage

FORBIDDEN = {"torch", "transformers", "gradio", "personalign"}


def test_importing_storage_pulls_in_no_model_ui_or_app_code() -> None:
    root = Path(storage.__file__).parent.parent
    probe = "import sys, storage; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, check=True, capture_output=True, text=True
    ).stdout.split()
    assert FORBIDDEN.isdisjoint(loaded)


def test_public_api_is_exported() -> None:
    missing = [name for name in storage.__all__ if not hasattr(storage, name)]
    assert missing == []
