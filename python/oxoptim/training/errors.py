"""User-facing errors of the training layer: one line each, naming the valid choices or the install command."""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Iterable, Optional

__all__ = ["ConfigError", "MissingDependency", "INSTALL_TRAIN", "unknown_name", "choices", "integer", "number",
           "seed_value", "SEED_RANGE"]

# What installs everything the training layer can use (progress bars, curves.png, the default data).
INSTALL_TRAIN = 'pip install "oxoptim[train]"'


class ConfigError(ValueError):
    """A job configuration (or its data files) that cannot run. ``oxoptim train`` prints the message
    as one line and exits with status 2, before anything trains."""


class MissingDependency(ImportError):
    """An optional package the job needs is not installed; the message ends with the install command."""

    def __init__(self, what: str, module: str):
        super().__init__(f"{what} needs the '{module}' package, which is not installed: {INSTALL_TRAIN}",
                         name=module)


def choices(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))


def unknown_name(kind: str, name: object, valid: Iterable[str], listing: Optional[str] = None) -> str:
    """``unknown <kind> 'x' (did you mean 'y'?); valid: a, b, c`` (``listing`` replaces ``a, b, c``)."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1) if isinstance(name, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; valid: {choices(valid) if listing is None else listing}"


def integer(label: str, value: object, minimum: Optional[int] = None) -> int:
    """``value`` as an int; ValueError naming ``label`` if it is not an integer or below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{label} must be an integer, not {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{label} must be >= {minimum}, not {value!r}")
    return int(value)


# The seeds torch.manual_seed takes.
SEED_RANGE = (-(2**63), 2**64 - 1)


def seed_value(label: str, value: object) -> int:
    """``value`` as a seed torch takes (an int in :data:`SEED_RANGE`); ValueError naming ``label`` otherwise."""
    v = integer(label, value)
    if not SEED_RANGE[0] <= v <= SEED_RANGE[1]:
        raise ValueError(f"{label} must be an integer in [-2**63, 2**64 - 1] (what torch.manual_seed takes), not {value!r}")
    return v


def number(label: str, value: object, low: Optional[float] = None, high: Optional[float] = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float within the bounds; ValueError naming ``label`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{label} must be a finite number, not {value!r}")
    v = float(value)
    below = low is not None and (v <= low if low_open else v < low)
    above = high is not None and (v >= high if high_open else v > high)
    if below or above:
        if low is not None and high is not None:
            rng = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            rng = f"{'>' if low_open else '>='} {low:g}"
        else:
            rng = f"{'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{label} must be {rng}, not {value!r}")
    return v
