"""Facts about the file system a path lives on, read from ``/proc/self/mountinfo`` (Linux).

The snapshot engines use them to decide what they may rely on: whether a directory's link count tells
that it has no subdirectories (ext2/3/4, XFS, tmpfs keep ``2 + subdirectories``; btrfs, NFS, CIFS and FUSE
file systems do not promise it), and whether ``BACKUP_DIR`` is on btrfs (subvolume snapshots).
"""

import os

# File systems on which a directory's st_nlink is 2 + its number of subdirectories (GNU find's "leaf
# optimisation" relies on the same convention and lists the same ones). ext4 reports 1 when a directory has
# more than 65,000 subdirectories; callers only trust exactly 2.
NLINK_COUNTS_SUBDIRS = frozenset(("ext2", "ext3", "ext4", "xfs", "tmpfs"))


def _unescape(field):
    # mountinfo escapes space, tab, newline and backslash as \040, \011, \012, \134.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_of(path, mountinfo="/proc/self/mountinfo"):
    """``(mount point, fs type, mount options set)`` of the mount holding ``path`` (symlinks resolved), or
    ``(None, None, frozenset())`` when ``mountinfo`` cannot be read. Never raises."""
    path = os.path.realpath(path)
    best = (None, None, frozenset())
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as handle:
            lines = handle.readlines()
    except OSError:
        return best
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 3:
            continue
        mount = _unescape(fields[4])
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        # Later lines win on equal length: a mount stacked over another is listed after it.
        if inside and (best[0] is None or len(mount) >= len(best[0])):
            options = frozenset(fields[5].split(",")) | frozenset(tail[2].split(","))
            best = (mount, tail[0], options)
    return best


def fs_type(path):
    """The file system type (``ext4``, ``btrfs``, ``nfs4``...) of ``path``, or None when unknown."""
    return mount_of(path)[1]


def nlink_counts_subdirs(path):
    """True when directories on ``path``'s file system have ``st_nlink == 2`` exactly when they have no
    subdirectory (see :data:`NLINK_COUNTS_SUBDIRS`)."""
    return fs_type(path) in NLINK_COUNTS_SUBDIRS
