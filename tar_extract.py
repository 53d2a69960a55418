"""Extracting a base backup's tars safely: what a PostgreSQL base backup never holds is refused.

The service user can change every file under BACKUP_DIR, so a tar is hostile input: :func:`check_member`
refuses what could write outside the target, :func:`extract` writes member by member (never through a
link) and can hash every file while writing it, for the manifest check of a restore (restore_manifest).
Reading and decompressing is :mod:`tar_io`'s.
"""

import hashlib
import os
import re
import stat
import tarfile

import tar_io
from tar_io import TarError


SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX
_TABLESPACE_LINK = re.compile(r"^pg_tblspc/[0-9]+$")
WAL_DIR_NAMES = ("pg_wal", "pg_xlog")


def check_member(member, archive_path):
    """Refuse a member a PostgreSQL base backup never holds and that could write outside the target (pure).

    Refused: absolute names and ``..``; hard links (pg_basebackup writes none, and tarfile resolves them
    against the extraction root, not the member's directory); devices and FIFOs; a ``pg_wal``/``pg_xlog``
    that is a link (the WAL tar would be extracted through it); absolute symlinks except ``pg_tblspc/<oid>``
    (tablespaces); relative symlinks that leave the tree. Returns the member's clean name; raises TarError.
    """
    name = tar_io.clean_name(member.name).rstrip("/")
    parts = name.split("/")
    if not name or member.name.startswith("/") or ".." in parts:
        raise TarError("%s: member %r would be written outside the target directory" % (archive_path, member.name))
    if member.islnk():
        raise TarError("%s: member %r is a hard link (to %r); a PostgreSQL base backup holds none: refusing the "
                       "archive" % (archive_path, member.name, member.linkname))
    if not (member.isfile() or member.isdir() or member.issym()):
        raise TarError("%s: member %r is a device or FIFO; refusing the archive" % (archive_path, member.name))
    if member.issym():
        if name in WAL_DIR_NAMES:
            raise TarError("%s: %s is a symbolic link (to %r): the WAL would be extracted outside the data "
                           "directory; refusing the archive" % (archive_path, name, member.linkname))
        if os.path.isabs(member.linkname):
            if not _TABLESPACE_LINK.match(name):
                raise TarError("%s: member %r is a symbolic link to the absolute path %r; only pg_tblspc/<oid> "
                               "may be one: refusing the archive" % (archive_path, member.name, member.linkname))
        else:
            resolved = os.path.normpath(os.path.join(os.path.dirname(name), member.linkname))
            if resolved == ".." or resolved.startswith("../"):
                raise TarError("%s: symbolic link %r points outside the target (%r)" % (archive_path, member.name,
                                                                                       member.linkname))
    return name


def extract(path, dest, digest=None, writeback=False):
    """Extract ``path`` into directory ``dest`` member by member, refusing what :func:`check_member` refuses
    and any member whose path would reach outside ``dest`` through a symlink extracted before it.

    setuid/setgid/sticky bits and group/other write bits are dropped (PostgreSQL's files are 0600/0700); the
    ``data`` extraction filter is used where Python has it. An existing non-directory at a member's path is
    removed first, so a regular file is never written through a link (it is created with O_EXCL and
    O_NOFOLLOW). ``digest``: a hashlib algorithm name (``sha256``...); then returns {member name: (size, hex
    digest)} of every regular file, hashed in a second thread from the bytes as they are written (the
    archive is read once); else returns {}. ``writeback``: start writing each file's data to disk while
    extracting (for a copy that is fsynced next, e.g. by PostgreSQL's start-up: the disk then works during
    the decompression instead of after it). Raises TarError.
    """
    dest_real = os.path.realpath(dest)
    writeback = _writeback_starter() if writeback else None
    has_filters = hasattr(tarfile, "data_filter")
    hasher = _Hasher(digest) if digest else None

    def visit(member, archive):
        name = check_member(member, path)
        target = os.path.join(dest_real, name)
        parent = os.path.realpath(os.path.dirname(target))
        if parent != dest_real and not parent.startswith(dest_real + os.sep):
            raise TarError("%s: member %r would be written outside %s (through a symbolic link)"
                           % (path, member.name, dest))
        if os.path.lexists(target) and not (member.isdir() and os.path.isdir(target)
                                            and not os.path.islink(target)):
            if os.path.isdir(target) and not os.path.islink(target):
                raise TarError("%s: member %r replaces a directory" % (path, member.name))
            os.unlink(target)
        member.mode &= ~(SPECIAL_BITS | 0o022)
        if member.issym() and os.path.isabs(member.linkname):
            # A tablespace link (check_member allowed only these); the data filter refuses every absolute link.
            os.symlink(member.linkname, target)
            return
        if member.isfile() and not member.issparse():
            if has_filters:
                member = tarfile.data_filter(member, dest_real)  # its checks, and the modes it allows
            _write_file(archive.fileobj, member, target, name, hasher, writeback)
            return
        kwargs = {"filter": "data"} if has_filters else {}
        # numeric_owner: the archive's uid is the server's; names may not exist on a new host.
        archive.extract(member, dest_real, set_attrs=True, numeric_owner=True, **kwargs)
        if hasher is not None and member.isfile():  # a sparse file (pg_basebackup writes none): hash it back
            with open(target, "rb") as handle:
                hasher.begin(name)
                while True:
                    buffer = hasher.buffer()
                    count = handle.readinto(buffer)
                    hasher.update(buffer, count)
                    if not count:
                        break
                hasher.end(name, member.size)

    try:
        tar_io.walk(path, visit)
    finally:
        sums = hasher.close() if hasher is not None else {}
    return sums


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _write_file(reader, member, target, name, hasher, writeback):
    """Write regular file ``member`` at ``target`` (which does not exist) with its mode and mtime, reading
    its data from ``reader`` (the archive's :class:`ForwardReader`) into reused buffers; as root without
    extraction filters also its numeric owner, as tarfile would. ``writeback``: see :func:`_writeback_starter`."""
    # Missing parents, as tarfile makes them (their real path was checked to be inside the target).
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd = os.open(target, _NEW_FILE, 0o600)
    try:
        reader.seek(member.offset_data)
        if hasher is not None:
            hasher.begin(name)
        left = member.size
        own = bytearray(tar_io.BUFSIZE) if hasher is None else None
        while left > 0:
            buffer = own if hasher is None else hasher.buffer()
            view = memoryview(buffer)[:min(tar_io.BUFSIZE, left)]
            count = reader.readinto(view)
            if not count:
                raise tarfile.ReadError("unexpected end of data in %s" % member.name)
            done = 0
            while done < count:
                done += os.write(fd, view[done:count])
            if writeback is not None:
                writeback(fd, member.size - left, count)
            if hasher is not None:
                hasher.update(buffer, count)
            left -= count
        if hasher is not None:
            hasher.end(name, member.size)
        if os.geteuid() == 0 and member.uid is not None and not hasattr(tarfile, "data_filter"):
            os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, member.mode & 0o7777)
        if member.mtime is not None:
            os.utime(fd, (member.mtime, member.mtime))
    finally:
        os.close(fd)


def _writeback_starter():
    """A function ``(fd, offset, count)`` that asks the kernel to start writing that range of a file to disk
    without waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, through ctypes: the os module has no
    binding), or None where there is none. Durability still comes from an fsync; this only lets the disk
    work while the extraction decompresses, instead of after it."""
    try:
        import ctypes

        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, ImportError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start(fd, offset, count):
        func(fd, offset, count, write)  # a failure only means no head start: the fsync later still runs

    return start


class _Hasher:
    """Digests of the extracted files, computed in a thread of its own (hashlib releases the GIL): the
    extraction fills one of a few buffers (``buffer()``), writes it and hands it over (``update``); the
    thread gives it back once hashed. ``close()`` returns {name: (size, hex digest)}."""

    BUFFERS = 4

    def __init__(self, algorithm):
        import queue
        import threading

        hashlib.new(algorithm)  # ValueError now for an unknown algorithm, not in the thread
        self.algorithm = algorithm
        self.results = {}
        self.failure = None
        self._free, self._work = queue.Queue(), queue.Queue()
        for _ in range(self.BUFFERS):
            self._free.put(bytearray(tar_io.BUFSIZE))
        self._thread = threading.Thread(target=self._run, name="tar-digest", daemon=True)
        self._thread.start()

    def buffer(self):
        return self._free.get()

    def begin(self, name):
        self._work.put(("begin", name))

    def update(self, buffer, count):
        self._work.put((buffer, count))

    def end(self, name, size):
        self._work.put(("end", name, size))

    def _run(self):
        current = None
        while True:
            item = self._work.get()
            if item is None:
                return
            try:
                if item[0] == "begin":
                    current = hashlib.new(self.algorithm)
                elif item[0] == "end":
                    self.results[item[1]] = (item[2], current.hexdigest())
                else:
                    current.update(memoryview(item[0])[:item[1]])
            except Exception as exc:  # reported by close(); keep draining so the extraction never blocks
                self.failure = self.failure or exc
            finally:
                if isinstance(item[0], bytearray):
                    self._free.put(item[0])

    def close(self):
        self._work.put(None)
        self._thread.join()
        if self.failure is not None:
            raise TarError("computing %s digests failed: %s" % (self.algorithm, self.failure))
        return self.results
