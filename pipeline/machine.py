"""What this process may use of the machine."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on: a container or a lease can expose fewer than the machine has
    (os.cpu_count() reports the machine's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity API on this platform (macOS)
        return os.cpu_count() or 1
