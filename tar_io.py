"""Reading the tar files pg_basebackup writes, whatever their compression.

``.tar`` and ``.tar.gz`` are read in-process (tarfile); ``.tar.zst`` and ``.tar.lz4`` through the
``zstd``/``lz4`` command-line tools (the standard library has no zstd before Python 3.14). Safe extraction
is :mod:`tar_extract`.
"""

import gzip
import io
import os
import stat
import tarfile

import subprocess_utils

EXTENSIONS = {"none": "", "gzip": ".gz", "zstd": ".zst", "lz4": ".lz4"}
BUFSIZE = 1 << 20  # member data is read and skipped in pieces of this size; 10 KB ones are slow on a 1 GB tar
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


def _members(stream, visit, path):
    """Iterate a tar stream, calling ``visit``; raise TarError when it lacks its end-of-archive marker.
    The stream is opened as a file that is only read forward (:class:`ForwardReader`, ``archive.fileobj``)
    rather than in tarfile's stream mode: member data can then be read straight into a buffer, and skipped
    without passing through Python at all."""
    tarinfo = type("TarInfoFor", (_CheckedTarInfo,), {"ends": []})
    with tarfile.open(fileobj=ForwardReader(stream), mode="r:", tarinfo=tarinfo) as archive:
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
        self._skip_buffer = None
        self._pipe_fd = _splice_source(raw)

    def tell(self):
        return self._pos

    def seek(self, pos, whence=0):
        if whence != 0 or pos < self._pos:
            raise OSError("cannot seek backwards in a tar stream (to %d from %d)" % (pos, self._pos))
        if self._pipe_fd is not None:
            self._splice_to(pos)
        while self._pos < pos:
            if self._skip_buffer is None:
                self._skip_buffer = memoryview(bytearray(BUFSIZE))
            count = self._raw.readinto(self._skip_buffer[:min(BUFSIZE, pos - self._pos)])
            if not count:
                break  # the read that follows finds the end of the data
            self._pos += count
        return self._pos

    def _splice_to(self, pos):
        """Skip to ``pos`` without copying the data into the process: what the reader has buffered first,
        then the pipe's pages straight to /dev/null (a GB of table data that the scan only counts)."""
        buffered = len(self._raw.peek(1)) if self._pos < pos else 0
        taken = len(self._raw.read(min(buffered, pos - self._pos))) if buffered else 0
        self._pos += taken
        if self._pos >= pos or taken < buffered:
            return  # still something buffered: the pipe is not where the reader is, so no splice
        with open(os.devnull, "wb") as sink:
            while self._pos < pos:
                count = os.splice(self._pipe_fd, sink.fileno(), min(1 << 24, pos - self._pos))
                if not count:
                    return
                self._pos += count

    def read(self, size=-1):
        data = self._raw.read(size)
        self._pos += len(data)
        return data

    def readinto(self, buffer):
        count = self._raw.readinto(buffer)
        self._pos += count or 0
        return count or 0


def _splice_source(raw):
    """The pipe's file descriptor when ``raw`` is a buffered reader of a pipe and os.splice exists (Linux,
    Python 3.10+); otherwise None (data is skipped by reading it into a reused buffer)."""
    if not hasattr(os, "splice") or not isinstance(raw, io.BufferedReader):
        return None
    try:
        fd = raw.fileno()
        return fd if stat.S_ISFIFO(os.fstat(fd).st_mode) else None
    except (OSError, ValueError):
        return None


def compression_of(path):
    """'gzip', 'zstd', 'lz4' or 'none', from the file name."""
    for method, ext in EXTENSIONS.items():
        if ext and path.endswith(".tar" + ext):
            return method
    if path.endswith(".tar"):
        return "none"
    raise TarError("not a tar file name: %s" % path)


def walk(path, visit, source=None):
    """Read every member of the tar file ``path`` in order and call ``visit(tarinfo, tarfile)``.

    ``visit`` may call ``tarfile.extractfile(tarinfo)`` for regular files. Reading to the end proves the
    file is complete (a truncated gzip/zstd stream or tar raises). ``source``: a binary file object to read
    the (compressed) bytes from instead of opening ``path``, e.g. a :class:`GrowingFile`. Raises TarError.
    """
    ext = os.path.splitext(path)[1]
    try:
        if ext in DECOMPRESSORS:
            def consume(stream):
                _members(stream, visit, path)

            argv = DECOMPRESSORS[ext] + (["-"] if source is not None else [path])
            subprocess_utils.read_stream(argv, subprocess_utils.base_env(), consume, feed=source,
                                         what="reading %s" % os.path.basename(path))
        else:
            raw = source if source is not None else open(path, "rb")
            try:
                # gzip.GzipFile, not tarfile's "r|gz": pg_basebackup's pg_wal.tar.gz has several gzip
                # members, and tarfile's own stream reader stops after the first (an empty one).
                stream = gzip.GzipFile(fileobj=raw, mode="rb") if ext == ".gz" else raw
                _members(stream, visit, path)
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
            self._finished.wait(self._poll)  # wakes as soon as the writer is done, not a poll later

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
    try:
        found = scan(path, wanted, source)
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
    return found


def scan(path, wanted=(), source=None):
    """One pass over the whole tar: ({member name: size} for every regular file, {name: bytes} of the
    members named in ``wanted``). Names lose a leading './'. ``source``: see :func:`walk`. Raises TarError."""
    sizes, contents = {}, {}

    def visit(member, archive):
        if member.isfile():
            name = clean_name(member.name)
            sizes[name] = member.size
            if name in wanted:
                contents[name] = archive.extractfile(member).read()

    walk(path, visit, source)
    return sizes, contents


def list_members(path):
    """{member name: size} for every regular file in the tar (names without a leading './')."""
    return scan(path)[0]


def read_member(path, wanted):
    """The bytes of member ``wanted`` (e.g. 'backup_label'), or None when absent. Reads the whole tar."""
    return scan(path, (wanted,))[1].get(wanted)


def clean_name(name):
    """A member name without its leading './'."""
    return name[2:] if name.startswith("./") else name
