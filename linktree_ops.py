"""What :mod:`linktree` does to the entries of one directory: compare them with the previous snapshot and
link, copy, recreate or remove them (``compare_dir``), or link all of an unchanged directory by name
(``linked_dir``). ``job`` is linktree's run settings (``as_root``, ``resume``, ``in_place``); ``stats`` a
:class:`linktree.Stats` of the calling worker. Paths are bytes; raise OSError.
"""

import errno
import os
import shutil
import stat

import tree_delete

# Too many links to one inode, or the previous snapshot is on another file system or btrfs subvolume:
# copy instead.
_CANNOT_LINK = (errno.EMLINK, errno.EXDEV)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def copy_file(src, dst, st, as_root):
    # copyfile uses copy_file_range/sendfile on Linux; the result is written under its final name inside a
    # .partial tree (or the working copy), so a crash leaves at worst a short file whose mtime differs and
    # is copied again.
    shutil.copyfile(src, dst, follow_symlinks=False)
    if as_root:
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def same(st, other, as_root):
    return (stat.S_ISREG(other.st_mode) and other.st_size == st.st_size and other.st_mtime_ns == st.st_mtime_ns
            and stat.S_IMODE(other.st_mode) == stat.S_IMODE(st.st_mode)
            and (not as_root or (other.st_uid, other.st_gid) == (st.st_uid, st.st_gid)))


def _leaving(stats, st):
    """Count an entry that leaves the in-place copy (sizes as rsync's "total file size": files and
    symlinks)."""
    if stat.S_ISREG(st.st_mode):
        stats.add(delta_files=-1, delta_bytes=-st.st_size)
    elif stat.S_ISLNK(st.st_mode):
        stats.add(delta_bytes=-st.st_size)


def discard(job, stats, path, st):
    """Remove ``path`` (lstat ``st``), counting what leaves the in-place copy."""
    if stat.S_ISDIR(st.st_mode):
        if job.in_place:
            for dirpath, _dirs, names in os.walk(path):
                for name in names:
                    _leaving(stats, os.lstat(os.path.join(dirpath, name)))
        tree_delete.remove_tree_python(os.fsdecode(path))
        return
    if job.in_place:
        _leaving(stats, st)
    os.unlink(path)


def make_symlink(job, stats, s_path, d_path, st, cleanup):
    target = os.readlink(s_path)
    stats.add(symlinks=1, bytes_total=len(target), symlink_bytes=len(target))
    if cleanup and os.path.lexists(d_path):
        if os.path.islink(d_path) and os.readlink(d_path) == target:
            return
        discard(job, stats, d_path, os.lstat(d_path))
    os.symlink(target, d_path)
    if job.as_root:
        os.chown(d_path, st.st_uid, st.st_gid, follow_symlinks=False)
    stats.add(delta_bytes=len(target))


def sync_file(job, stats, s_path, p_path, d_path, st):
    """Make ``d_path`` the source file ``s_path`` (lstat ``st``): kept, linked from ``p_path`` or copied."""
    size = st.st_size
    existing = None
    if job.resume or job.in_place:
        try:
            existing = os.lstat(d_path)
        except FileNotFoundError:
            pass
        if existing is not None and same(st, existing, job.as_root):
            if job.in_place:  # unchanged since the previous state
                stats.add(files=1, linked=1, bytes_total=size, bytes_linked=size)
            else:  # already copied by the interrupted run
                stats.add(files=1, copied=1, bytes_total=size)
            return
    if p_path is not None and not job.in_place:
        try:
            pst = os.lstat(p_path)
        except FileNotFoundError:
            pst = None
        if pst is not None and same(st, pst, job.as_root):
            try:
                try:
                    os.link(p_path, d_path)
                except FileExistsError:
                    os.unlink(d_path)
                    os.link(p_path, d_path)
                stats.add(files=1, linked=1, bytes_total=size, bytes_linked=size)
                return
            except OSError as exc:
                if exc.errno not in _CANNOT_LINK:
                    raise
    if existing is None and not job.in_place:
        existing = os.lstat(d_path) if os.path.lexists(d_path) else None
    if existing is not None:
        discard(job, stats, d_path, existing)
    try:
        copy_file(s_path, d_path, st, job.as_root)
    except FileNotFoundError:
        if not os.path.lexists(s_path):
            stats.add(vanished=1)
            stats.warn("vanished during the copy: %r" % s_path)
            return
        raise
    stats.add(files=1, copied=1, bytes_total=size, bytes_copied=size, delta_files=1, delta_bytes=size)


def ensure_dir(job, stats, d_path, existing=None):
    """Make ``d_path`` a directory (kept when it is one); ``existing``: its lstat, if known."""
    if existing is None:
        try:
            existing = os.lstat(d_path)
        except FileNotFoundError:
            pass
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        return
    if existing is not None:
        discard(job, stats, d_path, existing)
    os.mkdir(d_path, 0o700)


def compare_dir(job, stats, s, p, d, cleanup):
    """Compare every entry of source directory ``s`` with ``p`` (the previous snapshot's copy, or None)
    and fill ``d``. ``cleanup``: ``d`` may hold entries the source lacks (resumed, in place, or half done
    by the unchanged-directory path). Returns the subdirectories [(s, p, d, lstat)] to descend into."""
    stats.changed(d)
    try:
        entries = list(os.scandir(s))
    except FileNotFoundError:
        stats.add(vanished=1)
        return []
    stats.add(dirs_compared=1)
    wanted = set()
    subdirs = []
    for entry in entries:
        name = entry.name
        wanted.add(name)
        s_path, d_path = entry.path, os.path.join(d, name)
        p_path = os.path.join(p, name) if p is not None else None
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            stats.add(vanished=1)
            continue
        if stat.S_ISDIR(st.st_mode):
            if cleanup:
                ensure_dir(job, stats, d_path)
            else:
                os.mkdir(d_path, 0o700)
            stats.add(dirs=1)
            subdirs.append((s_path, p_path, d_path, st))
        elif stat.S_ISREG(st.st_mode):
            sync_file(job, stats, s_path, p_path, d_path, st)
        elif stat.S_ISLNK(st.st_mode):
            make_symlink(job, stats, s_path, d_path, st, cleanup)
        else:
            stats.add(skipped_special=1)
            stats.warn("not a file, directory or symlink, skipped: %r" % s_path)
    if cleanup:
        for name in os.listdir(d):
            if name not in wanted:
                path = os.path.join(d, name)
                discard(job, stats, path, os.lstat(path))
    return subdirs


def linked_dir(job, stats, s, p, d):
    """An unchanged directory, hardlink mode: link ``p``'s files and symlinks into ``d`` by name. Returns
    the subdirectories, or None when ``p`` does not look like the source after all (then the caller
    compares every entry). The per-file path is one link(2) and one stat(2) of the (then cached) inode."""
    pfd = os.open(p, _DIR_FLAGS)
    try:
        names, subdirs = [], []
        # Listed through the descriptor (names come back as str, re-encoded losslessly where a path is
        # needed): one open of ``p`` serves the listing and the links.
        with os.scandir(pfd) as listing:
            for entry in listing:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(os.fsencode(entry.name))
                elif entry.is_file(follow_symlinks=False) or entry.is_symlink():
                    names.append(entry.name)
                else:
                    return None
        children = _child_dirs(stats, s, p, d, subdirs)
        if children is None:
            return None
        if not _link_all(job, stats, pfd, s, d, names, subdirs) or len(children) < len(subdirs):
            stats.changed(d)  # a file copied or gone, or a subdirectory gone: not the previous one's copy
    finally:
        os.close(pfd)
    for child in children:
        if job.resume:
            ensure_dir(job, stats, child[2])
        else:
            os.mkdir(child[2], 0o700)
    stats.add(dirs=len(children), dirs_trusted=1)
    return children


def _child_dirs(stats, s, p, d, subdirs):
    """[(s, p, d, lstat of s)] of the subdirectories ``subdirs`` (bytes names) of an unchanged directory,
    or None when one is no longer a directory in the source."""
    s_slash, p_slash, d_slash = s + b"/", p + b"/", d + b"/"
    children = []
    for name in subdirs:
        try:
            cst = os.lstat(s_slash + name)
        except FileNotFoundError:
            stats.add(vanished=1)
            continue
        if not stat.S_ISDIR(cst.st_mode):
            return None
        children.append((s_slash + name, p_slash + name, d_slash + name, cst))
    return children


def _link_all(job, stats, pfd, s, d, names, subdirs):
    """Hard-link the entries ``names`` (str) of the directory open as ``pfd`` into ``d`` (one link(2) and
    one stat(2) of the then cached inode each); ``subdirs``: its subdirectories (bytes), kept on resume.
    Returns False when an entry could not simply be linked (see :func:`_link_slowly`)."""
    s_slash, d_slash = s + b"/", d + b"/"
    link, stat_at, is_reg = os.link, os.stat, stat.S_ISREG
    files = size = symlinks = symlink_bytes = 0
    exact = True
    dfd = os.open(d, _DIR_FLAGS)
    try:
        for name in names:
            try:
                link(name, name, src_dir_fd=pfd, dst_dir_fd=dfd, follow_symlinks=False)
            except OSError as exc:
                exact = False
                _link_slowly(job, stats, exc, name, pfd, dfd, s_slash + os.fsencode(name),
                             d_slash + os.fsencode(name))
                continue
            st = stat_at(name, dir_fd=dfd, follow_symlinks=False)
            if is_reg(st.st_mode):
                files += 1
                size += st.st_size
            else:
                symlinks += 1
                symlink_bytes += st.st_size
        if job.resume:  # a resumed partial may hold entries the previous snapshot lacks
            keep = set(os.fsencode(n) for n in names) | set(subdirs)
            for name in os.listdir(d):
                if name not in keep:
                    discard(job, stats, d_slash + name, os.lstat(d_slash + name))
    finally:
        os.close(dfd)
    stats.add(files=files, linked=files, bytes_total=size + symlink_bytes, bytes_linked=size, symlinks=symlinks,
              symlink_bytes=symlink_bytes)
    return exact


def _link_slowly(job, stats, exc, name, pfd, dfd, s_path, d_path):
    """After link(2) failed with ``exc``: replace what a resumed run left, or copy when no link is possible."""
    if isinstance(exc, FileExistsError):  # left by the interrupted run this one resumes
        os.unlink(name, dir_fd=dfd)
        try:
            os.link(name, name, src_dir_fd=pfd, dst_dir_fd=dfd, follow_symlinks=False)
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                stats.add(files=1, linked=1, bytes_total=st.st_size, bytes_linked=st.st_size)
            else:
                stats.add(symlinks=1, bytes_total=st.st_size, symlink_bytes=st.st_size)
            return
        except OSError as again:
            exc = again
    if exc.errno not in _CANNOT_LINK:
        raise exc
    try:
        st = os.lstat(s_path)
    except FileNotFoundError:
        stats.add(vanished=1)
        return
    if stat.S_ISLNK(st.st_mode):
        make_symlink(job, stats, s_path, d_path, st, True)
    else:
        sync_file(job, stats, s_path, None, d_path, st)
