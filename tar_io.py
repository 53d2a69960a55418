"""Reading the tar files pg_basebackup writes, whatever their compression.

``.tar`` and ``.tar.gz`` are read in-process (tarfile); ``.tar.zst`` and ``.tar.lz4`` through the
``zstd``/``lz4`` command-line tools (the standard library has no zstd before Python 3.14).
"""

import gzip
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


def _members(stream, visit, path):
    """Iterate a tar stream, calling ``visit``; raise TarError when it lacks its end-of-archive marker."""
    tarinfo = type("TarInfoFor", (_CheckedTarInfo,), {"ends": []})
    with tarfile.open(fileobj=stream, mode="r|", bufsize=BUFSIZE, tarinfo=tarinfo) as archive:
        for member in archive:
            visit(member, archive)
    if tarinfo.ends[-1:] != ["marker"]:
        raise TarError("%s ends without the tar end-of-archive marker: it is truncated" % path)


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


def extract(path, dest):
    """Extract ``path`` into directory ``dest`` member by member, refusing what :func:`check_member` refuses
    and any member whose path would reach outside ``dest`` through a symlink extracted before it.

    setuid/setgid/sticky bits and group/other write bits are dropped (PostgreSQL's files are 0600/0700); the
    ``data`` extraction filter is used where Python has it. An existing non-directory at a member's path is
    removed first, so a regular file is never written through a link. Raises TarError.
    """
    dest_real = os.path.realpath(dest)
    has_filters = hasattr(tarfile, "data_filter")

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
        kwargs = {"filter": "data"} if has_filters else {}
        # numeric_owner: the archive's uid is the server's; names may not exist on a new host.
        archive.extract(member, dest_real, set_attrs=True, numeric_owner=True, **kwargs)

    walk(path, visit)


def _clean(name):
    return name[2:] if name.startswith("./") else name
