"""Units in config values: sizes ("4MiB"), durations ("200ms"), shares ("10%"). Pure.

Each parser takes the config key it is reading, so a bad value is reported by key.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

from hostd.errors import ConfigError

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    # Kubernetes spelling, which operators of GPU fleets write by habit.
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}
_DURATION_UNITS = {
    "": Fraction(1),
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86400),
    "w": Fraction(604800),
}
_MAX_SIZE = 2**63 - 1
_MAX_DURATION = 10 * 365 * 86400.0
_NUMBER = r"(\d+(?:\.\d+)?|\.\d+)"
_SIZE_RE = re.compile(rf"\s*{_NUMBER}\s*([A-Za-z]*)\s*")
_DURATION_RE = re.compile(rf"\s*{_NUMBER}\s*([a-z]*)\s*")
PERCENT_RE = re.compile(rf"\s*{_NUMBER}\s*%\s*")


def parse_size(text: str | int, key: str) -> int:
    """Bytes from a TOML integer or a string like "4MiB", "500MB", "1.5GiB", "1024".

    Units: B KB MB GB TB (powers of 1000), KiB MiB GiB TiB and Ki Mi Gi Ti (powers of 1024),
    any case. A fractional result is rounded down to whole bytes.
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ConfigError(key, f'expected a size like "4MiB" or a byte count, got {show(text)}')
    if isinstance(text, int):
        n = text
    else:
        m = _SIZE_RE.fullmatch(text)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ConfigError(
                key,
                f"{text!r} is not a size: write a number and a unit (B, KB, MB, GB, TB, "
                'KiB, MiB, GiB, TiB), e.g. "4MiB"',
            )
        n = math.floor(Fraction(m.group(1)) * _SIZE_UNITS[unit])
    if n < 0:
        raise ConfigError(key, f"a size cannot be negative, got {text!r}")
    if n > _MAX_SIZE:
        raise ConfigError(key, f"{text!r} is too large (at most 2^63-1 bytes)")
    return n


def parse_duration(text: str | int | float, key: str) -> float:
    """Seconds from a TOML number (seconds) or a string like "200ms", "30s", "5m", "1h", "1d"
    or "2w" (the units `prune --unused-for` takes too)."""
    if isinstance(text, bool) or not isinstance(text, int | float | str):
        raise ConfigError(key, f'expected a duration like "30s" or seconds, got {show(text)}')
    if isinstance(text, str):
        m = _DURATION_RE.fullmatch(text)
        if m is None or m.group(2) not in _DURATION_UNITS:
            raise ConfigError(
                key,
                f"{text!r} is not a duration: write a number and a unit (ms, s, m, h, d, w), "
                'e.g. "30s"',
            )
        seconds = float(Fraction(m.group(1)) * _DURATION_UNITS[m.group(2)])
    else:
        seconds = float(text)
    if math.isnan(seconds) or seconds < 0:
        raise ConfigError(key, f"a duration cannot be negative or NaN, got {text!r}")
    if seconds > _MAX_DURATION:
        raise ConfigError(key, f"{text!r} is too long (at most 10 years)")
    return seconds


def parse_share(text: str | int | float, key: str) -> float:
    """A share in [0, 1] from "10%" or a TOML number 0.1."""
    if isinstance(text, str):
        m = PERCENT_RE.fullmatch(text)
        if m is None:
            raise ConfigError(key, f'{text!r} is not a share: write a percentage like "10%"')
        share = float(Fraction(m.group(1)) / 100)
    elif isinstance(text, int | float) and not isinstance(text, bool):
        share = float(text)
    else:
        raise ConfigError(key, f'expected a share like "10%" or 0.1, got {show(text)}')
    if not 0.0 <= share <= 1.0:
        raise ConfigError(key, f"a share must lie between 0% and 100%, got {text!r}")
    return share


def show(value: Any) -> str:
    kinds = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
    kind = "table" if isinstance(value, dict) else kinds.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"
