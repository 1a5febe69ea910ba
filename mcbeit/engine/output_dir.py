"""The output folder of a run: one run at a time, writable, and free of what interrupted saves left.

:func:`prepare_output_dir` is what :meth:`mcbeit.engine.trainer.Trainer.start` calls right after the
process group is up, before anything is built. Rank 0 alone:

- checks that ``--output_dir`` and the TensorBoard folder can be written, by creating and removing a
  probe file (a path under a regular file, a folder without write permission, a read-only file
  system), so a run never trains for hours to find it cannot keep the result;
- takes the folder's lock (:class:`OutputLock`, the file :data:`LOCK_NAME`): a second run on the
  same folder stops before training, naming the holder (host, pid, command, since when); a lock
  left by a run that died is taken over with a warning that names it;
- removes, under that lock (so never a live run's), the temporary files and staging folders of
  saves that a kill or a crash interrupted (:func:`remove_orphans`), naming them and their size.

Its outcome (ready, or the error's message) is broadcast, so every rank stops together with the
same message instead of waiting for rank 0 in the first collective.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mcbeit.engine.distributed import DistInfo
from mcbeit.errors import InputError

log = logging.getLogger("mcbeit")

#: the lock file in the output folder; it names its holder while the run lives
LOCK_NAME = ".mcbeit.lock"
_PROBE_PREFIX = ".mcbeit-probe."
#: a temporary file of :func:`mcbeit.engine.checkpoint.write_atomic` (``.<name>.<8 random chars>.tmp``,
#: tempfile.mkstemp's names) or a probe: complete files never end so
_TMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# errnos of a file system whose flock() does not work (some NFS mounts, FUSE file systems)
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class OutputDirError(InputError):
    """The output folder cannot be used: not writable, or another run holds it."""


# ------------------------------------------------------------------------------------------ the lock

def _holder_record() -> str:
    command = " ".join([os.path.basename(sys.executable), *sys.argv])
    return "\n".join([f"host {socket.gethostname()}", f"pid {os.getpid()}",
                      f"since {time.strftime('%Y-%m-%d %H:%M:%S %z')}", f"command {command}"]) + "\n"


def _parse_holder(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key in ("host", "pid", "since", "command"):
            fields[key] = value
    return fields


def describe_holder(text: str) -> str:
    """The lock file's record in words: 'pid P on HOST since TIME: COMMAND'."""
    h = _parse_holder(text)
    if not h:
        return "a holder that left no record"
    return f"pid {h.get('pid', '?')} on {h.get('host', '?')} since {h.get('since', '?')}: {h.get('command', '?')}"


#: lock descriptors this process holds. A forked child (a data-loader worker) shares the lock's open file
#: description: it closes its copy at once, so the lock ends with the run, not with its last worker.
_HELD: set[int] = set()


def _close_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """The output folder's lock, held for the run's life (:meth:`acquire`, :meth:`release`).

    ``fcntl.flock`` on :data:`LOCK_NAME`: the kernel releases it when the holder dies in any way
    (kill -9 included), so a lock file that can be locked but still names a holder was left by a dead
    run and is taken over. Where the file system refuses flock (some NFS), the file is created with
    ``O_EXCL`` instead: a leftover one naming a dead process of this host is taken over; one of
    another host cannot be checked, and the message says to remove it if that run is gone.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None
        self._pid = os.getpid()
        self.exclusive_file = False  # True: the O_EXCL fallback (no flock on this file system)

    @classmethod
    def acquire(cls, folder: str | os.PathLike, use_flock: bool = True) -> "OutputLock":
        lock = cls(folder)
        if use_flock:
            try:
                lock._flock()
                return lock
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    raise
                log.warning("%s: the file system does not support flock (%s); locking by creating the file "
                            "exclusively instead (a lock left by a dead run on another host must then be removed "
                            "by hand)", lock.path, exc.strerror)
        lock._exclusive()
        return lock

    def _busy(self, record: str, note: str = "") -> OutputDirError:
        return OutputDirError(
            f"--output_dir {self.path.parent} is in use by another run ({describe_holder(record)}); two runs in one "
            f"folder would overwrite each other's checkpoints. Wait for it to end, or pass another --output_dir{note}")

    def _flock(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = _read_fd(fd)
                os.close(fd)
                raise self._busy(record) from None
            except BaseException:
                os.close(fd)
                raise
            # The holder before us unlinks the file as it releases: if it did between our open() and
            # flock(), we hold a lock on a file no longer in the folder. Then start over.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_fd(fd)
        if previous.strip():
            log.warning("%s: taking over the lock of a run that ended without releasing it (%s)", self.path,
                        describe_holder(previous))
        self._hold(fd)

    def _exclusive(self) -> None:
        self.exclusive_file = True
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                record = self.path.read_text(errors="replace") if self.path.exists() else ""
                holder = _parse_holder(record)
                dead = (holder.get("host") == socket.gethostname() and holder.get("pid", "").isdigit()
                        and not _pid_alive(int(holder["pid"])))
                if not dead:
                    raise self._busy(record, f" (if that run is no longer running, remove {self.path})") from None
                log.warning("%s: taking over the lock of a run that ended without releasing it (%s)", self.path,
                            describe_holder(record))
                self.path.unlink(missing_ok=True)
                continue
            self._hold(fd)
            return
        raise OutputDirError(f"--output_dir {self.path.parent}: could not create its lock {self.path}; "
                             "another run is starting in it at the same time")

    def _hold(self, fd: int) -> None:
        _write_fd(fd, _holder_record())
        self._fd, self._pid = fd, os.getpid()
        _HELD.add(fd)

    def release(self) -> None:
        """Remove the lock file and let go (idempotent). The file goes first, while still locked, so a
        run waiting to start finds either our lock or none (it checks the file it locked is the one in
        the folder)."""
        if self._fd is None or self._pid != os.getpid():
            self._fd = None  # a forked child's copy (closed at the fork): the run's own process releases
            return
        _HELD.discard(self._fd)
        try:
            if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_fd(fd: int) -> str:
    try:
        return os.pread(fd, 65536, 0).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _write_fd(fd: int, text: str) -> None:
    data = text.encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


# ------------------------------------------------------------------------------------------ writability

def check_writable(folder: str | os.PathLike, flag: str) -> None:
    """Create ``folder`` if missing, then write and remove a probe file in it; an
    :class:`OutputDirError` that says why and what to do when that fails."""
    folder = Path(folder)
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == folder else f"lies under {blocker}, which is a file"
        raise OutputDirError(f"{flag} {folder} {where}, not a folder: pass a folder (it is created if missing)"
                             + (", or --output_dir '' to write nothing" if flag == "--output_dir" else ""))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, suffix=".tmp", dir=folder)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise OutputDirError(f"{flag} {folder} cannot be written ({exc.strerror or exc}): pass a folder this user "
                             f"({_user()}) can write to, or fix its permissions; nothing was trained") from None


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}" if hasattr(os, "geteuid") else "this user"


# ------------------------------------------------------------------------------------------ leftovers

def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.lstat().st_size


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def orphans(folder: str | os.PathLike) -> list[Path]:
    """What interrupted saves left in ``folder``: temporary files of :func:`~mcbeit.engine.checkpoint.write_atomic`
    (``.checkpoint-0.pth.k2x9a_1q.tmp``, also of ``tokenizer.pth``, ``latest``), probes, DeepSpeed
    staging folders (``.saving-checkpoint-*``), and folders a save moved aside (``.replaced-checkpoint-*``)
    once their replacement is in place (before that, the one aside is still a resume point)."""
    from mcbeit.engine.deepspeed_checkpoints import REPLACED_PREFIX, STAGING_PREFIX

    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        name = path.name
        if _TMP_RE.match(name) and path.is_file():
            found.append(path)
        elif name.startswith(STAGING_PREFIX) and path.is_dir():
            found.append(path)
        elif name.startswith(REPLACED_PREFIX) and path.is_dir() and (root / name[len(REPLACED_PREFIX):]).is_dir():
            found.append(path)
    return found


def remove_orphans(folder: str | os.PathLike) -> list[tuple[Path, int]]:
    """Remove :func:`orphans` (call it under the folder's lock: a live run's files look the same); a
    warning names each with its size. Returns (path, bytes) of each."""
    removed = []
    for path in orphans(folder):
        size = _size(path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append((path, size))
    if removed:
        log.warning("removed what interrupted saves left in %s: %s (%s in all)", folder,
                    ", ".join(f"{p.name} ({human_size(s)})" for p, s in removed),
                    human_size(sum(s for _, s in removed)))
    return removed


# ------------------------------------------------------------------------------------------ the run's start

def prepare_output_dir(output_dir: str, log_dir: str | None, info: DistInfo, *, lock: bool = True) -> OutputLock | None:
    """Rank 0: check ``output_dir`` and ``log_dir`` writable, take the lock (when ``lock``), remove
    orphans; every rank: the same outcome (a collective). Returns rank 0's lock (None elsewhere, and
    for ``--output_dir ''``); raises :class:`OutputDirError` on every rank when the folder cannot be used."""
    held, failure, message = None, None, None
    if info.is_main and output_dir:
        try:
            check_writable(output_dir, "--output_dir")
            if log_dir and os.path.abspath(log_dir) != os.path.abspath(os.path.join(output_dir, "tensorboard")):
                check_writable(log_dir, "--log_dir")
            if lock:
                held = OutputLock.acquire(output_dir)
                remove_orphans(output_dir)
        except Exception as exc:  # every rank must hear of it, or they wait for rank 0 in the next collective
            failure, message = exc, str(exc) if isinstance(exc, InputError) else f"rank 0 could not prepare " \
                f"--output_dir {output_dir}: {type(exc).__name__}: {exc}"
    if info.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            box: list[Any] = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
    if message is not None:
        if held is not None:
            held.release()
        if failure is not None and not isinstance(failure, InputError):
            raise failure
        raise OutputDirError(message)
    return held
