"""Write docs/settings.md from the settings' schema and configfile.py's comments.

    python tools/settings_reference.py

tests/test_docs.py fails when docs/settings.md is not what this would write.
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from plankton import settings  # noqa: E402

if __name__ == "__main__":
    target = REPO / "docs" / "settings.md"
    target.parent.mkdir(exist_ok=True)
    target.write_text(settings.reference_markdown(), encoding="utf-8")
    print(f"-> {target}")
