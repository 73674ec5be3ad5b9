"""Checkpoints: atomic writes (temp file + fsync + os.replace), a SHA-256 checksum, fallback to the last good one."""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
from typing import Any, List, Optional, Tuple

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_good_checkpoint", "list_checkpoints",
           "atomic_write_bytes", "remove_stale_temp_files"]

MAGIC = b"OXCKPT1\n"
_NAME = re.compile(r"^ckpt-(\d{10})\.pt$")
# The temporary file atomic_write_bytes writes a checkpoint to (suffix: the writer's process id).
_TEMP_NAME = re.compile(r"^\.ckpt-\d{10}\.pt\.tmp(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or fails its checksum."""


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(run_dir: str, step: int, state: Any, keep: int = 3) -> str:
    """Saves ``state`` as ``run_dir/checkpoints/ckpt-<step>.pt`` and keeps the newest ``keep`` files."""
    ckdir = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckdir, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = MAGIC + hashlib.sha256(payload).hexdigest().encode() + b" " + str(len(payload)).encode() + b"\n"
    path = os.path.join(ckdir, f"ckpt-{step:010d}.pt")
    atomic_write_bytes(path, header + payload)
    for old in list_checkpoints(run_dir)[keep:]:
        try:
            os.remove(old)
        except OSError:
            pass
    return path


def remove_stale_temp_files(run_dir: str) -> List[str]:
    """Deletes the checkpoint temp files (``checkpoints/.ckpt-<step>.pt.tmp<pid>``) that processes
    killed while writing left in ``run_dir``; only files of that pattern, never this process's own.
    Returns the paths removed."""
    ckdir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckdir):
        return []
    removed = []
    for n in sorted(os.listdir(ckdir)):
        m = _TEMP_NAME.match(n)
        path = os.path.join(ckdir, n)
        if m and int(m.group(1)) != os.getpid() and os.path.isfile(path):
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def list_checkpoints(run_dir: str) -> List[str]:
    """Checkpoint paths, newest first."""
    ckdir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckdir):
        return []
    names = sorted((n for n in os.listdir(ckdir) if _NAME.match(n)), reverse=True)
    return [os.path.join(ckdir, n) for n in names]


def load_checkpoint(path: str) -> Any:
    """Loads one checkpoint, verifying its length and checksum; raises :class:`CheckpointError`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not data.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {path} is corrupt: bad header (not an oxoptim checkpoint or truncated)")
    nl = data.find(b"\n", len(MAGIC))
    try:
        digest, length_text = data[len(MAGIC):nl].decode().split(" ")
        length = int(length_text)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: unreadable header") from e
    payload = data[nl + 1:]
    if len(payload) != length:
        raise CheckpointError(f"checkpoint {path} is partial: {len(payload)} of {length} bytes")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: SHA-256 checksum mismatch")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)


def latest_good_checkpoint(run_dir: str, warn=None) -> Optional[Tuple[str, Any]]:
    """The newest checkpoint that loads cleanly, as (path, state); corrupt ones are reported and skipped.

    Returns None when the run has no checkpoint; raises :class:`CheckpointError` when it has some
    but none is good.
    """
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    paths = list_checkpoints(run_dir)
    if not paths:
        return None
    errors = []
    for p in paths:
        try:
            state = load_checkpoint(p)
        except CheckpointError as e:
            errors.append(str(e))
            warn(f"oxoptim: {e}; trying the previous checkpoint")
            continue
        if errors:
            warn(f"oxoptim: resuming from the previous good checkpoint {p}")
        return p, state
    raise CheckpointError("no usable checkpoint in " + run_dir + ":\n  " + "\n  ".join(errors))
