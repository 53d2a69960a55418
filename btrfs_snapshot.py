"""Contentstore snapshots as btrfs subvolumes, when ``BACKUP_DIR`` is on btrfs.

A night costs what changed, not what is stored: ``contentstore-TS.partial`` starts as a writable btrfs
snapshot of the previous snapshot (instant, shares every extent), is brought up to date in place
(:func:`linktree.snapshot` with ``in_place=True``: changed and new files copied, vanished ones removed,
unchanged directories not even listed), then made read-only and renamed like any other snapshot. Each
snapshot is a plain, browsable tree with the same names, metadata, pairing, restore and verify as the
hardlinked ones; deleting one is ``btrfs subvolume delete`` (the space is freed in the background)
instead of one unlink per file.

The first copy goes into a fresh subvolume with ``rsync -a``; a run interrupted at any point leaves a
``.partial`` subvolume that the next run makes writable again and finishes (a full in-place compare).

Rights: the service user may create and snapshot subvolumes in directories it owns. Deleting one needs
the mount option ``user_subvol_rm_allowed`` (or root); without it :func:`delete` empties the subvolume
and removes it with rmdir(2) (Linux 4.18+), as slow as deleting a hardlinked tree.
"""

import logging
import os
import shutil
import stat

import filesystems
import subprocess_utils

SUBVOLUME_ROOT_INODE = 256  # every btrfs subvolume's root directory has this inode number
_QUIET = logging.getLogger("btrfs")


class BtrfsError(Exception):
    """A btrfs command failed; the message names the path and the fix."""


def unsupported_reason(folder):
    """None when snapshots in ``folder`` (need not exist yet: its nearest existing parent is checked) can
    be btrfs subvolumes, else why not (str)."""
    probe = folder
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    kind = filesystems.fs_type(probe)
    if kind != "btrfs":
        return "%s is on %s, not btrfs" % (folder, kind or "an unknown file system")
    if shutil.which("btrfs") is None:
        return "the btrfs command (package btrfs-progs) is not installed"
    return None


def is_subvolume(path):
    """True when ``path`` (not followed if a symlink) is the root of a btrfs subvolume."""
    try:
        st = os.lstat(path)
        parent = os.lstat(os.path.dirname(os.path.abspath(path)) or "/")
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_ino == SUBVOLUME_ROOT_INODE and st.st_dev != parent.st_dev


def _btrfs(args, what, log=None):
    try:
        return subprocess_utils.run(["btrfs"] + args, subprocess_utils.base_env(), what=what, log=log or _QUIET)
    except subprocess_utils.CommandError as exc:
        raise BtrfsError("%s: %s" % (what, exc))


def create(path, log=None):
    """Create the empty subvolume ``path``. Raises BtrfsError."""
    _btrfs(["subvolume", "create", path], "btrfs subvolume create %s" % path, log)


def snapshot(source, dest, log=None, readonly=False):
    """Snapshot subvolume ``source`` as ``dest`` (writable unless ``readonly``). Raises BtrfsError."""
    _btrfs(["subvolume", "snapshot"] + (["-r"] if readonly else []) + [source, dest],
           "btrfs subvolume snapshot %s %s" % (source, dest), log)


def set_readonly(path, readonly, log=None):
    """Make subvolume ``path`` read-only (True) or writable (False). Raises BtrfsError."""
    _btrfs(["property", "set", "-ts", path, "ro", "true" if readonly else "false"],
           "btrfs property set %s ro %s" % (path, "true" if readonly else "false"), log)


def delete(path, log=None):
    """Delete subvolume ``path`` (a read-only one is made writable first). Returns True; False when this
    user may not delete subvolumes (no ``user_subvol_rm_allowed``): then the caller empties it and
    removes it with rmdir. Raises BtrfsError for any other failure."""
    set_readonly(path, False, log)
    try:
        subprocess_utils.run(["btrfs", "subvolume", "delete", path], subprocess_utils.base_env(),
                             what="btrfs subvolume delete %s" % path, log=log or _QUIET)
    except subprocess_utils.CommandError as exc:
        if "not permitted" in exc.stderr_tail or "Operation not permitted" in str(exc):
            return False
        raise BtrfsError("btrfs subvolume delete %s: %s" % (path, exc))
    return True


def reflink_copy(source, dest, log=None):
    """Copy the tree ``source`` into the existing directory ``dest`` sharing the data (``cp -a
    --reflink=always``): metadata only, one inode per file. Raises BtrfsError."""
    _btrfs_cp = ["cp", "-a", "--reflink=always", "--no-target-directory", source.rstrip("/"), dest.rstrip("/")]
    try:
        subprocess_utils.run(_btrfs_cp, subprocess_utils.base_env(), what="cp --reflink of %s" % source,
                             log=log or _QUIET)
    except subprocess_utils.CommandError as exc:
        raise BtrfsError("copying %s into the subvolume %s: %s" % (source, dest, exc))


def prepare(partial, previous_path, resumed, log, remove_tree):
    """Make ``partial`` (not existing yet) a writable subvolume holding the starting state of tonight's sync.

    ``previous_path``: the link base (a DONE snapshot, subvolume or hardlinked tree) or None;
    ``resumed``: the ``.partial`` an interrupted run left, or None: a subvolume is renamed to ``partial``
    and made writable; a hardlinked tree (from before btrfs was used) is reflink-copied into a new
    subvolume and then removed with ``remove_tree(path)`` (killed in between, it stays a ``.partial``
    that retention deletes). Returns ``"previous"`` when ``partial`` now equals the previous snapshot,
    ``"resumed"`` when it holds an interrupted run's work (compare every file), ``"empty"`` for a first
    copy. Raises BtrfsError, OSError."""
    if resumed:
        if is_subvolume(resumed):
            os.rename(resumed, partial)
            set_readonly(partial, False, log)
            return "resumed"
        create(partial, log)
        reflink_copy(resumed, partial, log)
        remove_tree(resumed)
        return "resumed"
    if previous_path and is_subvolume(previous_path):
        snapshot(previous_path, partial, log)
        return "previous"
    create(partial, log)
    if previous_path:  # the first night on btrfs after hardlinked snapshots
        reflink_copy(previous_path, partial, log)
        return "previous"
    return "empty"


def finish(partial, log):
    """Make the synced ``partial`` private and read-only, ready to be renamed. Raises BtrfsError/OSError."""
    os.chmod(partial, 0o700)
    set_readonly(partial, True, log)
