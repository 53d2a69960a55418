"""The first full copy of a contentstore with several rsyncs at once, one per month bucket.

One ``rsync -a`` of a multi-TB store runs for hours to days, one file at a time; on the measured machine
four rsyncs over the ``YYYY/M`` buckets took 0.55-0.7x the time of one (bench/RESULTS.md). The result is
the same tree: each bucket is copied by ``rsync -a --delete SRC/YYYY/M/ DEST/YYYY/M/``, then one last
``rsync -a --delete`` that excludes everything deeper than the buckets copies what lies above them
(files at the top, directory modes and mtimes, entries that vanished from the source). Excluded entries
are never deleted by rsync, so that pass leaves the buckets' contents alone.

Resuming an interrupted copy works as with one rsync: every rsync skips what is already there and
identical, and ``--delete`` removes what the source no longer has (entries at the top two levels that the
source lacks are removed first, since the last pass may not delete a directory whose contents it
excludes).
"""

import os
import stat
from concurrent.futures import ThreadPoolExecutor

import tree_delete

# What the last pass leaves to the per-bucket rsyncs: everything three levels down or deeper.
BELOW_BUCKETS = "--exclude=/*/*/*"


class BucketVanished(Exception):
    """A bucket disappeared from the source while it was being copied (normal on a live store)."""


def buckets(source):
    """The second-level directories of ``source`` (bytes, relative, sorted): the units of work."""
    found = []
    for top in sorted(os.scandir(os.fsencode(source)), key=lambda e: e.name):
        if top.is_dir(follow_symlinks=False):
            for sub in sorted(os.scandir(top.path), key=lambda e: e.name):
                if sub.is_dir(follow_symlinks=False):
                    found.append(os.path.join(top.name, sub.name))
    return found


def _prune(source, dest):
    """Remove from ``dest`` the entries of its top two levels that ``source`` lacks or that changed type
    between directory and non-directory; create the top-level directories the buckets go into."""
    src, dst = os.fsencode(source), os.fsencode(dest)
    for rel in (b"",) + tuple(e.name for e in os.scandir(src) if e.is_dir(follow_symlinks=False)):
        d_dir = os.path.join(dst, rel) if rel else dst
        if not os.path.isdir(d_dir) or os.path.islink(d_dir):
            if os.path.lexists(d_dir):
                os.unlink(d_dir)
            os.mkdir(d_dir, 0o700)
            continue
        for entry in os.scandir(d_dir):
            s_path = os.path.join(src, rel, entry.name) if rel else os.path.join(src, entry.name)
            try:
                s_st = os.lstat(s_path)
            except FileNotFoundError:
                s_st = None
            d_is_dir = entry.is_dir(follow_symlinks=False)
            if s_st is None or stat.S_ISDIR(s_st.st_mode) != d_is_dir:
                if d_is_dir:
                    tree_delete.remove_tree(os.fsdecode(entry.path))
                else:
                    os.unlink(entry.path)


def parallel_copy(source, dest, workers, copy_one, merge, keep_going=lambda: True):
    """Copy ``source`` into the directory ``dest`` with ``workers`` rsyncs at once.

    ``copy_one(src, dst, extra_args)`` runs one rsync and returns its result (raises on failure; raises
    :class:`BucketVanished` when ``src`` is gone); ``merge(results)`` combines them. A failed bucket
    does not stop the others (what they copy is kept for the next run) unless ``keep_going()`` turns
    False (no space left, time is up). Returns ``merge(results)``; raises the first failure once the
    others have ended. Falls back to one rsync of the whole tree when there are fewer than two buckets
    or ``workers`` < 2. Raises what ``copy_one`` raises, OSError."""
    items = buckets(source) if workers > 1 else []
    if len(items) < 2:
        return merge([copy_one(source, dest, [])])
    _prune(source, dest)
    src, dst = os.fsencode(source), os.fsencode(dest)
    errors = []

    def one(rel):
        if not keep_going():
            return None
        try:
            return copy_one(os.fsdecode(os.path.join(src, rel)), os.fsdecode(os.path.join(dst, rel)), [])
        except BucketVanished:
            if os.path.isdir(os.path.join(dst, rel)):
                tree_delete.remove_tree(os.fsdecode(os.path.join(dst, rel)))
        except Exception as exc:  # kept, raised once every bucket had its turn
            errors.append(exc)
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = [r for r in pool.map(one, items) if r is not None]
    if keep_going():
        try:
            results.append(copy_one(source, dest, [BELOW_BUCKETS]))
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    return merge(results)
