"""Where kvjax keeps what it builds on this machine: $KVJAX_CACHE, default ~/.cache/kvjax (safe to delete).

The one rule for that folder. It lives at the lowest layer so that both of its users import it
downward: the CPU kernel's compiled library (pallas_kernels.cpu_attention) and XLA's compiled
programs (kvjax.cli, under xla/).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$KVJAX_CACHE, default ~/.cache/kvjax (not made here: its users make what they need)."""
    return Path(os.environ.get("KVJAX_CACHE") or Path.home() / ".cache" / "kvjax")
