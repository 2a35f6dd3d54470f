"""A run's identity and its claim on its output folder: ``run.json``, the folder lock, and the
check that a new run does not mix with another run's metrics or checkpoints.

``run.json`` (written by rank 0, atomically) holds the run id, the start time, the resolved
config, the world layout, every rank's host name, the versions of Python, torch, mpi4py and the
MPI library, and the git commit of the working directory when it is a git checkout; each resume
appends an entry to ``resumes``. Metrics rows carry the run id.

One run at a time uses a folder: rank 0 holds an exclusive ``flock`` on ``<folder>/.daso.lock``
for the run's life, and another on ``<checkpoint dir>/.daso.lock`` when the checkpoints live
elsewhere (released by the kernel when the process ends, however it ends). A run into a folder
that holds another run's metrics rows or checkpoints is refused unless ``trainer.overwrite`` is
set, which deletes that run's files first: a new run always, a resume when the folder's
``run.json`` names another run than the checkpoint's.

``run.json`` also lists the checkpoints the run wrote (``checkpoints``: the folder and the
names), updated after each save: the only files a resumed run ever prunes. Names read from a
checkpoint are data and never decide what is deleted.
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
    """Write ``data`` as JSON so that ``path`` holds either the old or the new text.

    Raises:
        OSError: the folder is not writable or the disk is full (the old text stays).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
        raise


#: Largest ``run.json`` read, in bytes (the record of a run with many resumes is a few hundred
#: kilobytes; a larger file is not daso's).
MAX_RECORD_BYTES = 16_000_000


def read_record(folder: Path) -> dict[str, Any] | None:
    """The ``run.json`` in ``folder``, or ``None`` if there is none, it is unreadable, larger
    than :data:`MAX_RECORD_BYTES` or not a JSON object."""
    try:
        with (folder / RECORD).open("rb") as handle:
            raw = handle.read(MAX_RECORD_BYTES + 1)
        record = json.loads(raw) if len(raw) <= MAX_RECORD_BYTES else None
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def _lock_folder(folder: Path, run_id: str) -> Any:
    """An exclusive ``flock`` on ``folder/.daso.lock``, held through the returned handle.

    Raises:
        ConfigError: another process holds it, naming that process.
    """
    handle = (folder / LOCK).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read(200).strip() or "another process"
        handle.close()
        raise ConfigError(
            f"{folder} is in use by another run ({holder}); wait for it to end, or give this "
            "run its own folder with --set trainer.output_dir=DIR (and checkpoint.dir=DIR)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"run {run_id}, pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


class RunFolder:
    """Rank 0's claim on a run's output folder (see the module docstring).

    Args:
        folder: ``trainer.output_dir``.
        checkpoint_dir: the checkpoint folder (inside ``folder`` or elsewhere).
        run_id: this run's id.
    """

    def __init__(self, folder: Path, checkpoint_dir: Path, run_id: str) -> None:
        self.folder, self.checkpoint_dir, self.run_id = folder, checkpoint_dir, run_id
        self._locks: list[Any] = []

    def claim(self, resumed: bool, overwrite: bool) -> None:
        """Lock the output folder and the checkpoint folder, and make sure they hold no other
        run's results: for a new run none at all; for a resume none of a run other than the
        one resumed (``run.json`` must name this run's id, the checkpoint's).

        Raises:
            ConfigError: another process holds either folder's lock (a run in progress), or
                the folders hold another run's metrics or checkpoints and ``overwrite`` is off.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        self._locks.append(_lock_folder(self.folder, self.run_id))
        if self.checkpoint_dir.resolve() != self.folder.resolve():
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            try:
                self._locks.append(_lock_folder(self.checkpoint_dir, self.run_id))
            except ConfigError as err:
                self.release()
                raise ConfigError(f"checkpoint.dir {err}") from None
        old = read_record(self.folder) or {}
        if resumed and old.get("run_id") == self.run_id:
            return
        found = self.other_runs_files()
        if not found:
            return
        what = f"run {old.get('run_id')} of {old.get('started', '?')}" if old else "another run"
        if not overwrite:
            self.release()
            if resumed:
                raise ConfigError(
                    f"{self.folder} holds the results of {what} ({', '.join(found)}), not of "
                    f"run {self.run_id} that this checkpoint continues; resume it into its own "
                    "folder with --set trainer.output_dir=DIR, continue the folder's run with "
                    "--resume auto, or replace its results with --set trainer.overwrite=true"
                )
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

    def release(self) -> None:
        """Drop the folders' locks (the end of the run)."""
        for handle in self._locks:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        self._locks = []

    def record_checkpoints(self, names: list[str]) -> None:
        """Note in ``run.json`` that this run's checkpoints in its checkpoint folder are now
        ``names`` (after a save and its pruning); nothing happens without a ``run.json`` of
        this run (a save before :meth:`claim`)."""
        record = read_record(self.folder)
        if record is None or record.get("run_id") != self.run_id:
            return
        record["checkpoints"] = {"folder": str(self.checkpoint_dir.resolve()), "names": names}
        try:
            write_json_atomic(self.folder / RECORD, record)
        except OSError as err:  # the checkpoint is written; only its pruning on resume is lost
            log.warning(
                "could not note checkpoint %s in %s (%s): a resumed run will not prune it",
                names[0] if names else "",
                self.folder / RECORD,
                err,
            )

    def recorded_checkpoints(self) -> list[str]:
        """The checkpoints this run recorded (:meth:`record_checkpoints`) in its checkpoint
        folder: names of the checkpoint pattern only, and none when ``run.json`` belongs to
        another run or names another folder."""
        from daso.checkpoint import NAME

        record = read_record(self.folder) or {}
        saved = record.get("checkpoints")
        if record.get("run_id") != self.run_id or not isinstance(saved, dict):
            return []
        if saved.get("folder") != str(self.checkpoint_dir.resolve()):
            return []
        names = saved.get("names")
        if not isinstance(names, list):
            return []
        return [n for n in names if isinstance(n, str) and NAME.match(n)]

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
