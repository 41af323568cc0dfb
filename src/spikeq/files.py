"""Files that survive a crash: atomic writes and exclusive locks.

Every file a run depends on is written to a temporary file in the same directory, flushed to disk
(``fsync``) and renamed over the old one (``os.replace``, atomic on POSIX file systems): a kill or a
power cut at any moment leaves either the old file or the new one, never a mixture. A failed write
(a full disk) removes its temporary file and leaves the old file as it was.

A lock is ``fcntl.flock`` on a file: the kernel releases it when its process dies, however it dies,
so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path


def _umask() -> int:
    # os.umask can only be read by setting it; this process is single-threaded when it writes files.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Flush a directory's entries (a rename is durable only once its directory is flushed)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; on success it replaces ``path``.

    The file gets the permissions a plain ``open`` would give it (``0o666`` less the umask), not the
    ``0o600`` of a temporary file. On an exception the temporary file is removed and ``path`` is
    untouched.

    :param path: the file to (re)place
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT and SIGTERM received inside the block are handled when it ends, by the handlers in place
    then (in the main thread; elsewhere Python handles no signal and the block changes nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    stops = (signal.SIGINT, signal.SIGTERM)
    handlers = {stop: signal.signal(stop, lambda signum, frame: caught.append(signum)) for stop in stops}
    try:
        yield
    finally:
        for stop, handler in handlers.items():
            # None: a handler set outside Python, which cannot be put back; the default stands in for it
            signal.signal(stop, signal.SIG_DFL if handler is None else handler)
        for signum in caught:
            signal.raise_signal(signum)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8) atomically and durably.

    :param path: the file to write
    :param data: its new content
    """
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def check_new(paths: Iterable[Path], force: bool = False) -> None:
    """Refuse to replace a result by accident: raise for the first of ``paths`` that exists.

    A command checks its output files with this before its work starts (an evaluation or a conversion
    takes minutes), not when it writes them.

    :param paths: the files a command is about to write
    :param force: allow replacing them (the command's ``--force``)
    :raises FileExistsError: naming the existing file
    """
    if force:
        return
    for path in paths:
        if Path(path).exists():
            raise FileExistsError(f"{path} exists; pass --force to replace it, or choose another name")


class LockedError(RuntimeError):
    """Another process holds the lock."""


class FileLock:
    """An exclusive, non-blocking ``flock`` on ``path`` (created if missing), held until ``release``.

    :param path: the lock file
    :raises LockedError: when another process holds it
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise LockedError(f"{self.path} is locked by another process") from None

    def release(self) -> None:
        """Let go of the lock (the file stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_locked(path: Path) -> bool:
    """Whether another process holds the lock on ``path`` (False when there is no such file)."""
    if not Path(path).exists():
        return False
    try:
        FileLock(path).release()
    except LockedError:
        return True
    return False
