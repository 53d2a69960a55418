"""Files that someone else may have planted, and files that must reach the disk before they count.

- :func:`open_private` opens a path without following a symlink (``O_NOFOLLOW``) and checks on the open
  descriptor that it is a regular file of this user: a symlink planted in BACKUP_DIR or in a restored data
  directory must never make us truncate, append to or read the file it points at.
- :func:`fsync_tree` / :func:`sync_filesystem` make a finished ``NAME.partial`` tree durable before it is
  renamed and its metadata says DONE: after a power cut a DONE backup must not hold zero-filled files.
"""

import ctypes
import errno
import os
import stat


def open_private(path, flags, mode=0o600):
    """Open ``path`` without following a symlink and check on the open descriptor that it is a regular file
    owned by this process's user. Returns the fd; raises OSError (ELOOP for a symlink, EPERM for a file of
    someone else or not a regular file, with a message naming it and the fix)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symbolic link; refusing to follow it (remove it: this program never "
                                       "makes one there)", path)
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        raise OSError(errno.EPERM, "%s owned by uid %d, not a file of this user (uid %d): remove it or fix its "
                                   "owner (chown)" % ("a file" if stat.S_ISREG(info.st_mode) else
                                                      "not a regular file", info.st_uid, os.geteuid()), path)
    return fd


def write_text(path, text, append=False, mode=0o600):
    """Write (or with ``append``, append) ``text`` to ``path`` through :func:`open_private`. Raises OSError."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    with os.fdopen(open_private(path, flags, mode), "a" if append else "w", encoding="utf-8",
                   errors="surrogateescape") as handle:
        handle.write(text)


def read_text(path):
    """The text of ``path`` read through :func:`open_private`. Raises OSError."""
    with os.fdopen(open_private(path, os.O_RDONLY), encoding="utf-8", errors="surrogateescape") as handle:
        return handle.read()


def fsync_path(path, directory=False):
    """fsync one file or directory (not following a symlink). Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some network file systems cannot fsync a directory; PostgreSQL ignores this case too.
        if not directory or exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def fsync_tree(root):
    """fsync every regular file and directory under ``root`` (deepest first, ``root`` last). For small trees
    (a base backup's few tars, a config copy); a snapshot of millions of files uses :func:`sync_filesystem`.
    Raises OSError."""
    for dirpath, _dirs, names in os.walk(root, topdown=False):
        for name in names:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                fsync_path(path)
        fsync_path(dirpath, directory=True)


_LIBC = None


def sync_filesystem(path):
    """Flush everything written to the file system holding ``path`` (``syncfs(2)``: one call instead of
    an fsync per file of a snapshot; since Linux 5.8 it reports write-back errors). Falls back to
    ``sync(2)`` where syncfs is unavailable. Raises OSError."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.syncfs  # noqa: B018  (probe: AttributeError when libc lacks it)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC is False:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _LIBC.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, "syncfs of the file system holding %s failed: %s" % (path, os.strerror(code)))
    finally:
        os.close(fd)
