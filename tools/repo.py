"""The one way the scripts in tools/ find the readable trainer: `import repo` puts
src/ on the import path (tests get the same through pytest.ini's pythonpath)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
