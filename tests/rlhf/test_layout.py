"""tidal.rlhf may use both engines; neither engine (nor the models and ops they share) imports it."""

import pathlib
import re

import tidal

PACKAGE = pathlib.Path(tidal.__file__).parent


def test_no_engine_imports_rlhf():
    pattern = re.compile(r"^\s*(from\s+tidal\.rlhf|import\s+tidal\.rlhf|from\s+tidal\s+import\s+.*\brlhf\b)", re.M)
    offenders = [str(path.relative_to(PACKAGE)) for folder in ("serve", "train", "models", "ops")
                 for path in (PACKAGE / folder).rglob("*.py") if pattern.search(path.read_text())]
    assert offenders == []
    assert (PACKAGE / "rlhf" / "losses.py").is_file()
