"""What a run shows and writes: terminal lines and progress bars, metrics.jsonl, final.pt, curves.png,
summary.json, and the outputs it cannot make (an optional package is missing)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from typing import IO, Any, ContextManager, Dict, Iterator, List, Optional

import torch

from . import checkpoint as ckpt
from .errors import INSTALL_TRAIN
from .extras import installed, missing_output_note, output_module

__all__ = ["Progress"]


#: The run directories this process holds (real paths), with their lock files.
_HELD: Dict[str, IO[str]] = {}


@contextlib.contextmanager
def hold_run_dir(path: str) -> Iterator[None]:
    """Holds ``path`` for this process from the first write of a job to its last (``flock`` on
    ``.oxoptim.lock``: released when the process ends, even by ``kill -9``): another process there
    (a second ``--resume`` of the run, an ``--overwrite`` while it trains) is refused before it
    writes anything. Re-entrant within the process (the job holds it, the Trainer's ``fit`` too)."""
    key = os.path.realpath(path)
    if key in _HELD:
        yield
        return
    import fcntl

    os.makedirs(path, exist_ok=True)
    handle = open(os.path.join(path, ".oxoptim.lock"), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ckpt.CheckpointError(f"{path} is in use by another process training there; one run per run "
                                   f"directory") from None
    _HELD[key] = handle
    try:
        yield
    finally:
        del _HELD[key]
        handle.close()


#: What a finished run writes besides its checkpoints and metrics.
RESULTS = ("summary.json", "final.pt", "curves.png")

class Progress:
    """Output of one process; only the main one writes files, and only when there is a run directory."""

    def __init__(self, run_dir: Optional[str], is_main: bool, quiet: bool):
        self.run_dir = run_dir
        self.writes = bool(run_dir) and is_main
        self.is_main = is_main
        self.quiet = quiet or not is_main
        self.bar: Any = None
        # Outputs this run cannot make: named once on stderr, and in summary.json.
        self.missing_outputs: Dict[str, str] = {}

    def path(self, name: str) -> str:
        assert self.run_dir, "no run directory"
        return os.path.join(self.run_dir, name)

    # ----- terminal -------------------------------------------------------------------------

    def say(self, msg: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def shows_bars(self) -> bool:
        return not self.quiet and sys.stdout.isatty()

    def missing(self, output: str, note: str) -> None:
        """Records an output this run cannot make and says so once (on stderr, even when quiet)."""
        if output in self.missing_outputs or not self.is_main:
            return
        self.missing_outputs[output] = note
        print(f"oxoptim: {note}", file=sys.stderr, flush=True)

    def check_optional_outputs(self) -> None:
        if self.writes and not installed(output_module("curves.png")):
            self.missing("curves.png", missing_output_note("curves.png"))
        if self.shows_bars() and not installed(output_module("progress bars")):
            self.missing("progress bars", missing_output_note("progress bars"))

    def open_bar(self, **kwargs) -> Any:
        """A tqdm bar (also the target of :meth:`say` until closed) when a person watches a terminal
        and tqdm is installed, else None."""
        if not self.shows_bars() or "progress bars" in self.missing_outputs:
            return None
        try:
            from tqdm.auto import tqdm  # type: ignore[import-untyped, unused-ignore]
        except ImportError as e:  # installed but broken
            self.missing("progress bars", f"progress bars need tqdm, which failed to import ({e}): {INSTALL_TRAIN}")
            return None
        self.bar = tqdm(**kwargs)
        return self.bar

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None

    # ----- files ----------------------------------------------------------------------------

    def start_fresh(self) -> None:
        """A fresh run: no stale checkpoints, checkpoint temp files, metrics or results of an earlier
        run (``--overwrite``: a run that then stops early must not leave the old summary beside it)."""
        if self.writes:
            ckpt.remove_stale_temp_files(self.path(""))
            for old in ckpt.list_checkpoints(self.path("")):
                os.remove(old)
            for name in RESULTS:
                if os.path.exists(self.path(name)):
                    os.remove(self.path(name))
            ckpt.atomic_write_bytes(self.path("metrics.jsonl"), b"")

    def hold(self) -> ContextManager[None]:
        """:func:`hold_run_dir` of the run directory, when this process writes it."""
        return hold_run_dir(self.path("")) if self.writes else contextlib.nullcontext()

    def append_record(self, record: dict) -> None:
        if self.writes:
            with open(self.path("metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()

    def rewrite_records(self, history: List[dict]) -> None:
        """metrics.jsonl as of a checkpoint (a resumed run drops the lines written after it)."""
        if self.writes:
            lines = "".join(json.dumps(r) + "\n" for r in history)
            ckpt.atomic_write_bytes(self.path("metrics.jsonl"), lines.encode())

    def write_final(self, model: torch.nn.Module, history: List[dict]) -> None:
        """final.pt and curves.png."""
        if not self.writes:
            return
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        ckpt.atomic_write_bytes(self.path("final.pt"), buf.getvalue())
        if "curves.png" in self.missing_outputs:
            return
        try:
            from .plots import plot_curves

            plot_curves(history, self.path("curves.png"))
        except Exception as e:  # plotting is a convenience; never lose a run over it, never hide it
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            self.missing("curves.png", f"curves.png could not be drawn ({type(e).__name__}: {reason})"
                                       + (f": {INSTALL_TRAIN}" if isinstance(e, ImportError) else ""))

    def write_summary(self, summary: dict) -> None:
        if self.writes:
            ckpt.atomic_write_bytes(self.path("summary.json"), (json.dumps(summary, indent=2) + "\n").encode())


def epoch_line(stage_name: str, epochs: int, record: dict, val: Dict[str, float]) -> str:
    phase = record["phase"]
    metric_txt = " ".join(f"{k}={v:.4f}" for k, v in val.items())
    return (f"  {stage_name} epoch {record['epoch']}/{epochs}" + ("" if phase == "main" else f" [{phase}]")
            + f": train_loss={record['train_loss']:.4f} {metric_txt} lr={record['lr']:.3g}")
