"""The unchanged-directory rule of :mod:`linktree` (hardlink and in-place modes) against rsync's tree.

Directories older than the trust point are hard-linked by name (hardlink mode) or left alone (in place);
everything Alfresco does to a contentstore (new files in new and in old buckets, deleted files, removed
buckets) and what admins do (chmod a directory, add a symlink) still gives rsync's tree. A rewrite of a
file in place, which Alfresco never does, is seen only by a full compare: that is why the nightly run
compares every file every CONTENTSTORE_FULL_COMPARE_DAYS days."""

import os
import shutil
import subprocess
import time

import linktree
import pytest
from test_linktree import build_source, describe, linked_to, rsync, write

T = 1_700_000_000


def first_copy(src, prev):
    """The previous snapshot, by rsync as the first night makes it. rsync 3.x leaves a directory's mtime
    alone when it is within the second it copies in, so the source is given that second first."""
    time.sleep(1.1)
    os.mkdir(prev)
    rsync(src, prev)


def settle():
    """The trust point: now, after a pause longer than the kernel's timestamp tick, so that every change
    made after it carries a later ctime (production adds a margin of a minute for the same reason)."""
    time.sleep(0.05)
    point = time.time_ns()
    time.sleep(0.05)
    return point


def alfresco_night(root):
    """What a day of Alfresco (and a careful admin) does to the store."""
    root = os.fsencode(root)
    write(os.path.join(root, b"2025/1/2/3/5/new-bucket.bin"), os.urandom(3000), mtime=T)  # new buckets
    write(os.path.join(root, b"2024/3/2/10/1/late-in-old-bucket.bin"), b"late", mtime=T)  # old bucket
    os.remove(os.path.join(root, b"2024/3/3/10/2/00000000000000000000000000000002.bin"))  # orphan cleaned
    bucket = os.path.join(root, b"2024/3/4/10/3")  # a bucket emptied and removed by the cleaner
    for name in os.listdir(bucket):
        os.remove(os.path.join(bucket, name))
    os.rmdir(bucket)
    os.chmod(os.path.join(root, b"modes"), 0o700)  # directory mode: ctime only
    os.symlink(b"../modes", os.path.join(root, b"odd", b"new-link"))
    os.remove(os.path.join(root, b"becomes-dir"))
    write(os.path.join(root, b"becomes-dir/inside.bin"), b"now a dir", mtime=T)


def old_leaf_buckets(root):
    """Minute buckets the night did not touch."""
    return [b"2024/3/%d/10/%d" % (i % 5 + 1, i) for i in range(30) if i not in (1, 2, 3)]


@pytest.mark.parametrize("workers", [1, 3])
def test_unchanged_directories_are_linked_by_name_and_the_tree_is_rsyncs(tmp_path, workers):
    src, prev = str(tmp_path / "src"), str(tmp_path / "prev")
    build_source(src)
    first_copy(src, prev)
    trust = settle()
    alfresco_night(src)
    by_rsync, by_us = str(tmp_path / "rsync"), str(tmp_path / "ours")
    os.mkdir(by_rsync)
    os.mkdir(by_us)
    rsync(src, by_rsync, link_dest=prev)
    stats = linktree.snapshot(src, by_us, prev, workers=workers, trust_before_ns=trust)
    assert describe(by_us) == describe(src)
    assert describe(by_us, dir_times=False) == describe(by_rsync, dir_times=False)
    assert linked_to(prev, by_us) == linked_to(prev, by_rsync)
    # The rule was used: every untouched bucket (and more) skipped the per-file compare.
    assert stats.dirs_trusted >= len(old_leaf_buckets(src))
    assert stats.copied == 3 and (stats.files, stats.bytes_total) == counts(src)
    assert stats.bytes_linked == counts(src)[1] - stats.bytes_copied - symlink_bytes(src)


def test_a_rewrite_in_place_is_seen_only_by_a_full_compare(tmp_path):
    src, prev = str(tmp_path / "src"), str(tmp_path / "prev")
    build_source(src)
    first_copy(src, prev)
    trust = settle()
    rewritten = "2024/3/1/10/0/00000000000000000000000000000000.bin"
    write(os.path.join(src, rewritten), b"rewritten in place", mtime=T)  # the directory does not change
    trusting, full = str(tmp_path / "trusting"), str(tmp_path / "full")
    os.mkdir(trusting)
    os.mkdir(full)
    linktree.snapshot(src, trusting, prev, trust_before_ns=trust)
    linktree.snapshot(src, full, prev)
    assert os.stat(os.path.join(trusting, rewritten)).st_ino == os.stat(os.path.join(prev, rewritten)).st_ino
    assert describe(full) == describe(src)


def test_a_directory_changed_in_the_same_tick_is_compared(tmp_path):
    """An entry added in the same timestamp tick as the directory's last change leaves its mtime as the
    previous snapshot recorded it: the ctime (newer than the trust point) still makes it compared."""
    src, prev = str(tmp_path / "src"), str(tmp_path / "prev")
    build_source(src)
    first_copy(src, prev)
    trust = settle()
    bucket = os.path.join(src, "2024/3/5/10/4")
    recorded = os.lstat(os.path.join(prev, "2024/3/5/10/4")).st_mtime_ns
    write(os.path.join(bucket, "same-tick.bin"), b"added", mtime=T)
    os.utime(bucket, ns=(recorded, recorded))
    assert os.lstat(bucket).st_mtime_ns == recorded
    dest = str(tmp_path / "dest")
    os.mkdir(dest)
    linktree.snapshot(src, dest, prev, trust_before_ns=trust)
    assert describe(dest) == describe(src)


def test_resume_with_trusted_directories_removes_strays_and_fills_gaps(tmp_path):
    src, prev, dest = str(tmp_path / "src"), str(tmp_path / "prev"), str(tmp_path / "dest")
    build_source(src)
    first_copy(src, prev)
    trust = settle()
    alfresco_night(src)
    os.mkdir(dest)
    linktree.snapshot(src, dest, prev, trust_before_ns=trust)
    # What an interrupted run leaves: some buckets missing or half done, a file the source no longer has.
    shutil.rmtree(os.path.join(dest, "2024/3/2"))
    os.remove(os.path.join(dest, "2024/3/5/10/9/00000000000000000000000000000009.bin"))
    write(os.path.join(dest, "2024/3/5/10/4/stray.bin"), b"stray", mtime=T)
    linktree.snapshot(src, dest, prev, resume=True, trust_before_ns=trust)
    assert describe(dest) == describe(src)


def rsync_in_place(src, dst):
    subprocess.run(["rsync", "-a", "--delete", src + "/", dst + "/"], check=True)


def symlink_bytes(root):
    return sum(len(d[1]) for d in describe(root).values() if d[0] == "link")


def counts(root):
    """(regular files, bytes as rsync's "total file size": files and symlink targets)."""
    files = [d for d in describe(root).values() if d[0] == "file"]
    return len(files), sum(d[3] for d in files) + symlink_bytes(root)


@pytest.mark.parametrize("night", ["alfresco", "everything rsync sees"])
def test_in_place_update_gives_rsyncs_tree(tmp_path, night):
    from test_linktree import change_source

    src, work, by_rsync = str(tmp_path / "src"), str(tmp_path / "work"), str(tmp_path / "rsync")
    build_source(src)
    time.sleep(1.1)  # see first_copy
    for path in (work, by_rsync):
        os.mkdir(path)
        rsync_in_place(src, path)
    before = counts(work)
    trust = settle()
    if night == "alfresco":
        alfresco_night(src)
    else:
        change_source(src)  # includes rewrites in place: compare every file
        trust = None
    rsync_in_place(src, by_rsync)
    stats = linktree.snapshot(src, work, workers=2, trust_before_ns=trust, in_place=True)
    assert describe(work) == describe(src)
    assert describe(work, dir_times=False) == describe(by_rsync, dir_times=False)
    after = counts(src)
    assert (before[0] + stats.delta_files, before[1] + stats.delta_bytes) == after
    if trust is not None:
        assert stats.dirs_trusted >= len(old_leaf_buckets(src))
    else:
        assert stats.dirs_trusted == 0 and (stats.files, stats.bytes_total) == after
