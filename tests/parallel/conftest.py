"""Make this folder's helpers (``dist_harness``) importable in tests and in spawned ranks."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
