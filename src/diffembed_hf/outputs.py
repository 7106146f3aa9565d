"""Output locations checked before any work, output written whole (never over the user's files, with their
umask), and one writer at a time per output.

Every job publishes its output through `staged_folder` / `staged_file`: the output is built in a hidden
temporary sibling (same filesystem) and renamed into place when complete, so a reader never sees half an
output under its final name and a killed job leaves only a hidden sibling, which the next run removes.
Temporary folders are created private (0700, files 0600 by some writers), so before the rename the modes are
set to what any other file the user writes would get (0777 / 0666 minus the umask). `output_lock` makes a
second run into the same output refuse at once, naming the run that holds it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputAppearedError, OutputExistsError, OutputLockedError, UsageError

logger = logging.getLogger(__name__)


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux); else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give `path` and everything below it the modes a new file or folder gets from the umask (executable
    files keep their execute bits, masked the same way); symbolic links and hard links (a file with another name
    elsewhere, e.g. a source model's weights linked into an export) are left alone: their mode is not ours."""
    mask = current_umask()
    path = Path(path)
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        info = entry.lstat()
        if stat.S_ISLNK(info.st_mode) or (stat.S_ISREG(info.st_mode) and info.st_nlink > 1):
            continue
        mode = info.st_mode
        if stat.S_ISDIR(mode) or mode & 0o111:
            os.chmod(entry, 0o777 & ~mask)
        else:
            os.chmod(entry, 0o666 & ~mask)


def check_output_folder(out: Path, *, overwrite: bool, option: str = "--overwrite") -> None:
    """Refuse, before any work, an output folder that would replace the user's data or cannot be created."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} exists and is not empty; pass {option} to replace it")
    check_parent_writable(out)


def check_parent_writable(out: Path) -> None:
    """The folder that will receive `out` exists (or can be created) and is writable."""
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{out}: cannot write in {parent} (permission denied)")


def temporary_sibling(out: Path, kind: str = "tmp") -> Path:
    """A hidden, unique name beside `out` (same filesystem, so a rename is atomic)."""
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`, with the user's umask; an existing `out` is replaced only now, once
    the new one is whole (it is moved aside first and put back if the rename fails)."""
    apply_umask(tmp)
    if not out.exists() and not out.is_symlink():
        os.rename(tmp, out)
        return
    old = temporary_sibling(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def final_path(out: Path) -> Path:
    """Where an output really goes: a symbolic link the user made for OUT (to another disk, say) is followed, so
    the new output replaces the link's target and the link keeps working."""
    out = Path(out).expanduser().absolute()
    return out.resolve() if out.is_symlink() else out


@contextlib.contextmanager
def staged_folder(out: Path, *, resumable: bool = False, replace: bool = True) -> Iterator[Path]:
    """Build a folder for `out` and publish it whole: yields an empty hidden sibling folder to fill, renamed to
    `out` (replacing the old one only then) when the block ends without error, removed when it raises.

    The job must hold `output_lock` on `out` (or a folder above it), taken before it checked `out`: a check made
    without the lock says nothing about what another run publishes meanwhile. `replace=False` (no --overwrite)
    also refuses, at publication, an `out` that is there by then (`OutputAppearedError`, exit status 1).

    `resumable=True` uses a stable name (`.OUT.partial`) that a failed or killed run leaves in place for the
    next run to continue from (the caller decides what in it can be kept)."""
    out = final_path(out)
    if not holds_lock(out):
        raise RuntimeError(f"internal error: {out} is published without its output lock (files.output_lock)")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_folders(out)
    if resumable:
        work = partial_folder(out)
        work.mkdir(exist_ok=True)
    else:
        work = temporary_sibling(out)
        work.mkdir()
    try:
        yield work
        if not replace and (out.is_symlink() or out.exists() and not (out.is_dir() and not any(out.iterdir()))):
            raise OutputAppearedError(f"{out} appeared while this command ran, so nothing was written; pass "
                                      "--overwrite to replace it")
        move_into_place(work, out)
    except BaseException:
        if not resumable:
            shutil.rmtree(work, ignore_errors=True)
        raise


def partial_folder(out: Path) -> Path:
    """The stable staging folder a resumable job (`staged_folder(..., resumable=True)`) keeps beside `out`."""
    return out.parent / f".{out.name}.partial"


@contextlib.contextmanager
def staged_file(out: Path, *, replace: bool = True) -> Iterator[Path]:
    """Write a file for `out` and publish it whole: yields a hidden sibling path to write, renamed to `out` when
    the block ends without error (with the user's umask), removed when it raises.

    `replace=False` (no --overwrite) publishes only where nothing is at `out` by then, checked and created in one
    step (a hard link), so a file that another process made while this job ran is never replaced: that raises
    `OutputAppearedError` (exit status 1: the work was done, and is not kept)."""
    out = final_path(out)
    tmp = temporary_sibling(out, "partial")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # on disk before it gets its final name
            os.fsync(handle.fileno())
        if replace:
            move_into_place(tmp, out)
        else:
            _publish_new(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _publish_new(tmp: Path, out: Path) -> None:
    apply_umask(tmp)
    appeared = OutputAppearedError(f"{out} appeared while this command ran, so nothing was written; pass "
                                   "--overwrite to replace it")
    try:
        os.link(tmp, out)  # fails if `out` exists, whoever made it and whenever
    except FileExistsError:
        raise appeared from None
    except OSError:  # a file system without hard links: the check and the rename are two steps there
        if out.exists() or out.is_symlink():
            raise appeared from None
        os.rename(tmp, out)
        return
    tmp.unlink()


def remove_stale_temp_folders(out: Path) -> None:
    """Remove the temporary siblings (`temporary_sibling(out)`) that a killed job left beside `out`: only those
    whose process is gone, so a job still running in another process keeps its folder."""
    for path in out.parent.glob(f".{out.name}.tmp-*"):
        match = re.match(rf"\.{re.escape(out.name)}\.tmp-(\d+)-", path.name)
        if match and not _process_alive(int(match.group(1))):
            logger.info("Removing the unfinished output of an interrupted run beside %s.", out)
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    return True


def check_output_file(out: Path, *, overwrite: bool, suffixes: tuple[str, ...] | None = None) -> None:
    """Refuse, before any work, an output file that exists (without --overwrite), has the wrong suffix, or
    whose folder is missing."""
    if suffixes and out.suffix not in suffixes:
        raise UsageError(f"--output must end in {' or '.join(suffixes)}, got {out}")
    if out.is_dir():
        raise UsageError(f"{out} is a folder; --output names a file")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")
    if not out.absolute().parent.is_dir():
        raise UsageError(f"the folder {out.absolute().parent} of --output does not exist")
    if not os.access(out.absolute().parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write in {out.absolute().parent} (permission denied)")


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string like "5GB" (10^9) or "500MiB" (2^20); must be > 0."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.fullmatch(size.strip().upper())
        if not match:
            raise UsageError(f"cannot read the size {size!r}; use e.g. '5GB' or '500MiB'")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if value <= 0:
        raise UsageError(f"max_shard_size must be positive, e.g. '5GB' or '500MiB'; got {size!r}")
    return value


def write_text(path: Path, text: str) -> None:
    """Write a text file whole (temporary file + rename), as a new file with the user's umask."""
    with staged_file(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data) -> None:
    """`write_text` of indented JSON (UTF-8 kept as it is)."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------------------
# One writer per output
# ----------------------------------------------------------------------------------------------------------


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


_HELD: set[Path] = set()  # the outputs whose lock this process holds (`output_lock`)


def holds_lock(out: Path) -> bool:
    """Whether this process holds the lock of `out` or of a folder above it (a job's output holding the
    outputs of its steps, as the demo's folder holds its model)."""
    out = final_path(out)
    return any(path in _HELD for path in (out, *out.parents))


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux), which tells a live holder from a new process that got
    its pid; None where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine: its process cannot be checked from here
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _process_alive(pid):
        return False
    started = holder.get("started_ticks")
    return started is None or _start_time(pid) in (None, started)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold `.OUT.lock` (beside OUT) while a job writes OUT: a second run into the same output is refused at
    once, naming the holder (pid, host, command). A lock whose process is gone (same host) is stale: it is
    removed with a warning and taken over.

    Take it before checking OUT (exists, --overwrite): only a check made under the lock still holds when the
    job publishes; a run that checked first could replace the output another run finished meanwhile."""
    out = final_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(out)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started_ticks": _start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                text = lock.read_text(encoding="utf-8")
                holder = json.loads(text)
            except FileNotFoundError:
                continue  # released in between: try again
            except (OSError, ValueError):
                holder, text = {}, None
            if isinstance(holder, dict) and _holder_alive(holder) and text is not None:
                raise OutputLockedError(
                    f"{out} is being written by another run (pid {holder.get('pid')} on {holder.get('host')}, since "
                    f"{holder.get('since')}: {holder.get('command')!r}); wait for it to end, or remove {lock} if "
                    "that run is gone") from None
            logger.warning("Removing the stale lock %s (its run is gone).", lock)
            with contextlib.suppress(FileNotFoundError):
                if text is None or lock.read_text(encoding="utf-8") == text:  # not taken over in between
                    lock.unlink()
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        break
    else:
        raise OutputLockedError(f"could not take the lock {lock}; another run keeps taking it")
    _HELD.add(out)
    try:
        yield
    finally:
        _HELD.discard(out)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(lock.read_text(encoding="utf-8")).get("pid") == os.getpid():
                lock.unlink()
