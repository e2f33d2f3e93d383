"""Checkpoints that survive a kill at any moment, and the newest one that reads completely.

Lightning writes a checkpoint file through fsspec's transaction: into a temporary file in ``TMPDIR``, then moved to
its name, which is a copy, not a rename, when ``TMPDIR`` is on another filesystem: a kill during it leaves a torn file
under the final name. Here a file is written beside its final name (``.<name>.tmp-<pid>``), flushed to disk and
renamed over it; ``FSDP2Strategy`` writes its distributed (DCP) folders the same way. What a killed write leaves
(only temporary names) is removed when the next fit starts, and ``--ckpt_path last`` takes the newest checkpoint
that reads completely, naming any it skips.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO

TEMPORARY = ".*.tmp-*"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing each file atomically in its own folder (whatever ``TMPDIR`` is)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote stores: fsspec's own way
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
            sync_folder(path.parent)
        finally:
            temporary.unlink(missing_ok=True)


def sync_folder(folder: Path) -> None:
    """The rename itself on disk (a folder's entries are flushed by fsync on the folder, where the OS allows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def replace_folder(written: Path, path: Path) -> None:
    """A finished distributed checkpoint folder takes ``path``'s place (the previous one goes after)."""
    old = path.parent / f".{path.name}.old.tmp-{os.getpid()}"
    if path.exists():
        path.rename(old) if path.is_dir() else path.replace(old)
    written.rename(path)
    sync_folder(path.parent)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists():
        old.unlink()


def unreadable(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is: a file must be a whole ``torch.save`` archive
    (its zip directory, written last, is there); a distributed folder must hold DCP's ``.metadata`` (written when
    every rank has finished), every shard file it names at full length, and Lightning's ``meta.pt``."""
    if path.is_dir():
        if not (path / ".metadata").is_file():
            return "a distributed checkpoint whose write did not finish (no .metadata)"
        from torch.distributed.checkpoint import FileSystemReader

        try:
            storage = FileSystemReader(str(path)).read_metadata().storage_data or {}
        except Exception as error:  # noqa: BLE001
            return f"an unreadable .metadata ({type(error).__name__})"
        for item in storage.values():
            shard = path / item.relative_path
            if not shard.is_file() or shard.stat().st_size < item.offset + item.length:
                return f"a distributed checkpoint missing part of {item.relative_path}"
        return _archive(path / "meta.pt")
    return _archive(path)


def _archive(path: Path) -> str | None:
    if not path.is_file():
        return f"no file {path.name}"
    if path.stat().st_size == 0:
        return "empty (0 bytes)"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "not a torch checkpoint"
    except zipfile.BadZipFile:
        return "truncated (its end is missing: a write that was killed)"
    except OSError as error:
        return f"unreadable ({error})"
    return None


def remove_leftovers(folder: Path) -> list[Path]:
    """Temporary files and folders a killed write left in ``folder``; removed, and returned."""
    gone = sorted(folder.glob(TEMPORARY)) if folder.is_dir() else []
    for path in gone:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return gone


def candidates(folders: list[Path]) -> list[Path]:
    """The checkpoints (``*.ckpt`` files or distributed folders) in ``folders``, newest first."""
    found = {p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt") if not p.name.startswith(".")}
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def newest_readable(folders: list[Path]) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint that reads completely or None, [(skipped checkpoint, why), ...])."""
    skipped = []
    for path in candidates(folders):
        reason = unreadable(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped
