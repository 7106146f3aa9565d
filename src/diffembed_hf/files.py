"""Input and output locations checked before any work, and output written whole, never over the user's files,
with their umask.

Every job builds its output in a hidden temporary folder or file beside the destination and renames it into
place when complete. Temporary folders are created private (0700, files 0600 by some writers), so before the
rename the modes are set to what any other file the user writes would get (0777 / 0666 minus the umask).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import stat
from pathlib import Path

from .errors import OutputExistsError, UsageError

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
    if not out.exists():
        os.rename(tmp, out)
        return
    old = temporary_sibling(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def remove_stale_temp_folders(out: Path) -> None:
    """Remove the temporary siblings (`temporary_sibling(out)`) that a killed job left beside `out`: only those
    whose process is gone, so a job still running in another process keeps its folder."""
    for path in out.parent.glob(f".{out.name}.tmp-*"):
        match = re.match(rf"\.{re.escape(out.name)}\.tmp-(\d+)-", path.name)
        if match and not _process_alive(int(match.group(1))):
            logger.info("Removing %s, left by an interrupted run.", path)
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
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


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


def looks_like_hub_id(name: str) -> bool:
    """"namespace/name" with Hub characters: what could be a Hub repo rather than a (missing) local path."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not name.endswith((".jsonl", ".json", ".csv",
                                                                                        ".parquet", ".txt"))


def check_data_source(source: str) -> None:
    """A local training-data file exists with a known type; anything else must be able to be a Hub dataset id."""
    formats = (".jsonl", ".json", ".csv", ".parquet")
    path = Path(source).expanduser()
    if path.is_dir():
        raise UsageError(f"{source} is a folder; give a .jsonl / .json / .csv / .parquet file or a Hub dataset id")
    if path.exists():
        if path.suffix not in formats:
            raise UsageError(f"{source}: unsupported file type {path.suffix or '(none)'}; use "
                             f"{', '.join(formats)}")
        return
    if path.suffix in formats or not looks_like_hub_id(source):
        raise UsageError(f"{source}: no such file" + ("" if path.suffix in formats else
                                                      " (and not a Hub dataset id of the form namespace/name)"))


def write_text(path: Path, text: str) -> None:
    """Write a text file whole (temporary file + rename), as a new file with the user's umask."""
    path = Path(path)
    tmp = temporary_sibling(path, "partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        move_into_place(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
