"""Optional packages of the training layer (the ``train`` extra) and what a run lacks without them."""

from __future__ import annotations

import importlib.util
import sys

from .errors import INSTALL_TRAIN

__all__ = ["installed", "missing_output_note", "output_module"]

# Optional outputs: the package each needs and what the run does without it.
_OUTPUTS = {
    "curves.png": ("matplotlib", "this run draws no curves.png"),
    "progress bars": ("tqdm", "this run shows no progress bars"),
}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here (without importing it)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_output_note(output: str) -> str:
    """The one line that names an output this run cannot make, and the command that fixes it."""
    module, consequence = _OUTPUTS[output]
    return f"{module} is not installed, so {consequence}: {INSTALL_TRAIN}"


def output_module(output: str) -> str:
    return _OUTPUTS[output][0]
