"""Reading the tar files pg_basebackup writes, whatever their compression.

``.tar`` and ``.tar.gz`` are read in-process (tarfile); ``.tar.zst`` and ``.tar.lz4`` through the
``zstd``/``lz4`` command-line tools (the standard library has no zstd before Python 3.14).
"""

import gzip
import os
import tarfile

import subprocess_utils

EXTENSIONS = {"none": "", "gzip": ".gz", "zstd": ".zst", "lz4": ".lz4"}
BUFSIZE = 1 << 20  # tarfile skips member data in bufsize reads; its 10 KB default is slow on a 1 GB tar
DECOMPRESSORS = {".zst": ["zstd", "-dc", "-q"], ".lz4": ["lz4", "-dc", "-q"]}


class TarError(Exception):
    """A tar file is unreadable, truncated or lacks something it must hold."""


def compression_of(path):
    """'gzip', 'zstd', 'lz4' or 'none', from the file name."""
    for method, ext in EXTENSIONS.items():
        if ext and path.endswith(".tar" + ext):
            return method
    if path.endswith(".tar"):
        return "none"
    raise TarError("not a tar file name: %s" % path)


def walk(path, visit, env=None):
    """Read every member of the tar file ``path`` in order and call ``visit(tarinfo, tarfile)``.

    ``visit`` may call ``tarfile.extractfile(tarinfo)`` for regular files. Reading to the end proves the
    file is complete (a truncated gzip/zstd stream or tar raises). Raises TarError.
    """
    ext = os.path.splitext(path)[1]
    try:
        if ext in DECOMPRESSORS:
            def consume(stream):
                with tarfile.open(fileobj=stream, mode="r|", bufsize=BUFSIZE) as archive:
                    for member in archive:
                        visit(member, archive)

            subprocess_utils.read_stream(DECOMPRESSORS[ext] + [path], subprocess_utils.base_env(), consume,
                                         what="reading %s" % os.path.basename(path))
        else:
            # gzip.open, not tarfile's "r|gz": pg_basebackup's pg_wal.tar.gz has several gzip members,
            # and tarfile's own stream reader stops after the first (an empty one).
            with (gzip.open(path, "rb") if ext == ".gz" else open(path, "rb")) as raw, \
                    tarfile.open(fileobj=raw, mode="r|", bufsize=BUFSIZE) as archive:
                for member in archive:
                    visit(member, archive)
    except (tarfile.TarError, EOFError, OSError, subprocess_utils.CommandError) as exc:
        raise TarError("%s is unreadable or truncated: %s" % (path, exc))


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


def extract(path, dest):
    """Extract ``path`` into directory ``dest``, refusing members that would land outside it.

    Modes come from the archive (PostgreSQL files are 0600/0700). Raises TarError.
    """
    dest_real = os.path.realpath(dest)

    def visit(member, archive):
        target = os.path.realpath(os.path.join(dest, member.name))
        if target != dest_real and not target.startswith(dest_real + os.sep):
            raise TarError("%s: member %r would be written outside %s" % (path, member.name, dest))
        if member.issym() or member.islnk():
            link_target = os.path.realpath(os.path.join(os.path.dirname(target), member.linkname))
            if member.islnk() or not os.path.isabs(member.linkname):
                if not link_target.startswith(dest_real + os.sep):
                    raise TarError("%s: link %r points outside %s" % (path, member.name, dest))
        kwargs = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
        # numeric_owner: the archive's uid is the server's; names may not exist on a new host.
        archive.extract(member, dest, set_attrs=True, numeric_owner=True, **kwargs)

    walk(path, visit)


def _clean(name):
    return name[2:] if name.startswith("./") else name
