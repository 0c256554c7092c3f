"""The machine's memory: how much there is, how much is free now, and sizes as users write them."""

from __future__ import annotations

import os
import re

from espace_export.errors import EspaceError


def physical_memory() -> int:
    """Bytes of RAM on this machine."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def available_memory() -> int:
    """Bytes of memory available to a new allocation without swapping: Linux's ``MemAvailable`` (free memory
    plus the page cache it can drop), else the free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (OSError, ValueError, AttributeError):
        return 4 * 2**30


def parse_memory(text: str) -> int:
    """``"12G"``, ``"800M"``, ``"50%"`` (of RAM) or a byte count → bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT%]?)i?[bB]?\s*", text)
    if not match:
        raise EspaceError(f"cannot read memory size {text!r}", "write it as 12G, 800M, 50% or a byte count")
    value, unit = float(match.group(1)), match.group(2).upper()
    if unit == "%":
        if not 0 < value <= 100:
            raise EspaceError(f"--max-memory {text} is not a percentage of RAM in (0, 100]", "try --max-memory 50%")
        return int(physical_memory() * value / 100)
    return int(value * 1024 ** " KMGT".index(unit or " "))
