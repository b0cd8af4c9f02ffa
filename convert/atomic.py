"""Atomic output folders: build in a hidden staging folder beside the target, then rename.

An interrupted or failed write leaves only the staging folder (named ``.NAME.partial-PID-*``, never
mistaken for a model) and never touches an existing target until the new one is complete; what a killed
process left (SIGKILL, the out-of-memory killer) is removed by the next write to the same target.
Renames use :func:`os.replace`, which works the same on Windows and POSIX. Windows refuses to
rename a folder while a program has one of its files open (the demo or server serving it): the
old folder then stays where it was (or is put back) and :class:`FolderInUseError` says so.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


# Staging folders of this process, and whether each is being put in place right now (see abandon_staging).
_STAGING: dict[Path, bool] = {}


class OutputError(Exception):
    """The output folder cannot be written (exists and is not empty, or is not writable)."""


class FolderInUseError(OutputError):
    """The finished output could not take the target's place: a program holds the old folder open."""


def check_output(target: str | Path, overwrite: bool = False) -> Path:
    """Refuse a non-empty ``target`` unless ``overwrite``, and a parent that cannot be written."""
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise OutputError(f"output {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputError(f"output folder {target} is not empty (pass --overwrite to replace it)")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not writable(parent):
        raise OutputError(f"cannot write to {parent} (read-only or no permission)")
    return target


def writable(folder: Path) -> bool:
    """Whether a folder can be created in ``folder`` (os.access cannot tell on Windows: it ignores ACLs)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=folder))
    except OSError:
        return False
    return True


def staging_prefix(target: Path) -> str:
    """The name a staging folder or file for ``target`` starts with: hidden, and naming this process."""
    return f".{target.name}.partial-{os.getpid()}-"


def remove_stale_staging(target: Path) -> None:
    """Remove the staging folders and files beside ``target`` whose process no longer runs (killed before it
    could clean up), saying so on stderr; those of running processes and of unknown ones stay."""
    import psutil

    for leftover in target.parent.glob(f".{glob.escape(target.name)}.partial-*"):
        owner = re.fullmatch(rf"\.{re.escape(target.name)}\.partial-(\d+)-.*", leftover.name)
        if owner and not psutil.pid_exists(int(owner.group(1))):
            if leftover.is_dir():
                remove_tree(leftover)
            else:
                leftover.unlink(missing_ok=True)
            print(f"note: removed {leftover}, left by an interrupted run (process {owner.group(1)})", file=sys.stderr)


@contextmanager
def staged_output(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces ``target`` in one rename, on failure it is removed."""
    target = check_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(target), dir=target.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    _STAGING[staging] = False
    try:
        yield staging
        _STAGING[staging] = True
        put_in_place(staging, target)
    except BaseException:
        remove_tree(staging)
        raise
    finally:
        _STAGING.pop(staging, None)


@contextmanager
def staged_file(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden staging file beside ``target``; on success it replaces ``target`` in one rename
    (:func:`os.replace`), on failure it is removed and an existing ``target`` stays as it was."""
    target = Path(target).absolute()
    if target.is_dir():
        raise OutputError(f"output {target} is a folder")
    if target.exists() and not overwrite:
        raise OutputError(f"output {target} exists (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    handle, name = tempfile.mkstemp(prefix=staging_prefix(target), dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def abandon_staging() -> bool:
    """Remove this process's staging folders, for a process about to exit at once (an interrupt);
    False, removing nothing, while a finished folder is being put in place (that takes a moment)."""
    if any(_STAGING.values()):
        return False
    for staging in list(_STAGING):
        remove_tree(staging)
    return True


def put_in_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing target is replaced, or kept when that fails."""
    retired = None
    try:
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
        os.replace(staging, target)
    except OSError as error:
        reason = (f"cannot replace {target}: the folder is in use ({error.strerror or error}); close the programs "
                  "using it (chat, demo, server) and convert again")
        if retired is not None:
            if (retired / target.name).exists():
                try:
                    os.replace(retired / target.name, target)  # the old model goes back where it was
                except OSError:
                    raise FolderInUseError(f"{reason}; the previous model is in {retired / target.name}") from None
            remove_tree(retired)
        raise FolderInUseError(reason) from None
    if retired is not None:
        remove_tree(retired)


def remove_tree(folder: Path, attempts: int = 20, pause_s: float = 0.1) -> None:
    """Remove ``folder``, retrying while a library thread still writes into it (or, on Windows, still
    holds a file open); what cannot be removed after ``attempts`` stays behind."""
    for _ in range(attempts):
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            return
        time.sleep(pause_s)
