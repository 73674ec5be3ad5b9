"""Search spaces inside a job's TOML: any value may be a distribution instead of a number or name.

    lr = { log_uniform = [1e-4, 1e-2], default = 3e-3 }
    optimizer = { choice = ["adamw", "adamw8bit", "lion", "sgd"] }
    batch_size = { choice = [32, 64, "full"] }
    epochs = { int = [2, 8] }

Distributions: ``uniform`` and ``log_uniform`` (floats), ``int`` and ``log_int`` (integers, with an
optional ``step`` for ``int``), ``choice`` (any TOML values but dates and times, tables too).
``default`` (optional, on every distribution or none) is the hand-written plan's value: the search
runs that plan first as its baseline. A parameter is named by where it sits: ``<stage name>.<key>``
inside a stage, ``model.hidden``, ``data.max_len``, ``explore.adjust.1.patience`` inside a list.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import itertools
import json
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from .errors import ConfigError, unknown_name

__all__ = ["Param", "DISTRIBUTIONS", "find_params", "suggest", "substitute", "check_space", "default_values"]

DISTRIBUTIONS = ("uniform", "log_uniform", "int", "log_int", "choice")
_EXTRA = ("default", "step")
_SCALARS = (bool, int, float, str)


@dataclass(frozen=True)
class Param:
    """One searched setting: its name, where it sits in the job, its distribution."""

    name: str
    path: tuple
    kind: str
    args: tuple  # (low, high) or the choices
    step: Optional[int] = None
    default: Any = None
    has_default: bool = False

    @property
    def encoded_choices(self) -> bool:
        """Optuna's categorical values are scalars; tables and lists are searched as their JSON."""
        return self.kind == "choice" and not all(isinstance(c, _SCALARS) for c in self.args)

    def candidates(self) -> List[Any]:
        """Values that start-up checks run the job with: every choice, or the bounds and a value
        between them (a float for a float distribution, so that a setting that must be an integer
        is caught), and the default."""
        values = list(self.args)
        if self.kind in ("uniform", "log_uniform"):
            low, high = float(self.args[0]), float(self.args[1])
            # halves first, logs for log_uniform: bounds near the largest double do not overflow to inf
            mid = math.exp((math.log(low) + math.log(high)) / 2) if self.kind == "log_uniform" else low / 2 + high / 2
            mid = min(max(mid, low), high)
            values.append(mid if mid != int(mid) else math.nextafter(mid, high))
        if self.has_default:
            values.append(self.default)
        return values

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return any(_same(value, c) for c in self.args)
        low, high = self.args
        if self.kind in ("int", "log_int") and (isinstance(value, bool) or not isinstance(value, int)):
            return False
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
        return ok and (self.step is None or (value - low) % self.step == 0)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _date_in(value: Any) -> Any:
    """The first TOML date, time or date-time in ``value`` (inside arrays and tables too), or None."""
    if isinstance(value, (datetime.date, datetime.time)):
        return value
    for v in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        found = _date_in(v)
        if found is not None:
            return found
    return None


def _is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and any(k in value for k in DISTRIBUTIONS)


def _name(path: tuple, raw: dict) -> str:
    """Dotted path; a stage (a named table in a list of stages) goes by its name, and the plan's
    top-level ``stages`` list is left out: ``explore.lr``, ``finetune.head.lr``, ``model.hidden``."""
    parts: List[str] = []
    node: Any = raw
    for i, key in enumerate(path):
        child = node[key]
        if isinstance(key, int) and isinstance(child, dict) and isinstance(child.get("name"), str):
            if parts and parts[-1] == "stages":
                parts.pop()
            parts.append(child["name"])
        else:
            parts.append(str(key))
        node = child
    return ".".join(parts)


# Settings a search may not change: they decide which examples are validation and test (and the
# seed, shared by every trial so that trials differ only in their settings).
FIXED = {("seed",): "every trial uses the plan's seed (the final runs vary it)",
         ("data", "split"): "it decides which examples are validation and test",
         ("data", "split_seed"): "it decides which examples are validation and test",
         ("data", "text_column"): "it decides which rows are read, so which examples are validation and test",
         ("data", "label_column"): "it decides which rows are read, so which examples are validation and test",
         ("data", "train"): "the data files are the plan's", ("data", "val"): "the data files are the plan's",
         ("data", "test"): "the data files are the plan's"}


_ABSENT = object()


def _at(value: Any, path: tuple) -> Any:
    """What ``value`` holds at ``path`` (keys and list indices), or ``_ABSENT``."""
    for key in path:
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and isinstance(key, int) and 0 <= key < len(value):
            value = value[key]
        else:
            return _ABSENT
    return value


def _check_not_fixed(p: Param) -> None:
    """A fixed setting may not be searched directly, nor inside a searched table that holds it
    (``data = { choice = [{..., split_seed = 0}, {..., split_seed = 1}] }``), nor in part
    (``data.split.0``)."""
    for fixed, why in FIXED.items():
        if p.path[:len(fixed)] == fixed:  # the setting itself, or part of it
            raise ConfigError(f"{'.'.join(fixed)} cannot be searched: {why}"
                              + (f" ({p.name} is part of it)" if p.path != fixed else ""))
    below = [f for f in FIXED if f[:len(p.path)] == p.path]
    if below:  # a table that holds fixed settings: name one the choices set differently, if any
        values = list(p.args) + ([p.default] if p.has_default else [])
        differ = [f for f in below if len({repr(_at(v, f[len(p.path):])) for v in values}) > 1]
        fixed = (differ or below)[0]
        raise ConfigError(f"{'.'.join(fixed)} cannot be searched: {FIXED[fixed]} (search the settings "
                          f"inside {p.name or 'the plan'} one by one instead)")


def find_params(raw: dict) -> List[Param]:
    """Every distribution in the job ``raw`` (a TOML table without its ``[tune]``), checked."""
    found: List[Param] = []

    def walk(node: Any, path: tuple) -> None:
        if _is_distribution(node):
            found.append(_param(node, path, raw))
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, path + (key,))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, path + (i,))

    walk(raw, ())
    for p in found:
        _check_not_fixed(p)
    names = [p.name for p in found]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"two searched settings are both named {n!r}: give the stages distinct names")
    with_default = [p.has_default for p in found]
    if any(with_default) and not all(with_default):
        missing = [p.name for p in found if not p.has_default]
        raise ConfigError(f"a default is given for some searched settings but not for {', '.join(missing)}: "
                          f"give one for every setting (the baseline plan) or for none")
    return found


def _param(spec: dict, path: tuple, raw: dict) -> Param:
    name = _name(path, raw)
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    for key in spec:
        if key not in DISTRIBUTIONS + _EXTRA:
            raise ConfigError(f"{name}: " + unknown_name("search key", key, DISTRIBUTIONS + _EXTRA))
    if len(kinds) != 1:
        raise ConfigError(f"{name}: one distribution per setting, not {', '.join(kinds)}")
    kind, args = kinds[0], spec[kinds[0]]
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{name}: choice needs a non-empty list of values, not {args!r}")
        dated = _date_in(args)
        if dated is not None:  # no setting takes one, and Optuna stores choices as JSON, which has none
            raise ConfigError(f"{name}: choice values are numbers, strings, booleans, arrays or tables, "
                              f"not TOML dates or times ({dated.isoformat()})")
        if len({json.dumps(a, sort_keys=True) for a in args}) != len(args):
            raise ConfigError(f"{name}: choice lists a value twice: {args!r}")
    else:
        integral = kind in ("int", "log_int")
        number_type = "integers" if integral else "numbers"
        if (not isinstance(args, list) or len(args) != 2
                or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
                or (integral and not all(isinstance(a, int) for a in args))
                or not all(math.isfinite(a) for a in args)):
            raise ConfigError(f"{name}: {kind} needs [low, high], two finite {number_type}, not {args!r}")
        if not args[0] < args[1]:
            raise ConfigError(f"{name}: {kind} needs low < high, not {args!r}")
        if kind.startswith("log_") and args[0] <= 0:
            raise ConfigError(f"{name}: {kind} needs low > 0, not {args[0]!r}")
    step = spec.get("step")
    if step is not None and (kind != "int" or isinstance(step, bool) or not isinstance(step, int) or step < 1):
        raise ConfigError(f"{name}: step is a positive integer of an int distribution, not {step!r} on {kind}")
    if step is not None and (args[1] - args[0]) % step:  # Optuna would lower high to the last step below it
        reach = args[0] + (args[1] - args[0]) // step * step
        raise ConfigError(f"{name}: int {list(args)!r} with step {step} never reaches {args[1]} (the last value "
                          f"is {reach}): give a high bound that is low plus a multiple of step")
    p = Param(name, path, kind, tuple(args), step, spec.get("default"), "default" in spec)
    if p.has_default and not p.contains(p.default):
        raise ConfigError(f"{name}: default {p.default!r} is not in {kind} {list(args)!r}")
    if p.has_default and kind == "choice":  # the choice itself: its keys' order, 1.0 for 1 inside a table
        p = dataclasses.replace(p, default=_matching_choice(p, p.default))
    return p


def _matching_choice(p: Param, value: Any) -> Any:
    """The choice of ``p`` that ``value`` equals (as :meth:`Param.contains` compares), as the choice
    lists it; ``value`` when none does."""
    return next((c for c in p.args if _same(value, c)), value)


def suggest(trial: Any, params: Sequence[Param]) -> Dict[str, Any]:
    """A value for every parameter from an Optuna trial."""
    values: Dict[str, Any] = {}
    for p in params:
        if p.kind == "choice":
            if p.encoded_choices:
                values[p.name] = json.loads(trial.suggest_categorical(p.name, [json.dumps(c) for c in p.args]))
            else:
                values[p.name] = trial.suggest_categorical(p.name, list(p.args))
        elif p.kind in ("uniform", "log_uniform"):
            values[p.name] = trial.suggest_float(p.name, float(p.args[0]), float(p.args[1]),
                                                 log=p.kind == "log_uniform")
        else:
            values[p.name] = trial.suggest_int(p.name, p.args[0], p.args[1], step=p.step or 1,
                                               log=p.kind == "log_int")
    return values


def as_optuna_params(params: Sequence[Param], values: Dict[str, Any]) -> Dict[str, Any]:
    """``values`` as Optuna stores them (choices of tables as their JSON), e.g. to enqueue a plan."""
    return {p.name: json.dumps(_matching_choice(p, values[p.name])) if p.encoded_choices else values[p.name]
            for p in params}


def substitute(raw: dict, params: Sequence[Param], values: Dict[str, Any]) -> dict:
    """A copy of the job with every distribution replaced by its value."""
    out = copy.deepcopy(raw)
    for p in params:
        node = out
        for key in p.path[:-1]:
            node = node[key]
        node[p.path[-1]] = copy.deepcopy(values[p.name])
    return out


def default_values(params: Sequence[Param]) -> Optional[Dict[str, Any]]:
    """The hand-written plan's values, if the space gives them."""
    if not params or not all(p.has_default for p in params):
        return None
    return {p.name: p.default for p in params}


# A candidate is tried with at most this many combinations of the other settings' candidates.
COMBINATIONS = 64


def _key(value: Any) -> str:
    """A candidate's canonical spelling: orders candidates whatever order the plan lists them in."""
    return json.dumps(value, sort_keys=True)


def _combinations(params: Sequence[Param], limit: int) -> List[Dict[str, Any]]:
    """Assignments of ``params`` to their candidates, the same whatever order the plan lists the
    settings and their values in: all of them when there are at most ``limit``, else ``limit``
    drawn with a fixed seed."""
    lists = [(p.name, sorted({_key(v): v for v in p.candidates()}.values(), key=_key))
             for p in sorted(params, key=lambda p: p.name)]
    if math.prod(len(values) for _, values in lists) <= limit:
        return [dict(zip([n for n, _ in lists], combo)) for combo in itertools.product(*[v for _, v in lists])]
    rng = random.Random(0)
    return [{n: rng.choice(values) for n, values in lists} for _ in range(limit)]


def check_space(raw: dict, params: Sequence[Param], parse: Callable[[dict], Any]) -> None:
    """Runs ``parse`` (the job's own checks) on the job with each parameter at each of its
    candidate values, so that a misspelled optimizer in a choice or an out-of-range bound fails at
    start-up, naming the parameter, not in trial 17. A candidate passes when the job parses with
    it and some combination of the other parameters' candidates (all combinations, or
    :data:`COMBINATIONS` drawn with a fixed seed when there are more): the verdict does not depend
    on the order of the choices, and values that are only infeasible together (``batch_size = 2``
    with ``accumulate = 4``) are left to the trials, which prune them. The defaults (the baseline
    plan) must parse together."""
    def error(values: Dict[str, Any]) -> Optional[ConfigError]:
        try:
            parse(substitute(raw, params, values))
        except ConfigError as e:
            return e
        return None

    def at(names: Sequence[str], values: Dict[str, Any]) -> str:
        return ", ".join(f"{n} = {json.dumps(values[n])}" for n in names)

    refused = []  # (parameter, candidate), as the plan lists them
    for p in params:
        others = _combinations([q for q in params if q is not p], COMBINATIONS)
        for value in {_key(v): v for v in p.candidates()}.values():
            if all(error(dict(combo, **{p.name: value})) for combo in others):
                refused.append((p, value))
    if refused:
        # the others at their first candidates that passed: the error is then the candidate's own
        passed = {q.name: next((v for v in q.candidates() if not any(r == (q, v) for r in refused)),
                               q.candidates()[0]) for q in params}
        for p, value in refused:
            e = error(dict(passed, **{p.name: value}))
            if e is None:  # a combination the drawn ones missed: the candidate passes after all
                continue
            if len(refused) == sum(len({_key(v) for v in q.candidates()}) for q in params):
                first = {q.name: q.candidates()[0] for q in params}
                raise ConfigError(f"the plan with every searched setting at its first candidate "
                                  f"({at([q.name for q in params], first)}) fails, as does every "
                                  f"combination tried: {error(first)}") from e
            raise ConfigError(f"with {at([p.name], {p.name: value})}: {e}") from e
    defaults = default_values(params)
    if defaults is not None:
        e = error(defaults)
        if e is not None:
            raise ConfigError(f"with the defaults ({at([p.name for p in params], defaults)}): {e}") from e
