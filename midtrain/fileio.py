"""Small file helpers shared by every component: atomic writes, fsync, hashing."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_CHUNK = 8 << 20
_READ_AHEAD = 256 << 20
_FADVISE = hasattr(os, "posix_fadvise")


def project_path(*parts: str) -> Path | None:
    """A file or folder shipped beside the package (``slurm/``, ``examples/``): at the top of a
    source checkout, or under ``share/midtrain`` of the environment a wheel was installed into."""
    for base in (Path(__file__).resolve().parents[1], Path(sys.prefix) / "share" / "midtrain"):
        if base.joinpath(*parts).exists():
            return base.joinpath(*parts)
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | Path) -> None:
    """Make a rename or file creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2() -> Any:
    """libc's ``renameat2(int, const char *, int, const char *, unsigned)``, or None (not Linux,
    or a C library older than glibc 2.28)."""
    if sys.platform != "linux":
        return None
    func = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if func is not None:
        func.argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_uint,
        ]
        func.restype = ctypes.c_int
    return func


def exchange_paths(a: str | Path, b: str | Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``), so
    that neither name is ever missing. Returns False, changing nothing, where the platform or
    file system cannot do it."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not supported here
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide it from other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None:
            # Name the file the caller asked for, not the temporary one (same type and errno).
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        raise
    fsync_dir(path.parent)


class LockHeldError(OSError):
    """Another process holds the lock; the message says who (pid and host) and since when."""


class ExclusiveLock:
    """An advisory ``flock`` on ``path``, held until ``release()`` or the process ends (a crash,
    a SIGKILL too: the kernel drops it). The holder's pid, host and start time are written into
    the file so that the error of whoever waits in vain names them. Where the file system
    cannot lock (Lustre mounted without ``flock``, say), nothing is held.
    """

    def __init__(self, path: str | Path, *, timeout_s: float = 0.0, poll_s: float = 0.2) -> None:
        self.path = Path(path)
        self._file = open(self.path, "a+")  # noqa: SIM115 - closed in release()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self._file.seek(0)
                    holder = self._file.read().strip() or "unknown"
                    self._file.close()
                    raise LockHeldError(
                        errno.EWOULDBLOCK, f"{self.path}: locked by another process ({holder})"
                    ) from None
                time.sleep(poll_s)
            except OSError as exc:
                if exc.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    self._file.close()
                    raise
                return  # no locking on this file system: go on without
        self._file.truncate(0)
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n")
        self._file.flush()

    def release(self) -> None:
        """Drop the lock (closing the file does); safe to call twice."""
        self._file.close()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        # Keep the kernel reading a window ahead, so the disk works while we hash.
        ahead = 0
        pos = 0
        while True:
            if _FADVISE and ahead < pos + _READ_AHEAD // 2:
                os.posix_fadvise(f.fileno(), ahead, _READ_AHEAD, os.POSIX_FADV_WILLNEED)
                ahead += _READ_AHEAD
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            pos += len(chunk)
    return h.hexdigest()


class FollowedFile:
    """The new complete lines of a file another process appends to, read incrementally (a long
    run's metrics file is never re-read whole). Starts over when the file is replaced (a resume
    rewrites it) or truncated; a last line without its newline waits for the next call."""

    def __init__(self, path: str | Path, skip_existing: bool = False) -> None:
        self.path = Path(path)
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""
        if skip_existing:
            self.new_lines()

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self._inode or st.st_size < self._offset:
                    self._inode, self._offset, self._partial = st.st_ino, 0, b""
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        return [line.decode("utf-8", errors="replace") for line in complete if line.strip()]
