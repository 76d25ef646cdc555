"""Byte sizes written the way people write them ("512 MiB", "2GB", 1024).

Shared by the worker's ``--memory`` flag and the server's ``bytes`` coercer,
so it must stay free of dependencies.
"""

import re

__all__ = ["parse_size", "format_size", "parse_duration"]

# The units table (documented in README.md and docs/API.md):
#
#   written                     means                  example
#   (none), B                   bytes                  1024, 10B
#   K M G T, KiB MiB GiB TiB    powers of 1024         2G = 2 GiB = 2,147,483,648
#   kB KB MB GB TB              powers of 1000         2GB = 2,000,000,000
#   anything ending in "b"      refused: a lower-case b means bits (2Gb = 2 gigabits)
#
# The prefix letter may be either case ("2g", "2 gB"); the "B" must be a
# capital. A bare letter ("2 G") is binary, as Slurm and `free -h` read it.
_MULTIPLIERS = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KI": 1024,
    "KIB": 1024,
    "M": 1024**2,
    "MI": 1024**2,
    "MIB": 1024**2,
    "G": 1024**3,
    "GI": 1024**3,
    "GIB": 1024**3,
    "T": 1024**4,
    "TI": 1024**4,
    "TIB": 1024**4,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(value):
    """Return ``value`` as an integer number of bytes.

    Accepts a non-negative int (or integral float), or a string: a number
    followed by an optional unit. KiB/MiB/GiB/TiB (and K/M/G/T) are powers
    of 1024, kB/MB/GB/TB powers of 1000, a plain number is bytes. Raises
    ValueError naming the offending value otherwise.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}: expected bytes or a string such as '512 MiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: must not be negative")
        return value
    if isinstance(value, float):
        if value < 0 or not value.is_integer():  # also rejects nan and inf
            raise ValueError(f"invalid size {value!r}: expected a whole, non-negative number of bytes")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid size {value!r}: expected bytes or a string such as '512 MiB'")
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(
            f"invalid size {value!r}: expected a number and an optional unit, such as '512 MiB', '2GB' or '1024'"
        )
    number, unit = match.groups()
    if unit.endswith("b"):
        raise ValueError(f"invalid size {value!r}: a lower-case 'b' means bits; {_bytes_hint(number, unit)}")
    multiplier = _MULTIPLIERS.get(unit[:-1].upper() + "B" if unit.endswith("B") else unit.upper())
    if multiplier is None:
        raise ValueError(f"invalid size {value!r}: unknown unit {unit!r} (use B, KiB, MiB, GiB, TiB, kB, MB, GB or TB)")
    if "." in number:
        # Decimal fractions ("1.5 GiB") are fine; the result is rounded down
        # to whole bytes.  Use integer arithmetic where possible.
        whole, _, frac = number.partition(".")
        frac = frac or "0"
        return int(whole or "0") * multiplier + (int(frac) * multiplier) // (10 ** len(frac))
    return int(number) * multiplier


def _bytes_hint(number, unit):
    """How to write `number` `unit` (which ends in bits' "b") in bytes."""
    prefix = unit[:-1].rstrip("iI").upper()
    if not prefix:
        return f"write {number} B for bytes"
    return f"for bytes write {number} {prefix}B (powers of 1000) or {number} {prefix}iB (powers of 1024)"


def format_size(num_bytes):
    """Render bytes with the largest binary unit that keeps the number >= 1."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{num_bytes} B"  # pragma: no cover


_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(d|h|m|s)", re.IGNORECASE)
_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(value):
    """Return ``value`` as seconds (a float).

    Accepts a non-negative number of seconds, or a string: ``"90"``,
    ``"90s"``, ``"5m"``, ``"1h30m"``, ``"2d"``, or ``[[D-]HH:]MM:SS`` as
    Slurm writes times (``"1:30:00"``). Raises ValueError naming the
    offending value otherwise.
    """
    bad = f"invalid duration {value!r}: expected seconds or a time such as '90s', '5m', '1h30m' or '1:30:00'"
    if isinstance(value, bool):
        raise ValueError(bad)
    if isinstance(value, (int, float)) and value < 0 or isinstance(value, str) and value.strip().startswith("-"):
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    if isinstance(value, (int, float)):
        if not value >= 0 or value == float("inf"):
            raise ValueError(bad)
        return float(value)
    if not isinstance(value, str):
        raise ValueError(bad)
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not seconds >= 0 or seconds == float("inf"):
            raise ValueError(bad)
        return seconds
    if ":" in text:
        days = 0
        if "-" in text:
            head, _, text = text.partition("-")
            if not head.isdigit():
                raise ValueError(bad)
            days = int(head)
        parts = text.split(":")
        if len(parts) > 3 or not all(p.isdigit() for p in parts):
            raise ValueError(bad)
        seconds = 0
        for part in parts:
            seconds = seconds * 60 + int(part)
        return float(days * 86400 + seconds)
    compact = text.replace(" ", "")
    matches = list(_DURATION_PART_RE.finditer(compact))
    if not matches or "".join(m.group(0) for m in matches) != compact:
        raise ValueError(bad)
    return float(sum(float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()] for m in matches))
