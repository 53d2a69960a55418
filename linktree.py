"""A hardlinked snapshot of a tree, built in-process: the nightly fast path of the contentstore snapshot.

For every entry of the source tree: a regular file whose size, mtime, mode (and, as root, owner) equal
those of the same path in the previous snapshot is hard-linked from it (same inode, no data copied); any
other file is copied (data, mode, mtime; owner too when running as root); symlinks are recreated;
directories are created and get the source's mode and mtime. This is rsync's quick check and
``--link-dest`` behaviour, without rsync's per-file protocol round-trips. Paths are handled as bytes, so
any file name works (spaces, newlines, leading dashes, non-UTF-8).

**Unchanged directories** (``trust_before_ns``): adding, removing or renaming an entry changes a
directory's mtime and ctime; chmod/chown change its ctime. A source directory whose mtime, mode (and owner)
equal the previous snapshot's copy of it *and* whose ctime is older than ``trust_before_ns`` (the previous
snapshot's start minus a margin, chosen by the caller) holds the same names as that copy, so its files and
symlinks are hard-linked from the previous snapshot by name, without a stat of the source file: the
per-file cost falls to one link(2) -- what ``cp -al`` pays. This trusts that a file is never rewritten in
place keeping its name (Alfresco never rewrites a ``.bin``); the caller compares every file now and then
(``trust_before_ns=None``) to catch what that rule cannot see.

**In place** (``in_place=True``): ``dest`` is the previous state itself (the btrfs working subvolume) and
is brought up to date: unchanged files stay, changed ones are replaced, vanished ones removed. Unchanged
directories are then not even listed when the source's file system counts subdirectories in the link
count (a leaf directory has ``st_nlink == 2``): the cost is one stat per directory plus the changes.

Subtrees (years, then months, ...) are shared out to ``workers`` forked worker processes
(:mod:`linktree_workers`): the per-file work is Python's, so threads of one interpreter barely add up, and
several requests in flight help a cold disk; each worker sets the attributes of the directories it filled
and sends its counters back. This module decides, per directory, what is done; :mod:`linktree_ops` does it
to the entries.
"""

import os
import stat

import filesystems
import linktree_ops
import linktree_workers

_FAN_OUT_DEPTH = 3  # split the tree at most down to year/month/day for the workers
# More changed directories than this are not recorded (a night that changed that much is listed whole off-site,
# and the record would only grow the snapshot's metadata).
MAX_CHANGED_DIRS = 50000


class LinkTreeError(Exception):
    """The snapshot could not be built; the message names the path."""


class Stats:
    """Counters of one worker (merged at the end, so no lock on the per-file path)."""

    FIELDS = ("files", "dirs", "symlinks", "linked", "copied", "bytes_total", "bytes_copied", "bytes_linked",
              "vanished", "skipped_special", "dirs_trusted", "dirs_compared", "delta_files", "delta_bytes",
              "symlink_bytes")

    def __init__(self, resume=False, track_changes=False):
        self.resume = resume
        self.workers = None  # worker processes used
        for name in self.FIELDS:
            setattr(self, name, 0)
        self.warnings = []
        # The destination directories not made as exact copies of the previous snapshot's (compared, or an
        # unchanged one where a link failed or a subdirectory vanished); None: not tracked, or too many.
        self.changed_dirs = [] if track_changes else None

    def add(self, **counts):
        for name, value in counts.items():
            setattr(self, name, getattr(self, name) + value)

    def merge(self, other):
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if self.changed_dirs is not None:
            self.changed_dirs = None if other.changed_dirs is None else self.changed_dirs + other.changed_dirs
            if self.changed_dirs is not None and len(self.changed_dirs) > MAX_CHANGED_DIRS:
                self.changed_dirs = None
        for text in other.warnings:
            self.warn(text)

    def changed(self, d_path):
        """Record destination directory ``d_path`` (bytes) as not an exact copy of the previous one's."""
        if self.changed_dirs is not None:
            self.changed_dirs.append(d_path)
            if len(self.changed_dirs) > MAX_CHANGED_DIRS:
                self.changed_dirs = None

    def warn(self, text):
        if len(self.warnings) < 20:
            self.warnings.append(text)

    def as_dict(self):
        return {name: getattr(self, name) for name in self.FIELDS}


class _Job:
    """What every worker needs to know about the run."""

    def __init__(self, resume, in_place, trust_before_ns, leaf_nlink):
        self.as_root = os.geteuid() == 0
        self.resume = resume
        self.in_place = in_place
        self.trust_before_ns = trust_before_ns
        self.leaf_nlink = leaf_nlink


def _trusted(job, st, pst):
    """True when source directory ``st`` is unchanged since the previous snapshot's copy ``pst``."""
    return (job.trust_before_ns is not None and pst is not None and stat.S_ISDIR(pst.st_mode)
            and st.st_mtime_ns == pst.st_mtime_ns and st.st_ctime_ns < job.trust_before_ns
            and stat.S_IMODE(st.st_mode) == stat.S_IMODE(pst.st_mode)
            and (not job.as_root or (st.st_uid, st.st_gid) == (pst.st_uid, pst.st_gid)))


def _unchanged_in_place(job, stats, s, d, st):
    """An unchanged directory, in place: nothing to do but find its subdirectories."""
    stats.add(dirs_trusted=1)
    if job.leaf_nlink and st.st_nlink == 2:
        return []
    children = []
    try:
        with os.scandir(s) as listing:
            for entry in listing:
                if entry.is_dir(follow_symlinks=False):
                    child = os.path.join(d, entry.name)
                    children.append((entry.path, child, child, entry.stat(follow_symlinks=False)))
    except FileNotFoundError:
        stats.add(vanished=1)
    stats.add(dirs=len(children))
    return children


def _process(job, stats, item, dir_attrs):
    """One directory ``(s, p, d, lstat of s)``: fill ``d`` (created by the parent, except in place, where
    ``p`` is ``d``); returns its subdirectories as items. Records the directories whose attributes must be
    set once their contents are complete in ``dir_attrs``."""
    s, p, d, st = item
    if job.trust_before_ns is not None and p is not None:
        try:
            pst = os.lstat(p)
        except FileNotFoundError:
            pst = None
        if _trusted(job, st, pst):
            if job.in_place:
                return _unchanged_in_place(job, stats, s, d, st)
            children = linktree_ops.linked_dir(job, stats, s, p, d)
            if children is not None:
                dir_attrs.append((d, st))
                return children
    if job.in_place:
        linktree_ops.ensure_dir(job, stats, d)
        p = None  # compared against d itself
    elif p is not None and not os.path.isdir(p):
        p = None
    children = linktree_ops.compare_dir(job, stats, s, p, d, cleanup=job.resume or job.in_place)
    dir_attrs.append((d, st))
    if job.in_place:
        return [(cs, cd, cd, cst) for cs, _p, cd, cst in children]
    return children


def _walk_into(job, state, item):
    """Depth-first over the subtree ``item``, counting into ``state``, a pair (Stats, dir_attrs)."""
    stats, dir_attrs = state
    stack = [item]
    while stack:
        if linktree_workers.orphaned():
            raise linktree_workers.WorkerError("the backup run that started this worker is gone")
        stack.extend(_process(job, stats, stack.pop(), dir_attrs))


def _finish_worker(job, state):
    """A worker process's last step: the directories it filled all lie inside its own subtrees, so they are
    complete now and get their attributes here, in parallel with the other workers; returns its Stats."""
    stats, dir_attrs = state
    _apply_dir_attrs(dir_attrs, job.as_root)
    return stats


def _apply_dir_attrs(dir_attrs, as_root):
    # Deepest first: setting a parent's mtime before filling its children would be undone by them.
    for path, st in sorted(dir_attrs, key=lambda item: item[0].count(b"/"), reverse=True):
        if as_root:
            os.chown(path, st.st_uid, st.st_gid)
        os.chmod(path, stat.S_IMODE(st.st_mode))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def snapshot(source, dest, previous=None, workers=None, resume=False, trust_before_ns=None, in_place=False):
    """Make ``dest`` (an existing directory) a copy of ``source``.

    ``previous``: the previous snapshot; files unchanged since it become hard links into it. ``resume``:
    ``dest`` holds a partial copy from an interrupted run; identical files there are kept.
    ``trust_before_ns``: skip the per-file compare in directories unchanged since ``previous`` whose ctime
    is older than this (ns since the epoch; see the module docstring); None compares every file.
    ``in_place``: ``dest`` is the previous state, updated in place (``previous`` is ignored); then
    ``delta_files``/``delta_bytes`` of the result say how the regular files changed in number and bytes.
    ``workers``: worker processes (1: none, all in this process), or None: as many as measurably help
    (:func:`linktree_workers.walk`; the number is in the result's ``workers``). Returns :class:`Stats`; when
    ``previous`` is used with ``trust_before_ns`` (not in place), its ``changed_dirs`` lists, relative to
    ``dest`` (bytes, sorted; b"" is the root), every directory that is not an exact copy of the previous
    snapshot's: every other directory holds the same names as there, its files the same inodes (None when
    more than MAX_CHANGED_DIRS).
    Raises LinkTreeError naming the path.
    """
    src, dst = os.fsencode(source), os.fsencode(dest)
    prev = dst if in_place else (os.fsencode(previous) if previous else None)
    job = _Job(resume and not in_place, in_place, trust_before_ns,
               in_place and filesystems.nlink_counts_subdirs(source))
    track = trust_before_ns is not None and not in_place and prev is not None
    stats = Stats(job.resume, track)
    dir_attrs = []
    try:
        root_st = os.stat(src)
        # The root is always compared: the snapshot root's own mode is changed to 0700 afterwards.
        items = linktree_ops.compare_dir(job, stats, src, prev if prev and os.path.isdir(prev) else None, dst,
                          cleanup=job.resume or in_place)
        if in_place:
            items = [(s, d, d, st) for s, _p, d, st in items]
        depth = 1
        while items and len(items) < 4 * (workers or linktree_workers.ADAPT_LIMIT) and depth < _FAN_OUT_DEPTH:
            deeper = []
            for item in items:
                deeper.extend(_process(job, stats, item, dir_attrs))
            items, depth = deeper, depth + 1
        # Newest subtrees first: new content lands in the newest time bucket, so the subtree that copies
        # data starts at once and overlaps the others' links instead of running alone at the end.
        items.sort(key=lambda item: item[3].st_mtime_ns, reverse=True)
        if workers == 1 or len(items) < 2:
            for item in items:
                _walk_into(job, (stats, dir_attrs), item)
            stats.workers = 1
        else:
            parts, stats.workers = linktree_workers.walk(
                items, workers, lambda: (Stats(job.resume, track), []),
                lambda state, item: _walk_into(job, state, item), lambda state: _finish_worker(job, state))
            for part in parts:
                stats.merge(part)
        _apply_dir_attrs(dir_attrs, job.as_root)
        os.utime(dst, ns=(root_st.st_atime_ns, root_st.st_mtime_ns))
    except OSError as exc:
        name = os.fsdecode(exc.filename) if exc.filename else source
        raise LinkTreeError("%s: %s" % (name, exc.strerror or exc))
    except linktree_workers.WorkerError as exc:
        raise LinkTreeError("%s: %s" % (source, exc))
    if stats.changed_dirs is not None:
        stats.changed_dirs = sorted(set(path[len(dst):].lstrip(b"/") for path in stats.changed_dirs))
    return stats
