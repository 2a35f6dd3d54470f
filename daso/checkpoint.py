"""Checkpoint files: one per save, written by rank 0, atomic, checksummed, pruned to ``keep``.

A checkpoint holds what an exact resume needs from *every* rank, because ranks do not always
agree: DASO's nodes differ between global syncs, EASGD's workers always do, and each rank has its
own RNG stream. Each rank serialises its own state (model, optimizer, strategy); rank 0 gathers
one copy of each distinct state (ranks whose bytes are equal, e.g. all ranks of ``ddp``, share
one copy, found by SHA-256 digest before anything large moves) plus every rank's small
per-rank extras (RNG states, partial-epoch counters).

File format (``ckpt-e<epoch>-b<batch>.pt``): the line ``DASO-CHECKPOINT 1``, the SHA-256 hex
digest of the payload, a newline, then the payload, a :func:`torch.save` archive of::

    {"meta": {...}, "shared": {...}, "states": [bytes, ...], "rank_state": [int] * world,
     "rank_extra": [bytes] * world}

``meta`` names the model, strategy, world size, node layout, epoch and batch; ``shared`` holds
what is equal on all ranks (LR scheduler, GradScaler, trainer counters, the config). The file is
written to a temporary name in the same folder, flushed, fsynced and renamed, so a reader sees
either the whole file or none of it; the checksum catches later damage.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import pickle
import random
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBytes,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from daso.errors import CheckpointError
from daso.log import ONCE

log = logging.getLogger(__name__)

MAGIC = b"DASO-CHECKPOINT 1\n"
DIGEST_BYTES = 64  # SHA-256 as hex
NAME = re.compile(r"^ckpt-e(\d+)-b(\d+)\.pt$")


def checkpoint_name(epoch: int, batch: int) -> str:
    """File name of the checkpoint taken after ``batch`` batches of ``epoch`` (0 = its start)."""
    return f"ckpt-e{epoch:05d}-b{batch:07d}.pt"


def serialize(obj: Any) -> bytes:
    """``obj`` as :func:`torch.save` bytes (tensors moved to the CPU first)."""
    buffer = io.BytesIO()
    torch.save(_to_cpu(obj), buffer)
    return buffer.getvalue()


def deserialize(data: bytes, device: torch.device | str = "cpu") -> Any:
    """Inverse of :func:`serialize`; tensors land on ``device``. Only plain data is unpickled
    (``weights_only``), so a checkpoint cannot run code.

    Raises:
        CheckpointError: ``data`` is not a torch archive of plain data (the message never
            suggests loading it unsafely).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on a foreign pickle protocol
            return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad archive
        raise CheckpointError(_unreadable_reason(err)) from None


#: The object torch's safe unpickler refused, from its message.
_REFUSED = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _unreadable_reason(err: BaseException) -> str:
    """Why an archive cannot be read, in one line, without torch's advice to load it unsafely
    (``weights_only=False`` runs whatever code the file holds; checkpoints are untrusted).

    The safe unpickler's refusal is recognised by its type (:class:`pickle.UnpicklingError`),
    not by torch's wording, which changes between releases; none of its text is quoted."""
    if isinstance(err, pickle.UnpicklingError):
        refused = _REFUSED.search(str(err))
        what = f"a Python object ({refused[1]})" if refused else "Python objects or code"
        return (
            f"it holds {what} that daso never writes; daso reads only tensors and plain data "
            "from checkpoints, so it was not written by daso or is damaged"
        )
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"its contents are not a readable torch archive ({type(err).__name__}: {first[:200]})"


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, _to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: torch CPU, every CUDA device (if any) and Python's ``random``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# -- writing --------------------------------------------------------------------------------------
def write_atomic(path: Path, payload: bytes) -> None:
    """Write ``MAGIC + sha256(payload) + payload`` to ``path`` so that it appears whole or not
    at all: temporary file in the same folder, flush, fsync, rename, fsync of the folder.

    Raises:
        OSError: the folder is not writable or the disk is full (the temporary file is removed;
            an existing ``path`` is left untouched).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256(payload).hexdigest().encode()
    try:
        with open(tmp, "wb") as handle:
            handle.write(MAGIC + digest + b"\n")
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def list_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint files in ``folder``, newest (highest epoch, then batch) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(NAME.match(p.name), p) for p in folder.iterdir()]
    ranked = [((int(m[1]), int(m[2])), p) for m, p in found if m]
    return [p for _, p in sorted(ranked, reverse=True)]


def _position(name: str) -> tuple[int, int]:
    match = NAME.match(name)
    return (int(match[1]), int(match[2])) if match else (-1, -1)


def newest_names(names: Sequence[str], keep: int) -> list[str]:
    """The newest ``keep`` of the checkpoint file ``names`` (highest epoch, then batch), newest
    first; names that are not checkpoint names are dropped."""
    ranked = sorted({n for n in names if NAME.match(n)}, key=_position, reverse=True)
    return ranked[:keep]


def prune(folder: Path, keep: int, own: Sequence[str]) -> list[str]:
    """Delete this run's checkpoints in ``folder`` beyond the newest ``keep``.

    Only files named in ``own`` (this run's checkpoints, as the run itself recorded them,
    oldest to newest in any order) are ever deleted, and of those only names of the checkpoint
    pattern (``ckpt-e<epoch>-b<batch>.pt``, so no folder, ``..`` or absolute path) directly in
    ``folder``: another run's checkpoints and any other file are left alone and never push
    this run's out.

    Returns:
        The names kept, newest first.
    """
    names = {n for n in own if isinstance(n, str) and NAME.match(n)}
    kept = newest_names(sorted(names), keep)
    for name in names - set(kept):
        path = folder / name
        if path.parent == folder and not path.is_dir():
            path.unlink(missing_ok=True)
    return kept


def gather_and_save(
    path: Path,
    meta: dict[str, Any],
    shared: dict[str, Any],
    rank_state: dict[str, Any],
    rank_extra: dict[str, Any],
    keep: int,
    group: dist.ProcessGroup | None = None,
    own: Sequence[str] = (),
) -> None:
    """Collective over ``group`` (all ranks): gather every rank's state to rank 0 and write it.

    Args:
        path: the checkpoint file to create (rank 0 writes it).
        meta: identification of the run (rank 0's is stored).
        shared: state equal on all ranks (rank 0's is stored).
        rank_state: this rank's own state (model, optimizer, strategy, ...); ranks with equal
            bytes are stored once.
        rank_extra: this rank's small own data (RNG states, counters), stored per rank.
        keep: newest checkpoints of this run kept in ``path``'s folder after the write.
        group: the world process group (``None``: the default group; without
            ``torch.distributed``, a single process).
        own: names of this run's earlier checkpoints in that folder: the only files pruned.

    Raises:
        CheckpointError: on every rank, if rank 0 could not write the file (the message holds
            rank 0's error); the previous checkpoints are intact.
    """
    extra = serialize(rank_extra)
    state_blob = serialize(rank_state)
    digest = hashlib.sha256(state_blob).hexdigest()
    if not dist.is_initialized():
        _write(path, meta, shared, [state_blob], [0], [extra], keep, own)
        return
    group = group or dist.group.WORLD
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    digests: list[Any] = [None] * world
    dist.all_gather_object(digests, digest, group=group)  # 64 bytes a rank
    extras: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(extra, extras, dst=0, group=group)  # small and of similar sizes
    owners: dict[str, int] = {}
    for r, d in enumerate(digests):
        owners.setdefault(d, r)
    # each distinct state travels once, point to point (gather_object would pad every rank's
    # contribution to the largest, sending a full state from every rank)
    blobs = {0: state_blob} if rank == 0 else {}
    for owner in sorted(set(owners.values()) - {0}):
        box = [state_blob]
        if rank == owner:
            dist.send_object_list(box, dst=dist.get_global_rank(group, 0), group=group)
        elif rank == 0:
            dist.recv_object_list(box, src=dist.get_global_rank(group, owner), group=group)
            blobs[owner] = box[0]
    error = [None]
    if rank == 0:
        order = list(owners)
        states = [blobs[owners[d]] for d in order]
        index = [order.index(d) for d in digests]
        try:
            _write(path, meta, shared, states, index, extras, keep, own)
        except OSError as err:
            error[0] = write_failure(path, err, sum(map(len, states)))
    dist.broadcast_object_list(error, src=0, group=group)
    if error[0] is not None:
        raise CheckpointError(error[0])


def write_failure(path: Path, err: OSError, size: int) -> str:
    """The one-line message for a checkpoint that could not be written, with the fix."""
    mb = size / 1e6
    if err.errno == errno.ENOSPC:
        fix = (
            f"free space there (each checkpoint needs about {mb:.0f} MB), lower checkpoint.keep, "
            "or set checkpoint.dir to a folder with room"
        )
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make the folder writable, or set checkpoint.dir to a writable folder"
    else:
        fix = "check the folder, or set checkpoint.dir to another one"
    return (
        f"rank 0 could not write checkpoint {path}: {err.strerror or err}; {fix} "
        "(older checkpoints are intact)"
    )


def _write(
    path: Path,
    meta: dict[str, Any],
    shared: dict[str, Any],
    states: list[bytes],
    index: list[int],
    extras: list[bytes],
    keep: int,
    own: Sequence[str],
) -> None:
    payload = serialize(
        {
            "meta": meta,
            "shared": shared,
            "states": states,
            "rank_state": index,
            "rank_extra": extras,
        }
    )
    write_atomic(path, payload)
    prune(path.parent, keep, [*own, path.name])
    log.info(
        "checkpoint %s written (%.1f MB, %d distinct rank states)",
        path,
        len(payload) / 1e6,
        len(states),
    )


# -- reading --------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify a checkpoint file.

    Returns:
        The payload dict (``meta``, ``shared``, ``states``, ``rank_state``, ``rank_extra``);
        rank states are still bytes (see :func:`rank_state`).

    Raises:
        CheckpointError: the file is missing, is not a daso checkpoint, is truncated or its
            checksum does not match (a damaged file), naming the path.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a folder; pass a checkpoint file in it (ckpt-e*-b*.pt), or "
            "--resume auto for the newest in checkpoint.dir"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the --resume path")
    data = path.read_bytes()
    head = len(MAGIC) + DIGEST_BYTES + 1
    if not data.startswith(MAGIC) or len(data) < head:
        raise CheckpointError(f"{path} is not a daso checkpoint (bad header)")
    stored = data[len(MAGIC) : head - 1].decode(errors="replace")
    payload = data[head:]
    if hashlib.sha256(payload).hexdigest() != stored:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its SHA-256 checksum does not match its contents "
            "(a partial copy or damaged disk); resume from an older one, or --resume auto"
        )
    try:
        checkpoint = deserialize(payload)
        _check_structure(checkpoint)
        signature = [(k, list(v)) for k, v in checkpoint["meta"]["model_signature"]]
        for blob in checkpoint["states"]:
            _check_rank_state(deserialize(blob), signature)
        for blob in checkpoint["rank_extra"]:
            _check_rank_extra(deserialize(blob))
    except CheckpointError as err:
        raise CheckpointError(
            f"checkpoint {path} cannot be read: {err}; resume from an older one, or "
            "--resume auto (which skips it)"
        ) from None
    return checkpoint


#: What every checkpoint's ``meta`` holds (see the module docstring).
META_KEYS = ("model", "strategy", "world_size", "layout", "epoch", "batch", "model_signature")

_Plain = ConfigDict(extra="allow", arbitrary_types_allowed=True)


class CheckpointMeta(BaseModel):
    """A checkpoint's ``meta``: what wrote it and where it stands (validated on read)."""

    model_config = _Plain
    model: StrictStr
    strategy: StrictStr
    world_size: StrictInt = Field(ge=1)
    layout: list[StrictInt] = Field(min_length=1)
    epoch: StrictInt = Field(ge=0)
    batch: StrictInt = Field(ge=0)
    model_signature: list[tuple[StrictStr, list[StrictInt]]]

    @model_validator(mode="after")
    def _layout_holds_the_world(self) -> CheckpointMeta:
        if any(n < 1 for n in self.layout) or sum(self.layout) != self.world_size:
            raise ValueError(f"layout {self.layout} does not hold {self.world_size} ranks")
        return self


class CheckpointShared(BaseModel):
    """A checkpoint's ``shared`` part: what is equal on every rank."""

    model_config = _Plain
    run_id: StrictStr | None = None
    history: list[dict[str, Any]] = []
    lr_scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    windows: list[dict[str, Any]] = []


class CheckpointPayload(BaseModel):
    """The whole payload; every rank's index must point at one of the distinct ``states``."""

    model_config = _Plain
    meta: CheckpointMeta
    shared: CheckpointShared
    states: list[StrictBytes] = Field(min_length=1)
    rank_state: list[StrictInt]
    rank_extra: list[StrictBytes]

    @model_validator(mode="after")
    def _one_state_per_rank(self) -> CheckpointPayload:
        world = self.meta.world_size
        if len(self.rank_state) != world or len(self.rank_extra) != world:
            raise ValueError(f"its per-rank states do not match its {world} ranks")
        if any(not 0 <= i < len(self.states) for i in self.rank_state):
            raise ValueError(f"its per-rank states do not match its {world} ranks")
        return self


class RankState(BaseModel):
    """One rank's stored state: the model's tensors, the optimizer's and the strategy's state."""

    model_config = _Plain
    model: dict[StrictStr, torch.Tensor]
    optimizer: dict[str, Any]
    strategy: dict[str, Any]


class RankExtra(BaseModel):
    """One rank's small data: its RNG states and partial-epoch counters."""

    model_config = _Plain
    rng: dict[str, Any]
    partial: dict[str, Any] = {}


def _validation_text(err: ValidationError) -> str:
    """The first problem of ``err`` in a few words: where and what (never the value)."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "the top level"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg'].removeprefix('Value error, ')}{more}"


def _validate(model: type[BaseModel], value: Any, what: str) -> None:
    """Raise :class:`CheckpointError` unless ``value`` is a dict valid as ``model``, naming
    ``what`` it is and its first problem."""
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} is a {type(value).__name__}, not a dict")
    try:
        model.model_validate(value)
    except ValidationError as err:
        raise CheckpointError(f"{what} is not daso's: {_validation_text(err)}") from None


def _check_structure(checkpoint: Any) -> None:
    """Raise :class:`CheckpointError` unless ``checkpoint`` has the layout and types
    :func:`gather_and_save` writes (so a well-formed but foreign or damaged archive is refused
    here, not by a ``KeyError`` or ``TypeError`` half-way through a resume)."""
    _validate(CheckpointPayload, checkpoint, "its payload")


def _check_rank_state(state: Any, signature: list[tuple[str, list[int]]]) -> None:
    """A rank's state must be a :class:`RankState` whose model tensors match ``signature``."""
    _validate(RankState, state, "a rank's state")
    found = [(k, list(v.shape)) for k, v in state["model"].items()]
    if found != signature:
        raise CheckpointError(
            "a rank's model state has other tensors (names or shapes) than the checkpoint's "
            "model_signature says"
        )


def _check_rank_extra(extra: Any) -> None:
    _validate(RankExtra, extra, "a rank's extra data")


def newest_valid(folder: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` that passes :func:`read_checkpoint`, skipping (with a
    warning) damaged ones; ``None`` if there is none."""
    for path in list_checkpoints(folder):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping %s; trying the one before", err, extra=ONCE)
    return None


def resolve_resume(
    source: str | os.PathLike[str], folder: str | os.PathLike[str]
) -> tuple[Path, dict[str, Any]] | None:
    """Resolve ``--resume``: ``"auto"`` is the newest valid checkpoint in ``folder`` (``None``
    if there is none yet), anything else a checkpoint file, read and verified.

    Raises:
        CheckpointError: ``source`` is a path to a missing or damaged file.
    """
    if str(source) == "auto":
        found = newest_valid(folder)
        if found is None:
            log.info("no checkpoint in %s: starting from scratch", folder)
        return found
    return Path(source), read_checkpoint(source)


def rank_state(checkpoint: dict[str, Any], rank: int, device: torch.device) -> dict[str, Any]:
    """Rank ``rank``'s stored state (model, optimizer, strategy, ...) with tensors on ``device``."""
    return deserialize(checkpoint["states"][checkpoint["rank_state"][rank]], device)


def rank_extra(checkpoint: dict[str, Any], rank: int) -> dict[str, Any]:
    """Rank ``rank``'s small own data (e.g. its RNG state for :func:`restore_rng_state`)."""
    return deserialize(checkpoint["rank_extra"][rank])


def check_compatible(
    checkpoint: dict[str, Any],
    source: Path,
    model: str,
    strategy: str,
    layout: Sequence[int],
) -> bool:
    """Whether ``checkpoint`` can resume a run of ``model`` with ``strategy`` on ``layout``.

    Args:
        layout: ranks per node of this run, e.g. ``[2, 2]``.

    Returns:
        ``True`` if the resume is exact (same layout); ``False`` if the layout differs but every
        rank's state is equal and the checkpoint is at an epoch boundary, so it can be
        re-sharded (RNG streams then restart from the seed).

    Raises:
        CheckpointError: a different model or strategy, or a different layout when the ranks'
            states differ (the strategy keeps per-node state that cannot be re-sharded).
    """
    meta = checkpoint["meta"]
    if meta["model"] != model or meta["strategy"] != strategy:
        raise CheckpointError(
            f"checkpoint {source} was written by model '{meta['model']}' with strategy "
            f"'{meta['strategy']}', but this run uses model '{model}' with strategy "
            f"'{strategy}'; resume with the same model and strategy, or start a new run in "
            "a folder of its own: leave out --resume and --set trainer.output_dir=DIR"
        )
    if list(meta["layout"]) == list(layout):
        return True
    if len(checkpoint["states"]) == 1 and meta["batch"] == 0:
        return False
    raise CheckpointError(
        f"checkpoint {source} was written by {meta['world_size']} ranks on nodes "
        f"{list(meta['layout'])}; this run has {sum(layout)} ranks on nodes {list(layout)}. "
        f"Strategy '{strategy}' keeps per-rank state at this point, which cannot be re-sharded: "
        "launch with the checkpoint's layout"
    )
