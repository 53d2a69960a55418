"""Locks in BACKUP_DIR: ``flock(2)`` on small files that are never deleted.

- ``backup.lock`` (:data:`LOCK_NAME`): exclusive, held by a nightly run, ``restore.py full`` and ``verify``.
  The holder's PID is written into the file for the message a second run prints.
- ``restore.lock`` (:data:`RESTORE_LOCK_NAME`): shared by everything that reads backups for a while
  (``restore.py postgres`` and ``contentstore``), exclusive while retention deletes: a restore never loses the
  base backup or the WAL it is replaying, and retention never waits for a restore (it skips a night).
- ``offsite.lock`` (:data:`OFFSITE_LOCK_NAME`): exclusive, held by ``backup.py --offsite``.

The files are never deleted: deleting one would let a third process lock a new inode while the first still
holds the old one. The kernel releases a lock when its holder dies, however it dies. A lock file is opened
with ``O_NOFOLLOW`` and must be a regular file of this user: a symlink planted in BACKUP_DIR must never make a
run truncate or write into the file it points at.
"""

import errno
import fcntl
import os
import time

from safe_files import open_private

LOCK_NAME = "backup.lock"
RESTORE_LOCK_NAME = "restore.lock"
OFFSITE_LOCK_NAME = "offsite.lock"
_HELD_BY = {LOCK_NAME: "another backup is running", RESTORE_LOCK_NAME: "a restore is reading the backups",
            OFFSITE_LOCK_NAME: "another off-site upload is running"}


class LockHeld(Exception):
    """Another process holds the lock; ``pid`` is what it wrote into the file (None if unreadable)."""

    def __init__(self, path, pid, what=None):
        self.path = path
        self.pid = pid
        what = what or _HELD_BY.get(os.path.basename(path), "another process holds the lock")
        super().__init__("%s (pid %s); lock file %s" % (what, pid if pid else "unknown", path))


class BackupLock:
    """Context manager holding the lock on ``<directory>/<name>``, exclusive or (``shared``) shared.

    ``acquire()`` raises :class:`LockHeld` when another process holds it in a conflicting mode, OSError when
    the file cannot be created or is not a plain file of this user. An exclusive holder writes its PID into
    the file. ``release()`` is idempotent.
    """

    def __init__(self, directory, name=LOCK_NAME, shared=False, what=None):
        self.path = os.path.join(directory, name)
        self.shared = shared
        self.what = what
        self._fd = None

    def acquire(self):
        try:
            fd = open_private(self.path, os.O_RDWR | os.O_CREAT)
        except PermissionError:
            # Someone else's lock file (e.g. left by a run as another user): tell "held" from "unusable".
            try:
                fd = open_private(self.path, os.O_RDONLY)
            except PermissionError:
                raise PermissionError(errno.EACCES, "lock file %s belongs to another user and is not readable "
                                      "by this one (uid %d): fix its owner (chown) so backups run as one user"
                                      % (self.path, os.getuid()))
            os.close(fd)
            raise PermissionError(errno.EACCES, "lock file %s is not writable by this user (uid %d): fix its "
                                  "owner (chown) so backups run as one user" % (self.path, os.getuid()))
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockHeld(self.path, read_holder(self.path, wait=1.0), self.what)
            raise
        if not self.shared:
            os.ftruncate(fd, 0)
            os.write(fd, ("%d\n" % os.getpid()).encode())
            os.fsync(fd)
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            if not self.shared:
                # Empty the PID first so a reader never blames a dead process; keep the file.
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def fileno(self):
        """The locked file descriptor (None when not held)."""
        return self._fd

    @property
    def held(self):
        return self._fd is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def read_holder(path, wait=0.0):
    """The PID written in the lock file, or None. ``wait``: seconds to wait for it, since the holder writes
    its PID just after taking the lock."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                text = os.read(fd, 64).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
            if text.isdigit():
                return int(text)
        except OSError:
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def is_locked(directory, name=LOCK_NAME):
    """True when some process holds the lock right now (tested by trying to take it and letting go)."""
    probe = BackupLock(directory, name)
    try:
        probe.acquire()
    except LockHeld:
        return True
    except FileNotFoundError:
        return False
    probe.release()
    return False
