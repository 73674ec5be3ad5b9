"""A job configuration written back as TOML (the best plan of a search, runnable by ``oxoptim train``).

Tables become ``[table]``, lists of tables ``[[table]]`` at the top level and inline tables below it;
strings, numbers, booleans and lists as TOML writes them. ``tomllib.loads(dumps(cfg)) == cfg``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, List

__all__ = ["dumps"]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _value(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        if not -(2 ** 63) <= v < 2 ** 63:
            raise ValueError(f"TOML integers are 64-bit: {v} is out of range")
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # shortest repr that reads back to the same double; always has '.' or 'e'
    if isinstance(v, str):
        # JSON's escapes are TOML basic-string escapes; TOML also forbids a raw DEL (U+007F)
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def dumps(cfg: dict, header: str = "") -> str:
    """``cfg`` as a TOML document, ``header`` (lines) as comments on top."""
    lines: List[str] = [f"# {line}" if line else "#" for line in header.splitlines()]
    plain = {k: v for k, v in cfg.items() if not isinstance(v, dict) and not _is_table_list(v)}
    for k, v in plain.items():
        lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines += ["", f"[{_key(k)}]"] + [f"{_key(str(kk))} = {_value(vv)}" for kk, vv in v.items()]
    for k, v in cfg.items():
        if _is_table_list(v):
            for table in v:
                lines += ["", f"[[{_key(k)}]]"] + [f"{_key(str(kk))} = {_value(vv)}" for kk, vv in table.items()]
    return "\n".join(lines) + "\n"
