"""A run's identity and its claim on its output folder: ``run.json``, the folder lock, and the
check that a new run does not mix with another run's metrics or checkpoints.

``run.json`` (written by rank 0, atomically) holds the run id, the start time, the resolved
config, the world layout, every rank's host name, the versions of Python, torch, mpi4py and the
MPI library, and the git commit of the working directory when it is a git checkout; each resume
appends an entry to ``resumes``. Metrics rows carry the run id.

One run at a time uses a folder: rank 0 holds an exclusive ``flock`` on ``<folder>/.daso.lock``
for the run's life (released by the kernel when the process ends, however it ends). A new run
(not a resume) into a folder that holds another run's metrics rows or checkpoints is refused
unless ``trainer.overwrite`` is set, which deletes that run's files first.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import platform
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from daso.errors import ConfigError

log = logging.getLogger("daso.trainer")

RECORD = "run.json"
LOCK = ".daso.lock"
#: Files of a run's record and metrics in its output folder (checkpoints live apart).
RUN_FILES = ("metrics.jsonl", "steps.jsonl", "metrics.csv", "steps.csv", RECORD)
#: Folders the optional loggers write into the output folder.
RUN_FOLDERS = ("tensorboard", "wandb", "mlruns")


def new_run_id() -> str:
    """A fresh run id: UTC start time and 6 random hex digits, e.g. ``20261201-183002-5f3a9c``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def now_iso() -> str:
    """The current time, ISO 8601 with the UTC offset (seconds)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_commit(folder: Path | None = None) -> str | None:
    """The commit checked out in ``folder`` (default: the working directory), with ``-dirty``
    when it has uncommitted changes; ``None`` outside a git checkout or without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str | None]:
    """Versions of Python, torch, mpi4py, the MPI library (its first line) and daso."""
    import torch

    from daso import __version__

    found: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "daso": __version__,
        "mpi4py": None,
        "mpi": None,
    }
    with contextlib.suppress(ImportError):
        import mpi4py

        found["mpi4py"] = mpi4py.__version__
        if "mpi4py.MPI" in sys.modules:
            from mpi4py import MPI

            found["mpi"] = MPI.Get_library_version().strip().splitlines()[0].strip()
    return found


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON so that ``path`` holds either the old or the new text."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_record(folder: Path) -> dict[str, Any] | None:
    """The ``run.json`` in ``folder``, or ``None`` if there is none or it is unreadable."""
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None


class RunFolder:
    """Rank 0's claim on a run's output folder (see the module docstring).

    Args:
        folder: ``trainer.output_dir``.
        checkpoint_dir: the checkpoint folder (inside ``folder`` or elsewhere).
        run_id: this run's id.
    """

    def __init__(self, folder: Path, checkpoint_dir: Path, run_id: str) -> None:
        self.folder, self.checkpoint_dir, self.run_id = folder, checkpoint_dir, run_id
        self._lock: Any = None

    def claim(self, resumed: bool, overwrite: bool) -> None:
        """Lock the folder and, for a new run, make sure it holds no other run's results.

        Raises:
            ConfigError: another process holds the folder's lock (a run in progress), or a
                new run finds another run's metrics or checkpoints and ``overwrite`` is off.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_folder()
        if resumed:
            return
        found = self.other_runs_files()
        if not found:
            return
        old = read_record(self.folder) or {}
        what = f"run {old['run_id']} of {old.get('started', '?')}" if old else "another run"
        if not overwrite:
            self.release()
            raise ConfigError(
                f"{self.folder} holds the results of {what} ({', '.join(found)}); continue it "
                "with --resume auto, write this run elsewhere with --set "
                "trainer.output_dir=DIR, or replace it with --set trainer.overwrite=true"
            )
        log.warning("trainer.overwrite: deleting the results of %s in %s", what, self.folder)
        self._delete_results()

    def other_runs_files(self) -> list[str]:
        """What in the folders would mix with a new run: metrics rows and checkpoints (an
        empty metrics file or a lone ``run.json`` of a run that ended before its first epoch
        has nothing to lose)."""
        from daso.checkpoint import NAME

        found = [
            name
            for name in RUN_FILES
            if name != RECORD
            and (self.folder / name).is_file()
            and (self.folder / name).stat().st_size > 0
        ]
        if self.checkpoint_dir.is_dir():
            count = sum(1 for p in self.checkpoint_dir.iterdir() if NAME.match(p.name))
            if count:
                found.append(f"{count} checkpoint(s) in {self.checkpoint_dir}")
        return found

    def _delete_results(self) -> None:
        import shutil

        from daso.checkpoint import NAME

        for name in RUN_FILES:
            (self.folder / name).unlink(missing_ok=True)
        for name in RUN_FOLDERS:
            shutil.rmtree(self.folder / name, ignore_errors=True)
        if self.checkpoint_dir.is_dir():
            for path in self.checkpoint_dir.iterdir():
                if NAME.match(path.name):
                    path.unlink(missing_ok=True)

    def _lock_folder(self) -> None:
        path = self.folder / LOCK
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"{self.folder} is in use by another run ({holder}); wait for it to end, or "
                "give this run its own folder with --set trainer.output_dir=DIR"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"run {self.run_id}, pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._lock = handle

    def release(self) -> None:
        """Drop the folder's lock (the end of the run)."""
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def write_record(
        self, config: dict[str, Any], layout: list[int], hosts: list[str], resumed: bool
    ) -> dict[str, Any]:
        """Write (new run) or update (resume: one more entry in ``resumes``) ``run.json``.

        Returns:
            The record written.
        """
        now = now_iso()
        where = {"layout": layout, "world_size": sum(layout), "hosts": hosts}
        old = read_record(self.folder) if resumed else None
        if old is not None and old.get("run_id") == self.run_id:
            record = old
            record.setdefault("resumes", []).append({"time": now, **where, "config": config})
        else:
            record = {
                "run_id": self.run_id,
                "started": now,
                "command": sys.argv,
                "cwd": os.getcwd(),
                **where,
                "versions": versions(),
                "git_commit": git_commit(),
                "config": config,
                "resumes": [],
            }
        write_json_atomic(self.folder / RECORD, record)
        return record
