"""The first contentstore copy with one rsync per month bucket (first_copy.py), real rsync: the same tree
as one rsync, a resumed partial cleaned at every level, a failed bucket not stopping the others, a bucket
vanishing mid-copy."""

import logging
import os
import shutil

import catalog
import contentstore
import pytest
from test_contentstore import N1, N2, REAL_RSYNC, fs, make_store, tree, write

LOG = logging.getLogger("test-first-copy")
pytestmark = pytest.mark.skipif(REAL_RSYNC is None, reason="rsync not installed")


@pytest.fixture
def env(tmp_path):
    source = make_store(tmp_path / "store")
    for month in (2, 3, 4):
        write(source, b"2023/%d/1/0/0/m%d.bin" % (month, month), b"m" * (100 * month))
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir(mode=0o700)
    return {"source": os.fsdecode(source), "backup_dir": str(backup_dir), "tmp": tmp_path,
            "snapshots": os.path.join(str(backup_dir), "contentstore")}


def wrapper(env, monkeypatch, body):
    """An ``rsync`` first on PATH that logs each call (``bucket`` or ``top`` for the last pass), runs
    ``body`` (sh), then the real rsync."""
    bindir = env["tmp"] / "bin"
    bindir.mkdir()
    log = env["tmp"] / "rsync-calls.log"
    script = bindir / "rsync"
    script.write_text("#!/bin/sh\ncase \"$*\" in *--exclude=/?/?/?*) echo top;; *) echo bucket;; esac >> '%s'\n"
                      "%s\nexec '%s' \"$@\"\n" % (log, body, REAL_RSYNC))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (bindir, os.environ.get("PATH", "/usr/bin:/bin")))
    return log


def snap(env, name, workers=4):
    return contentstore.take_snapshot(env["source"], env["backup_dir"], name, LOG, workers=workers)


def test_one_rsync_per_bucket_gives_the_same_tree_as_one_rsync(env, monkeypatch):
    calls = wrapper(env, monkeypatch, "")
    info = snap(env, N1)
    final = os.path.join(env["snapshots"], N1)
    assert tree(final) == tree(env["source"])
    assert info["engine"] == "rsync" and info["link_dest"] is None and info["compare"] == "full"
    regular = sum(1 for v in tree(env["source"]).values() if v[0] == "file")
    assert info["files"] == regular and info["files_copied"] == regular
    buckets = [b"2023/2", b"2023/3", b"2023/4", b"2024/1", b"2024/2", b"empty/dir", b"odd/-e dir\nx"]
    assert sorted(calls.read_text().split()) == ["bucket"] * len(buckets) + ["top"]


def test_one_worker_is_one_rsync(env, monkeypatch):
    calls = wrapper(env, monkeypatch, "")
    snap(env, N1, workers=1)
    assert len(calls.read_text().splitlines()) == 1
    assert tree(os.path.join(env["snapshots"], N1)) == tree(env["source"])


def test_a_resumed_partial_is_cleaned_at_every_level(env):
    partial = os.path.join(env["snapshots"], N1 + ".partial")
    os.makedirs(partial)
    write(partial, b"stale-top.bin", b"x")  # level 1, not in the source
    write(partial, b"2024/9/1/0/0/stale-bucket.bin", b"x")  # a whole bucket the source lacks
    write(partial, b"2024/1/31/2/0/stale-deep.bin", b"x")  # inside a bucket
    write(partial, b"empty", b"a file where the source has a directory")
    write(partial, b"odd/with space.bin/inside", b"a directory where the source has a file")
    info = snap(env, N2)
    assert info["resumed_partial"] is True
    assert tree(os.path.join(env["snapshots"], N2)) == tree(env["source"])


def test_a_failed_bucket_does_not_stop_the_others_and_keeps_the_partial(env, monkeypatch):
    wrapper(env, monkeypatch, 'case "$*" in *2023/3/*) exit 23;; esac')
    with pytest.raises(contentstore.ContentstoreError, match="exit code 23"):
        snap(env, N1)
    partial = os.path.join(env["snapshots"], N1 + ".partial")
    copied = tree(partial)
    assert b"2023/4/1/0/0/m4.bin" in copied and b"2024/1/31/2/0/aaaa.bin" in copied
    assert b"2023/3/1/0/0/m3.bin" not in copied
    monkeypatch.undo()
    info = snap(env, N2)
    assert info["resumed_partial"] is True and info["files_copied"] == 1
    assert tree(os.path.join(env["snapshots"], N2)) == tree(env["source"])


def test_a_bucket_vanishing_during_the_copy_is_not_a_failure(env, monkeypatch):
    doomed = os.path.join(env["source"], "2023", "2")
    wrapper(env, monkeypatch, 'case "$*" in *2023/2/*) rm -rf \'%s\';; esac' % doomed)
    info = snap(env, N1)
    assert info["status"] == catalog.DONE
    assert not os.path.exists(doomed)
    assert tree(os.path.join(env["snapshots"], N1)) == tree(env["source"])


def test_no_buckets_means_one_rsync(tmp_path, monkeypatch):
    source = tmp_path / "flat"
    source.mkdir()
    write(fs(source), b"a.bin", b"a")
    backup_dir = tmp_path / "b"
    backup_dir.mkdir()
    info = contentstore.take_snapshot(str(source), str(backup_dir), N1, LOG, workers=4)
    assert info["files"] == 1
    assert tree(os.path.join(str(backup_dir), "contentstore", N1)) == tree(source)
    shutil.rmtree(str(backup_dir))
