"""The one place that makes a file appear durably: temporary file, fsync, rename, fsync of the directory.

A reader never sees a partly written file under its final name: until the rename, the bytes live under a
hidden temporary name that :func:`remove_leftovers` deletes when a writer next opens the directory.

The checkpoint directory may hold anything (a planted symlink, a FIFO, a hard link to someone else's file),
so every file this package creates is created here or in ``naming``: new names only (``O_EXCL``), never
through a symlink (``O_NOFOLLOW``), and a write either puts every byte down or raises the OS's own error
(``ENOSPC`` stays ``ENOSPC``, whatever a serializer turns it into).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "TEMP_NAME_OVERHEAD",
    "TEMP_SUFFIX",
    "AtomicFile",
    "atomic_write",
    "create_new",
    "exchange",
    "fsync_directory",
    "is_temporary",
    "lock_exclusive",
    "open_lock",
    "remove_leftovers",
    "replace_if_unchanged",
    "temp_name",
    "write_all_at",
]

TEMP_SUFFIX = ".ckptio-tmp"
# The longest temporary name is ``.{final}.{pid}.{16 hex}.ckptio-tmp``: this many bytes beyond ``final``'s own
# (a pid has at most 7 digits on Linux: pid_max <= 2**22).
TEMP_NAME_OVERHEAD = 1 + 1 + 7 + 1 + 16 + len(TEMP_SUFFIX)
_WRITE_BUFFER = 4 * 2**20  # torch.save issues many small writes; batch them into large ones
_NEW_FILE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def temp_name(final_name: str) -> str:
    """A hidden, unpredictable name beside ``final_name``: nobody can plant a file or symlink under it first."""
    return f".{final_name}.{os.getpid()}.{secrets.token_hex(8)}{TEMP_SUFFIX}"


def create_new(path: Path, mode: int = 0o644, flags: int = os.O_WRONLY) -> int:
    """Open a file that did not exist (never one someone planted, never through a symlink)."""
    return os.open(path, flags | _NEW_FILE_FLAGS, mode)


def open_lock(path: Path) -> int:
    """Open (creating it if needed) a lock file that this package may truncate and write a PID into.

    A lock file is the one file we reuse across runs, so it is the one an attacker can plant: a symlink is
    never followed, and a FIFO, a directory or a hard link to another file is refused rather than written.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise _not_a_lock_file(path, "a symlink" if exc.errno == errno.ELOOP else "not a regular file") from None
        raise
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "not a regular file"
    elif info.st_nlink != 1:
        problem = f"a hard link shared with {info.st_nlink - 1} other name(s)"
    if problem:
        os.close(fd)
        raise _not_a_lock_file(path, problem)
    os.set_blocking(fd, True)
    return fd


def lock_exclusive(fd: int) -> None:
    """Take ``fd``'s lock without waiting for a holder (``BlockingIOError``), yet not fail on a mere probe:
    :func:`ckptio.naming.live_ranks` holds a shared lock for microseconds to see whether a rank is running."""
    for attempt in range(5):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == 4:
                raise
            time.sleep(0.02)


def _not_a_lock_file(path: Path, what: str) -> OSError:
    return OSError(errno.EPERM, f"{path} is {what}, not a ckptio lock file; remove it (ckptio never writes "
                                "through it, it could point at another file) and start again", str(path))


def write_all_at(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``pwrite`` every byte or raise: on a nearly full disk one call may write only part of them."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[written:], offset + written


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """The temporary file of :func:`atomic_write`: a buffered binary stream that remembers the first ``OSError``.

    Serializers (``torch.save``'s C++ zip writer above all) catch a failed write and raise an error of their
    own that has lost its errno ("unexpected pos ..."); the remembered error lets the caller see ENOSPC as
    ENOSPC. Writes go straight to our own descriptor, which Python writes in full or raises for.
    """

    def __init__(self, fd: int, temp_path: Path) -> None:
        self._file = os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)
        self.temp_path = temp_path
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise

    def fileno(self) -> int:
        return self._file.fileno()

    def writable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        # A flush that fails still closes the descriptor, so a failed file's blocks are freed as soon as it is
        # unlinked, not when the exception holding it is collected.
        self._file.close()


HOLD_ENV = "CKPTIO_TEST_HOLD_BEFORE_RENAME"
"""A test seam: while the file this environment variable names exists, every write, its bytes complete and
fsynced, waits before its rename. A crash test can then kill a process that is certainly mid-write instead of
hoping to catch one (a fast disk finishes a small checkpoint in milliseconds). Unset, it costs one lookup."""


def _hold_for_tests() -> None:
    gate = os.environ.get(HOLD_ENV)
    while gate and os.path.exists(gate):
        time.sleep(0.01)


@contextlib.contextmanager
def atomic_write(final: Path, *, fsync: bool = True, drop_page_cache: bool = False) -> Iterator[AtomicFile]:
    """Yield a file to write ``final``'s bytes into; they appear under ``final`` only if the block succeeds.

    The bytes go to ``final``'s name inside a private hidden directory beside it (so that a writer which names
    its records after the file, as ``torch.save`` does, writes exactly what it would write to ``final``), and
    are renamed into place. On any error (ENOSPC included) the temporary file is closed and removed and the
    previous ``final``, if any, is kept; if a write to the file failed, that ``OSError`` is what is raised.
    The rename replaces whatever entry has ``final``'s name (a planted symlink included), never its target.
    """
    workspace = final.parent / temp_name(final.name)
    workspace.mkdir(mode=0o700)  # mkdir never follows a symlink: a planted one makes it fail
    tmp = workspace / final.name
    try:
        file = AtomicFile(create_new(tmp, flags=os.O_RDWR), tmp)
    except BaseException:
        shutil.rmtree(workspace, ignore_errors=True)
        raise
    try:
        yield file
        file.flush()
        if fsync:
            os.fsync(file.fileno())
        if drop_page_cache and hasattr(os, "posix_fadvise"):
            # A checkpoint is not read back soon; keep its pages from evicting the training data's.
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        file.close()
        _hold_for_tests()
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            file.close()
        shutil.rmtree(workspace, ignore_errors=True)
        if file.error is not None and file.error is not exc and isinstance(exc, Exception):
            raise file.error from exc
        raise
    with contextlib.suppress(OSError):
        workspace.rmdir()
    if fsync:
        fsync_directory(final.parent)


def remove_leftovers(directory: Path) -> list[Path]:
    """Delete temporary files a crashed writer left behind; call only while holding the directory's lock.

    Only entries of ``directory`` itself go: a symlink is removed as a link, never followed.
    """
    removed = []
    for entry in os.scandir(directory):
        if not is_temporary(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap the entries ``a`` and ``b`` in one step (``renameat2(RENAME_EXCHANGE)``); ``FileNotFoundError`` if
    either is gone; ``False`` where the kernel, the C library or the filesystem cannot exchange."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_if_unchanged(new: Path, final: Path, expected: os.stat_result) -> None:
    """Rename ``new`` over ``final`` only if ``final`` is still the file ``expected`` describes (same inode).

    For rewriting a file in place (slimming): if another process deleted ``final`` meanwhile (``ckptio clean``),
    it must stay deleted, so ``FileNotFoundError`` is raised and nothing is renamed; if it was replaced, the
    newer file is kept and ``FileExistsError`` is raised. Where the kernel can exchange two names in one step the
    check cannot race; elsewhere it is made just before the rename. ``new`` then holds the old file (or is gone).
    """
    def same(info: os.stat_result) -> bool:
        return (info.st_ino, info.st_dev) == (expected.st_ino, expected.st_dev)

    if exchange(new, final):
        if same(os.lstat(new)):
            return
        exchange(new, final)  # someone else's file took the name meanwhile: give it back its place
        raise FileExistsError(errno.EEXIST, f"{final} was replaced while it was being rewritten; the newer file "
                              "is kept", str(final))
    if not same(os.lstat(final)):  # FileNotFoundError when it was deleted
        raise FileExistsError(errno.EEXIST, f"{final} was replaced while it was being rewritten; the newer file "
                              "is kept", str(final))
    os.replace(new, final)
