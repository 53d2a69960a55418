"""The backup lock: ``flock(2)`` on ``BACKUP_DIR/backup.lock``.

Exclusive and non-blocking. The holder's PID is written into the file for the message a second run
prints. The file is never deleted: deleting it would let a third run lock a new inode while the first
still holds the old one. The kernel releases the lock when the holder dies, however it dies.
"""

import errno
import fcntl
import os
import time

LOCK_NAME = "backup.lock"


class LockHeld(Exception):
    """Another process holds the lock; ``pid`` is what it wrote into the file (None if unreadable)."""

    def __init__(self, path, pid):
        self.path = path
        self.pid = pid
        super().__init__("another backup is running (pid %s); lock file %s" % (pid if pid else "unknown", path))


class BackupLock:
    """Context manager holding the lock on ``<directory>/backup.lock``.

    ``acquire()`` raises :class:`LockHeld` when another process holds it, OSError when the file cannot be
    created. ``release()`` is idempotent.
    """

    def __init__(self, directory):
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd = None

    def acquire(self):
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except PermissionError:
            # Someone else's lock file (e.g. left by a run as root): tell "held" from "unusable".
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except PermissionError:
                raise PermissionError(errno.EACCES, "lock file %s belongs to another user and is not readable "
                                      "by this one (uid %d): fix its owner (chown) so backups run as one user"
                                      % (self.path, os.getuid()))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise LockHeld(self.path, read_holder(self.path))
            finally:
                os.close(fd)
            raise PermissionError(errno.EACCES, "lock file %s is not writable by this user (uid %d): fix its "
                                  "owner (chown) so backups run as one user" % (self.path, os.getuid()))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockHeld(self.path, read_holder(self.path, wait=1.0))
            raise
        os.ftruncate(fd, 0)
        os.write(fd, ("%d\n" % os.getpid()).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
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
            with open(path) as handle:
                text = handle.read().strip()
            if text.isdigit():
                return int(text)
        except OSError:
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def is_locked(directory):
    """True when some process holds the lock right now (tested by trying to take it and letting go)."""
    lock = BackupLock(directory)
    try:
        lock.acquire()
    except LockHeld:
        return True
    except FileNotFoundError:
        return False
    lock.release()
    return False
