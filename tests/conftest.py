"""Makes the shared test helpers in this folder (``loopback``) importable from every suite."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
