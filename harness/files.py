"""Writing files so that a kill, a full disk or a read-only filesystem never leaves a half-written one.

- `atomic_write(path, data)`: a temp file in the same folder, fsync, rename over `path`, fsync the folder. A reader
  sees the old file or the new one, never a part of either; a failure removes the temp file.
- `append_record(fd, path, data)`: one record appended whole or not at all (a failed write is cut back off).
- `WriteError`: an OSError while writing (ENOSPC, EROFS, EACCES, ...) as one line naming what could not be written,
  where, and how much space was free there. It is a ConfigError, so the CLI prints it and exits 2.
- `RunLock`: one writer per folder, an exclusive `flock` held for the writer's life; the OS drops it when the
  process dies, even by kill -9, so a stale lock file never blocks the next writer.

Every file tokenfleet writes goes through here. `_open` and `_write` are the only two system calls that create
or fill a file, so a test can make them fail the way a full or read-only disk does.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
from pathlib import Path

from tokenfleet.config import ConfigError

LOCK_NAME = ".lock"
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")

_open = os.open
_write = os.write


class WriteError(ConfigError):
    """A file that could not be written: one line (what, where, free space), exit 2 at the CLI."""


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def free_space(path: str | Path) -> str:
    """How much space is free on the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{_size(shutil.disk_usage(p).free)} free there"
    except OSError:
        return "free space unknown"


def write_error(path: str | Path, e: OSError, nbytes: int | None = None) -> WriteError:
    what = f"could not write {_size(nbytes)}" if nbytes is not None else "could not write"
    return WriteError(path, None, f"{what}: {e.strerror or e} ({free_space(path)})")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[_write(fd, view):]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def ensure_dir(folder: str | Path) -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(folder, e) from None
    return folder


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Replace `path` with `data` all at once; on any failure `path` is as it was and no temp file is left."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = _open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only folder: the temp file was never made
        raise write_error(path, e, len(raw)) from None
    _fsync_dir(path.parent)
    return path


def open_append(path: str | Path) -> int:
    try:
        return _open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise write_error(path, e) from None


def append_record(fd: int, path: str | Path, data: bytes) -> None:
    """Append `data` (one record, newline included) and fsync; on failure cut the file back to where it was."""
    end = os.lseek(fd, 0, os.SEEK_END)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except OSError as e:
        try:
            os.ftruncate(fd, end)
        except OSError:
            pass  # readers and --resume drop a cut-off last line anyway
        raise write_error(path, e, len(data)) from None


def remove_stale_temps(folder: Path) -> None:
    """Temp files of `atomic_write` left by a writer that was killed (its pid no longer runs)."""
    for p in folder.glob(".*.tmp"):
        m = _TMP.match(p.name)
        if m and not _alive(int(m["pid"])):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive flock on `folder/.lock`, naming its holder (pid, host) for whoever finds it taken.

    The lock file is the one file not written atomically: the lock lives on its inode. A writer that finishes
    removes it while still holding the lock; one that dies leaves it, unlocked, and the next writer takes it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        while True:
            try:
                fd = _open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise write_error(self.path, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise ConfigError(self.folder, None, f"this run is being written by {holder} (lock {self.path}); "
                                  "a run has one writer at a time: wait for it or stop it") from None
            except OSError as e:  # a filesystem without locks: refuse rather than risk two writers
                os.close(fd)
                raise ConfigError(self.path, None, f"cannot lock the run: {e.strerror or e}") from None
            if self._still_at_path(fd):
                break
            os.close(fd)  # the previous holder removed the file between our open and our lock: take the new one
        try:
            os.ftruncate(fd, 0)
            _write_all(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        except OSError as e:
            os.close(fd)
            raise write_error(self.path, e) from None
        self.fd = fd
        return self

    def _still_at_path(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass  # a read-only or vanished folder: the OS still drops the lock when the file closes
        os.close(self.fd)
        self.fd = None
