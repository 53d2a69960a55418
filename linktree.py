"""A hardlinked snapshot of a tree, built in-process: the nightly fast path of the contentstore snapshot.

For every entry of the source tree: a regular file whose size and mtime equal those of the same path in the
previous snapshot is hard-linked from it (same inode, no data copied); any other file is copied (data,
mode, mtime; owner too when running as root); symlinks are recreated; directories are created and get the
source's mode and mtime. This is rsync's quick check (size + mtime) and ``--link-dest`` behaviour, without
rsync's per-file protocol round-trips. Paths are handled as bytes, so any file name works (spaces,
newlines, leading dashes, non-UTF-8).

Top-level subtrees (the contentstore's year buckets, or their months when there is only one year) are
processed by ``workers`` threads: link(2), stat(2) and copy syscalls release the GIL, and several requests
in flight help a cold disk.
"""

import errno
import os
import shutil
import stat
import threading
from concurrent.futures import ThreadPoolExecutor


class LinkTreeError(Exception):
    """The snapshot could not be built; the message names the path."""


class Stats:
    """Counters, safe to update from several threads."""

    FIELDS = ("files", "dirs", "symlinks", "linked", "copied", "bytes_total", "bytes_copied", "bytes_linked",
              "vanished", "skipped_special")

    def __init__(self, resume=False):
        self.resume = resume
        self._lock = threading.Lock()
        for name in self.FIELDS:
            setattr(self, name, 0)
        self.warnings = []

    def add(self, **counts):
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def warn(self, text):
        with self._lock:
            if len(self.warnings) < 20:
                self.warnings.append(text)

    def as_dict(self):
        return {name: getattr(self, name) for name in self.FIELDS}


def _copy_file(src, dst, st, as_root):
    # copyfile uses copy_file_range/sendfile on Linux; the result is written under its final name inside a
    # .partial tree, so a crash leaves at worst a short file whose mtime differs and is copied again.
    shutil.copyfile(src, dst, follow_symlinks=False)
    if as_root:
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _same(st, other, as_root):
    return (stat.S_ISREG(other.st_mode) and other.st_size == st.st_size and other.st_mtime_ns == st.st_mtime_ns
            and stat.S_IMODE(other.st_mode) == stat.S_IMODE(st.st_mode)
            and (not as_root or (other.st_uid, other.st_gid) == (st.st_uid, st.st_gid)))


def _link_or_copy(src, prev, dst, st, stats, as_root):
    if stats.resume:
        try:
            if _same(st, os.lstat(dst), as_root):  # already copied by the interrupted run
                stats.add(files=1, copied=1, bytes_total=st.st_size)
                return
        except FileNotFoundError:
            pass
    if prev is not None:
        try:
            pst = os.lstat(prev)
        except FileNotFoundError:
            pst = None
        if pst is not None and _same(st, pst, as_root):
            try:
                os.link(prev, dst)
                stats.add(files=1, linked=1, bytes_total=st.st_size, bytes_linked=st.st_size)
                return
            except FileExistsError:
                os.unlink(dst)
                os.link(prev, dst)
                stats.add(files=1, linked=1, bytes_total=st.st_size, bytes_linked=st.st_size)
                return
            except OSError as exc:
                if exc.errno != errno.EMLINK:  # too many links to one inode: copy instead
                    raise
    if os.path.lexists(dst):
        os.unlink(dst)
    try:
        _copy_file(src, dst, st, as_root)
    except FileNotFoundError:
        if not os.path.lexists(src):
            stats.add(vanished=1)
            stats.warn("vanished during the copy: %r" % src)
            return
        raise
    stats.add(files=1, copied=1, bytes_total=st.st_size, bytes_copied=st.st_size)


def _sync_dir(src, prev, dst, stats, as_root, dir_attrs):
    """Fill ``dst`` from ``src`` (linking from ``prev``); returns the subdirectories to descend into."""
    try:
        entries = list(os.scandir(src))
    except FileNotFoundError:
        stats.add(vanished=1)
        return []
    wanted = set()
    subdirs = []
    for entry in entries:
        name = entry.name
        wanted.add(name)
        s_path, d_path = entry.path, os.path.join(dst, name)
        p_path = os.path.join(prev, name) if prev is not None else None
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            stats.add(vanished=1)
            continue
        if stat.S_ISDIR(st.st_mode):
            if os.path.lexists(d_path) and not os.path.isdir(d_path):
                os.unlink(d_path)
            if not os.path.isdir(d_path):
                os.mkdir(d_path, 0o700)
            stats.add(dirs=1)
            dir_attrs.append((d_path, st))
            subdirs.append((s_path, p_path, d_path))
        elif stat.S_ISREG(st.st_mode):
            _link_or_copy(s_path, p_path, d_path, st, stats, as_root)
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(s_path)
            if os.path.lexists(d_path):
                if os.path.islink(d_path) and os.readlink(d_path) == target:
                    stats.add(symlinks=1)
                    continue
                _remove(d_path)
            os.symlink(target, d_path)
            if as_root:
                os.chown(d_path, st.st_uid, st.st_gid, follow_symlinks=False)
            stats.add(symlinks=1)
        else:
            stats.add(skipped_special=1)
            stats.warn("not a file, directory or symlink, skipped: %r" % s_path)
    if stats.resume:  # a resumed partial may hold entries the source no longer has
        for name in os.listdir(dst):
            if name not in wanted:
                _remove(os.path.join(dst, name))
    return subdirs


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _walk(src, prev, dst, stats, as_root, dir_attrs):
    stack = [(src, prev, dst)]
    while stack:
        s, p, d = stack.pop()
        if p is not None and not os.path.isdir(p):
            p = None
        stack.extend(_sync_dir(s, p, d, stats, as_root, dir_attrs))


def _apply_dir_attrs(dir_attrs, as_root):
    # Deepest first: setting a parent's mtime before filling its children would be undone by them.
    for path, st in sorted(dir_attrs, key=lambda item: item[0].count(b"/"), reverse=True):
        if as_root:
            os.chown(path, st.st_uid, st.st_gid)
        os.chmod(path, stat.S_IMODE(st.st_mode))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _fan_out(src, prev, dst, stats, as_root, dir_attrs):
    """Top-level work items: the subdirectories two levels down when the top has few (one year)."""
    items = _sync_dir(src, prev, dst, stats, as_root, dir_attrs)
    if len(items) < 4:
        deeper = []
        for s, p, d in items:
            deeper.extend(_sync_dir(s, p if p is not None and os.path.isdir(p) else None, d, stats, as_root,
                                    dir_attrs))
        items = deeper
    return items


def snapshot(source, dest, previous=None, workers=4, resume=False):
    """Make ``dest`` (an existing directory) a copy of ``source`` in which files unchanged since
    ``previous`` are hard links into it. ``resume``: ``dest`` holds a partial copy from an interrupted run;
    files already there and identical are kept. Returns :class:`Stats`. Raises LinkTreeError."""
    src, dst = os.fsencode(source), os.fsencode(dest)
    prev = os.fsencode(previous) if previous else None
    as_root = os.geteuid() == 0
    stats = Stats(resume)
    dir_attrs = []
    try:
        root_st = os.stat(src)
        items = _fan_out(src, prev, dst, stats, as_root, dir_attrs)
        per_worker = [[] for _ in range(max(1, workers))]
        for index, item in enumerate(items):
            per_worker[index % len(per_worker)].append(item)
        worker_attrs = [[] for _ in per_worker]
        with ThreadPoolExecutor(max_workers=len(per_worker)) as pool:
            futures = [pool.submit(_walk_many, chunk, stats, as_root, attrs)
                       for chunk, attrs in zip(per_worker, worker_attrs)]
            for future in futures:
                future.result()
        for attrs in worker_attrs:
            dir_attrs.extend(attrs)
        _apply_dir_attrs(dir_attrs, as_root)
        os.utime(dst, ns=(root_st.st_atime_ns, root_st.st_mtime_ns))
    except OSError as exc:
        name = os.fsdecode(exc.filename) if exc.filename else source
        raise LinkTreeError("%s: %s" % (name, exc.strerror or exc))
    return stats


def _walk_many(chunk, stats, as_root, dir_attrs):
    for s, p, d in chunk:
        _walk(s, p, d, stats, as_root, dir_attrs)
