"""Reading the tar files pg_basebackup writes, whatever their compression.

``.tar`` and ``.tar.gz`` are read in-process (tarfile); ``.tar.zst`` and ``.tar.lz4`` through the
``zstd``/``lz4`` command-line tools (the standard library has no zstd before Python 3.14).
"""

import gzip
import hashlib
import io
import os
import re
import stat
import tarfile
import time

import subprocess_utils

EXTENSIONS = {"none": "", "gzip": ".gz", "zstd": ".zst", "lz4": ".lz4"}
BUFSIZE = 1 << 20  # tarfile skips member data in bufsize reads; its 10 KB default is slow on a 1 GB tar
DECOMPRESSORS = {".zst": ["zstd", "-dc", "-q"], ".lz4": ["lz4", "-dc", "-q"]}


class TarError(Exception):
    """A tar file is unreadable, truncated or lacks something it must hold."""


class _CheckedTarInfo(tarfile.TarInfo):
    """Remembers why the archive ended: tarfile treats a file cut right after a member like a proper end,
    and only the end-of-archive marker (a block of zeros) tells them apart."""

    ends = []

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        if len(buf) == 0:
            cls.ends.append("cut")
        elif buf.count(tarfile.NUL) == tarfile.BLOCKSIZE:
            cls.ends.append("marker")
        return super().frombuf(buf, encoding, errors)


def _members(stream, visit, path, forward=False):
    """Iterate a tar stream, calling ``visit``; raise TarError when it lacks its end-of-archive marker.
    ``forward``: open it as a file that is only read forward (:class:`ForwardReader`, ``archive.fileobj``)
    instead of tarfile's stream mode, so that member data can be read straight into a buffer."""
    tarinfo = type("TarInfoFor", (_CheckedTarInfo,), {"ends": []})
    if forward:
        opened = tarfile.open(fileobj=ForwardReader(stream), mode="r:", tarinfo=tarinfo)
    else:
        opened = tarfile.open(fileobj=stream, mode="r|", bufsize=BUFSIZE, tarinfo=tarinfo)
    with opened as archive:
        archive.copybufsize = BUFSIZE  # extraction copies in 16 KB pieces otherwise: 60,000 calls per GB
        for member in archive:
            visit(member, archive)
    if tarinfo.ends[-1:] != ["marker"]:
        raise TarError("%s ends without the tar end-of-archive marker: it is truncated" % path)


class ForwardReader:
    """A stream (a pipe from zstd, a gzip reader, a file) that tarfile may treat as a seekable file because
    it only ever seeks forward, reading through sequentially; ``readinto`` reads member data with no copy
    through tarfile. A backward seek raises OSError."""

    def __init__(self, raw):
        self._raw = raw
        self._pos = 0

    def tell(self):
        return self._pos

    def seek(self, pos, whence=0):
        if whence != 0 or pos < self._pos:
            raise OSError("cannot seek backwards in a tar stream (to %d from %d)" % (pos, self._pos))
        while self._pos < pos:
            chunk = self._raw.read(min(BUFSIZE, pos - self._pos))
            if not chunk:
                break  # the read that follows finds the end of the data
            self._pos += len(chunk)
        return self._pos

    def read(self, size=-1):
        data = self._raw.read(size)
        self._pos += len(data)
        return data

    def readinto(self, buffer):
        count = self._raw.readinto(buffer)
        self._pos += count or 0
        return count or 0


def compression_of(path):
    """'gzip', 'zstd', 'lz4' or 'none', from the file name."""
    for method, ext in EXTENSIONS.items():
        if ext and path.endswith(".tar" + ext):
            return method
    if path.endswith(".tar"):
        return "none"
    raise TarError("not a tar file name: %s" % path)


def walk(path, visit, source=None, forward=False):
    """Read every member of the tar file ``path`` in order and call ``visit(tarinfo, tarfile)``.

    ``visit`` may call ``tarfile.extractfile(tarinfo)`` for regular files. Reading to the end proves the
    file is complete (a truncated gzip/zstd stream or tar raises). ``source``: a binary file object to read
    the (compressed) bytes from instead of opening ``path``, e.g. a :class:`GrowingFile`. ``forward``: see
    :func:`_members`. Raises TarError.
    """
    ext = os.path.splitext(path)[1]
    try:
        if ext in DECOMPRESSORS:
            def consume(stream):
                _members(stream, visit, path, forward)

            argv = DECOMPRESSORS[ext] + (["-"] if source is not None else [path])
            subprocess_utils.read_stream(argv, subprocess_utils.base_env(), consume, feed=source,
                                         what="reading %s" % os.path.basename(path))
        else:
            raw = source if source is not None else open(path, "rb")
            try:
                # gzip.GzipFile, not tarfile's "r|gz": pg_basebackup's pg_wal.tar.gz has several gzip
                # members, and tarfile's own stream reader stops after the first (an empty one).
                stream = gzip.GzipFile(fileobj=raw, mode="rb") if ext == ".gz" else raw
                _members(stream, visit, path, forward)
            finally:
                if source is None:  # ours to close; a caller's source stays open for the caller
                    raw.close()
    except (tarfile.TarError, EOFError, OSError, subprocess_utils.CommandError) as exc:
        raise TarError("%s is unreadable or truncated: %s" % (path, exc))


class GrowingFile(io.RawIOBase):
    """A file another process is still writing, read as a stream: a read waits for more data until
    ``finished`` (a threading.Event) is set, and only then returns end-of-file. ``bytes_read`` counts."""

    def __init__(self, path, finished, poll=0.05):
        super().__init__()
        self._file = open(path, "rb")
        self._finished = finished
        self._poll = poll
        self.bytes_read = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        while True:
            done = self._finished.is_set()  # before reading: data written just before finishing is read
            count = self._file.readinto(buffer)
            if count or done:
                self.bytes_read += count or 0
                return count or 0
            time.sleep(self._poll)

    def close(self):
        self._file.close()
        super().close()


def scan_while_written(path, wanted, finished, poll=0.05):
    """Like :func:`scan`, but while a writer (pg_basebackup) is still producing ``path``: follows the file
    until ``finished`` is set and then reads it to its end. Returns (sizes, contents), or None when the
    file never appeared or was not read exactly as it ended up (the caller then checks it afterwards).
    Raises TarError only for a file that is complete and unreadable."""
    while not os.path.exists(path):
        if finished.is_set() and not os.path.exists(path):
            return None
        finished.wait(poll)
    source = GrowingFile(path, finished, poll)
    result = {"sizes": {}, "contents": {}}

    def visit(member, archive):
        if member.isfile():
            name = _clean(member.name)
            result["sizes"][name] = member.size
            if name in wanted:
                result["contents"][name] = archive.extractfile(member).read()

    try:
        walk(path, visit, source=source)
        # Drain what the tar's end-of-archive padding left, then make sure we read the whole final file.
        while source.read(BUFSIZE):
            pass
    except TarError:
        if not finished.is_set():
            finished.wait()
        raise
    finally:
        source.close()
    if source.bytes_read != os.path.getsize(path):
        return None
    return result["sizes"], result["contents"]


def scan(path, wanted=()):
    """One pass over the whole tar: ({member name: size} for every regular file, {name: bytes} of the
    members named in ``wanted``). Names lose a leading './'. Raises TarError."""
    sizes, contents = {}, {}

    def visit(member, archive):
        if member.isfile():
            name = _clean(member.name)
            sizes[name] = member.size
            if name in wanted:
                contents[name] = archive.extractfile(member).read()

    walk(path, visit)
    return sizes, contents


def list_members(path):
    """{member name: size} for every regular file in the tar (names without a leading './')."""
    return scan(path)[0]


def read_member(path, wanted):
    """The bytes of member ``wanted`` (e.g. 'backup_label'), or None when absent. Reads the whole tar."""
    return scan(path, (wanted,))[1].get(wanted)


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
    name = _clean(member.name).rstrip("/")
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


def extract(path, dest, digest=None):
    """Extract ``path`` into directory ``dest`` member by member, refusing what :func:`check_member` refuses
    and any member whose path would reach outside ``dest`` through a symlink extracted before it.

    setuid/setgid/sticky bits and group/other write bits are dropped (PostgreSQL's files are 0600/0700); the
    ``data`` extraction filter is used where Python has it. An existing non-directory at a member's path is
    removed first, so a regular file is never written through a link (it is created with O_EXCL and
    O_NOFOLLOW). ``digest``: a hashlib algorithm name (``sha256``...); then returns {member name: (size, hex
    digest)} of every regular file, hashed in a second thread from the bytes as they are written (the
    archive is read once); else returns {}. Raises TarError.
    """
    dest_real = os.path.realpath(dest)
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
            _write_file(archive.fileobj, member, target, name, hasher)
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
        walk(path, visit, forward=True)
    finally:
        sums = hasher.close() if hasher is not None else {}
    return sums


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _write_file(reader, member, target, name, hasher):
    """Write regular file ``member`` at ``target`` (which does not exist) with its mode and mtime, reading
    its data from ``reader`` (the archive's :class:`ForwardReader`) into reused buffers; as root without
    extraction filters also its numeric owner, as tarfile would."""
    # Missing parents, as tarfile makes them (their real path was checked to be inside the target).
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd = os.open(target, _NEW_FILE, 0o600)
    try:
        reader.seek(member.offset_data)
        if hasher is not None:
            hasher.begin(name)
        left = member.size
        own = bytearray(BUFSIZE) if hasher is None else None
        while left > 0:
            buffer = own if hasher is None else hasher.buffer()
            view = memoryview(buffer)[:min(BUFSIZE, left)]
            count = reader.readinto(view)
            if not count:
                raise tarfile.ReadError("unexpected end of data in %s" % member.name)
            done = 0
            while done < count:
                done += os.write(fd, view[done:count])
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
            self._free.put(bytearray(BUFSIZE))
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


def _clean(name):
    return name[2:] if name.startswith("./") else name
