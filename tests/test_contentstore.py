"""Tests for contentstore.py: the rsync command line, its --stats parser, and real snapshots taken with the
real rsync of small trees in a temporary directory (link-dest sharing, odd names, symlinks, modes,
resumed partials)."""

import json
import logging
import os
import shutil
import stat
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import catalog  # noqa: E402
import contentstore  # noqa: E402
from contentstore import ContentstoreError  # noqa: E402

LOG = logging.getLogger("test-contentstore")
N1, N2, N3 = ("contentstore-2024-01-0%d_02-00-00" % d for d in (1, 2, 3))
REAL_RSYNC = shutil.which("rsync")

pytestmark = pytest.mark.skipif(REAL_RSYNC is None, reason="rsync not installed")

# Names that break naive tools: spaces, a newline, leading dashes, shell and rsync syntax, non-UTF-8 bytes.
ODD_NAMES = [b"with space.bin", b"new\nline.bin", b"-rf --delete.bin", b"--link-dest=x", b"$(touch pwned).bin",
             b"host:path.bin", b"quote'\"`.bin", b"latin1-caf\xe9.bin", b"bad-\xff\xfe.bin", b"*?[a].bin"]


# --- pure parts ------------------------------------------------------------------------------------------

def test_rsync_argv_without_link_dest():
    assert contentstore.rsync_argv("/alf/contentstore", "/b/contentstore/X.partial") == [
        "rsync", "-a", "--delete", "--numeric-ids", "--stats", "--no-human-readable",
        "/alf/contentstore/", "/b/contentstore/X.partial/"]


def test_rsync_argv_with_link_dest_and_trailing_slashes():
    argv = contentstore.rsync_argv("/alf/my store//", "/b/X.partial/", "/b/contentstore/prev dir")
    assert argv[-3:] == ["--link-dest=/b/contentstore/prev dir", "/alf/my store/", "/b/X.partial/"]
    assert "-a" in argv and "--delete" in argv


STATS_3_2 = """
Number of files: 60,123 (reg: 59,000, dir: 1,123)
Number of created files: 10 (reg: 10)
Number of deleted files: 2 (reg: 2)
Number of regular files transferred: 10
Total file size: 3,123,456,789 bytes
Total transferred file size: 4,567,890 bytes
Literal data: 4,567,890 bytes
"""

STATS_PLAIN = """Number of files: 5 (reg: 2, dir: 2, link: 1)
Number of regular files transferred: 2
Total file size: 5007 bytes
Total transferred file size: 5006 bytes
"""


def test_parse_stats_with_thousands_separators():
    assert contentstore.parse_stats(STATS_3_2) == {
        "files": 60123, "regular_files": 59000, "files_copied": 10, "bytes_total": 3123456789,
        "bytes_copied": 4567890}


def test_parse_stats_plain_numbers_and_missing_keys():
    assert contentstore.parse_stats(STATS_PLAIN) == {
        "files": 5, "regular_files": 2, "files_copied": 2, "bytes_total": 5007, "bytes_copied": 5006}
    assert contentstore.parse_stats("Number of files: 3\n") == {"files": 3}
    assert contentstore.parse_stats("") == {}


# --- helpers for real trees ------------------------------------------------------------------------------

def fs(path):
    return path if isinstance(path, bytes) else os.fsencode(str(path))


def write(root, rel, data, mode=0o640, mtime=1700000000):
    path = os.path.join(fs(root), rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)
    os.utime(path, (mtime, mtime))
    return path


def make_store(root):
    """An Alfresco-like contentstore with odd names, symlinks and varied modes; returns its path."""
    root = fs(root)
    os.makedirs(root)
    write(root, b"2024/1/31/2/0/aaaa.bin", b"a" * 1000)
    write(root, b"2024/1/31/2/0/bbbb.bin", b"b" * 2000, mode=0o604)
    write(root, b"2024/1/31/3/5/cccc.bin", b"c" * 3000, mode=0o600)
    write(root, b"2024/2/1/0/0/gone.bin", b"to be deleted")
    for index, name in enumerate(ODD_NAMES):
        write(root, b"odd/" + name, b"odd %d" % index)
    os.makedirs(os.path.join(root, b"odd", b"-e dir\nx"))
    write(root, b"odd/-e dir\nx/inner.bin", b"inner")
    os.makedirs(os.path.join(root, b"empty", b"dir"))
    os.chmod(os.path.join(root, b"2024"), 0o750)
    os.symlink(b"../2024/1/31/2/0/aaaa.bin", os.path.join(root, b"odd", b"relative-link"))
    os.symlink(b"/etc/hostname", os.path.join(root, b"odd", b"absolute-link"))
    os.symlink(b"does/not/exist", os.path.join(root, b"odd", b"dangling-link"))
    os.chown(os.path.join(root, b"2024/1/31/3/5/cccc.bin"), 65534, 65534)
    return root


def tree(root):
    """{relative bytes path: (type, mode, uid, gid, mtime, content or link target)}; the root excluded."""
    root = fs(root)
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                payload = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                payload = ("dir", None)
            else:
                with open(path, "rb") as handle:
                    payload = ("file", handle.read())
            result[rel] = (payload[0], stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                           None if payload[0] == "link" else int(st.st_mtime), payload[1])
    return result


def inode(root, rel):
    return os.lstat(os.path.join(fs(root), rel)).st_ino


@pytest.fixture
def env(tmp_path):
    source = make_store(tmp_path / "alf_data" / "contentstore")
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir(mode=0o700)
    return {"source": os.fsdecode(source), "backup_dir": str(backup_dir), "tmp": tmp_path,
            "snapshots": os.path.join(str(backup_dir), "contentstore")}


def snap(env, name, **kwargs):
    return contentstore.take_snapshot(env["source"], env["backup_dir"], name, LOG, **kwargs)


@pytest.fixture(params=["auto", "rsync"])
def method(request):
    """CONTENTSTORE_METHOD: 'auto' uses linktree once a previous snapshot exists, 'rsync' always rsync."""
    return request.param


def expected_engine(method, has_previous):
    return "linktree" if method == "auto" and has_previous else "rsync"


@pytest.mark.parametrize("configured,previous,engine", [
    ("auto", False, "rsync"), ("auto", True, "linktree"), ("rsync", False, "rsync"), ("rsync", True, "rsync")])
def test_choose_method(configured, previous, engine):
    assert contentstore.choose_method(configured, previous) == engine


# --- real snapshots --------------------------------------------------------------------------------------

def test_first_snapshot_is_an_exact_private_copy(env):
    info = snap(env, N1)
    final = os.path.join(env["snapshots"], N1)
    assert tree(final) == tree(env["source"])
    assert stat.S_IMODE(os.stat(final).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(env["snapshots"]).st_mode) == 0o700
    assert not os.path.exists(final + ".partial")
    assert not (env["tmp"] / "pwned").exists()
    assert info["status"] == catalog.DONE and info["kind"] == "contentstore" and info["name"] == N1
    assert info["link_dest"] is None and info["resumed_partial"] is False and info["warnings"] == []
    assert info["engine"] == "rsync"  # nothing to link to: always rsync
    regular = sum(1 for v in tree(env["source"]).values() if v[0] == "file")
    assert info["files"] == regular and info["files_copied"] == regular
    assert info["bytes_copied"] == info["size_bytes"] > 6000
    assert info["bytes_total"] >= info["bytes_copied"]
    assert catalog.read_info(final) == json.loads(json.dumps(info))
    assert [(e.name, e.status) for e in catalog.list_backups(env["backup_dir"], "contentstore")] == [
        (N1, catalog.DONE)]


def test_odd_names_symlinks_modes_and_owners_survive(env):
    snap(env, N1)
    final = fs(os.path.join(env["snapshots"], N1))
    copied = tree(final)
    for name in ODD_NAMES:
        entry = copied[b"odd/" + name]
        assert entry[0] == "file" and entry[5].startswith(b"odd ")
    assert copied[b"odd/relative-link"][::5] == ("link", b"../2024/1/31/2/0/aaaa.bin")
    assert copied[b"odd/absolute-link"][::5] == ("link", b"/etc/hostname")
    assert copied[b"odd/dangling-link"][::5] == ("link", b"does/not/exist")
    assert os.path.islink(os.path.join(final, b"odd", b"absolute-link"))
    assert copied[b"2024/1/31/2/0/bbbb.bin"][1] == 0o604
    assert copied[b"2024/1/31/3/5/cccc.bin"][1:4] == (0o600, 65534, 65534)
    assert copied[b"2024"][:2] == ("dir", 0o750)
    assert copied[b"empty/dir"][0] == "dir"
    assert copied[b"2024/1/31/2/0/aaaa.bin"][4] == 1700000000


def test_second_snapshot_links_unchanged_and_copies_changed(env, method):
    snap(env, N1, method=method)
    src = env["source"]
    write(src, b"2024/1/31/2/0/bbbb.bin", b"B" * 2500, mode=0o604, mtime=1700000500)  # changed
    os.unlink(os.path.join(fs(src), b"2024/2/1/0/0/gone.bin"))  # deleted
    write(src, b"2024/2/1/0/0/new file.bin", b"new" * 10)  # added
    info = snap(env, N2, method=method)
    first = os.path.join(env["snapshots"], N1)
    second = os.path.join(env["snapshots"], N2)
    assert tree(second) == tree(src)
    assert info["link_dest"] == N1 and info["engine"] == expected_engine(method, True)
    assert stat.S_IMODE(os.stat(second).st_mode) == 0o700
    assert info["files_copied"] == 2
    assert info["bytes_copied"] == 2500 + 30
    assert info["bytes_linked"] == info["bytes_total"] - info["bytes_copied"]
    for rel in (b"2024/1/31/2/0/aaaa.bin", b"2024/1/31/3/5/cccc.bin", b"odd/bad-\xff\xfe.bin",
                b"odd/new\nline.bin", b"odd/-e dir\nx/inner.bin"):
        assert inode(first, rel) == inode(second, rel), rel
    assert os.lstat(os.path.join(fs(second), b"2024/1/31/2/0/aaaa.bin")).st_nlink == 2
    assert inode(first, b"2024/1/31/2/0/bbbb.bin") != inode(second, b"2024/1/31/2/0/bbbb.bin")
    # The earlier snapshot is untouched: old content, deleted file still there.
    with open(os.path.join(fs(first), b"2024/1/31/2/0/bbbb.bin"), "rb") as handle:
        assert handle.read() == b"b" * 2000
    assert os.path.exists(os.path.join(fs(first), b"2024/2/1/0/0/gone.bin"))
    assert not os.path.exists(os.path.join(fs(second), b"2024/2/1/0/0/gone.bin"))


def test_link_dest_is_the_newest_done_snapshot_only(env, method):
    snap(env, N1, method=method)
    # A newer but unfinished (no metadata) snapshot and a FAILED one must not become the base.
    os.mkdir(os.path.join(env["snapshots"], "contentstore-2024-01-01_12-00-00"))
    failed = os.path.join(env["snapshots"], "contentstore-2024-01-01_13-00-00")
    os.mkdir(failed)
    catalog.write_info(failed, {"status": catalog.FAILED})
    info = snap(env, N2, method=method)
    assert info["link_dest"] == N1
    assert inode(os.path.join(env["snapshots"], N1), b"2024/1/31/2/0/aaaa.bin") == \
        inode(os.path.join(env["snapshots"], N2), b"2024/1/31/2/0/aaaa.bin")


def test_leftover_partial_is_resumed_and_cleaned(env, method):
    snap(env, N1, method=method)
    write(env["source"], b"2024/2/2/0/0/big-new.bin", os.urandom(100000))
    # What an interrupted run leaves: a partial copy already holding the file that is new since N1.
    leftover = os.path.join(env["snapshots"], N2 + ".partial")
    os.mkdir(leftover, 0o700)
    contentstore.subprocess_utils.run(contentstore.rsync_argv(env["source"], leftover), os.environ.copy())
    write(leftover, b"stale-not-in-source.bin", b"stale")
    marker = inode(leftover, b"2024/2/2/0/0/big-new.bin")
    info = snap(env, N3, method=method)
    final = os.path.join(env["snapshots"], N3)
    assert info["resumed_partial"] is True and info["engine"] == expected_engine(method, True)
    assert not os.path.exists(leftover)
    assert not os.path.exists(final + ".partial")
    assert tree(final) == tree(env["source"])  # stale file removed by --delete
    assert inode(final, b"2024/2/2/0/0/big-new.bin") == marker  # reused, not copied again
    assert info["bytes_copied"] == 0
    assert info["link_dest"] == N1
    assert [(e.name, e.status) for e in catalog.list_backups(env["backup_dir"], "contentstore")] == [
        (N1, catalog.DONE), (N3, catalog.DONE)]


def test_partial_is_never_a_link_dest(env):
    os.makedirs(env["snapshots"])
    leftover = os.path.join(env["snapshots"], N1 + ".partial")
    os.mkdir(leftover)
    info = snap(env, N2)
    assert info["link_dest"] is None and info["resumed_partial"] is True
    assert tree(os.path.join(env["snapshots"], N2)) == tree(env["source"])


def test_source_through_a_symlink(env):
    link = str(env["tmp"] / "store-link")
    os.symlink(env["source"], link)
    info = contentstore.take_snapshot(link, env["backup_dir"], N1, LOG)
    assert tree(os.path.join(env["snapshots"], N1)) == tree(env["source"])
    assert info["source"] == link


def test_missing_source_is_an_error(env):
    with pytest.raises(ContentstoreError) as info:
        contentstore.take_snapshot(str(env["tmp"] / "nope"), env["backup_dir"], N1, LOG)
    assert "contentstore not found" in str(info.value)
    assert not os.path.exists(os.path.join(env["snapshots"], N1 + ".partial"))


def test_backup_dir_with_odd_characters(env, method):
    backup_dir = str(env["tmp"] / "my backups; $(touch pwned) 'x'")
    info = contentstore.take_snapshot(env["source"], backup_dir, N1, LOG, method=method)
    assert info["status"] == catalog.DONE
    info = contentstore.take_snapshot(env["source"], backup_dir, N2, LOG, method=method)
    assert info["link_dest"] == N1 and info["files_copied"] == 0 and info["bytes_copied"] == 0
    assert not (env["tmp"] / "pwned").exists()


# --- rsync exit codes (a wrapper runs the real rsync, then reports another exit code) --------------------

def rsync_wrapper(tmp_path, monkeypatch, code):
    """Put an ``rsync`` first on PATH that runs the real one and then exits ``code`` if it succeeded.

    A real "file vanished" (24) or "partial transfer" (23) needs a race or an unreadable file, which root
    cannot have; the wrapper provokes the exit code deterministically with the real copy behind it."""
    bindir = tmp_path / "wrapper-bin"
    bindir.mkdir()
    script = bindir / "rsync"
    script.write_text("#!/bin/sh\n'%s' \"$@\"\nrc=$?\n[ $rc -eq 0 ] && exit %d\nexit $rc\n" % (REAL_RSYNC, code))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (bindir, os.environ.get("PATH", "/usr/bin:/bin")))


def test_exit_24_is_a_warning_not_a_failure(env, monkeypatch):
    rsync_wrapper(env["tmp"], monkeypatch, 24)
    info = snap(env, N1)
    assert info["status"] == catalog.DONE
    assert len(info["warnings"]) == 1 and "24" in info["warnings"][0]
    assert os.path.isdir(os.path.join(env["snapshots"], N1))


def test_rsync_failure_keeps_the_partial_for_next_time(env, monkeypatch):
    rsync_wrapper(env["tmp"], monkeypatch, 23)
    with pytest.raises(ContentstoreError) as info:
        snap(env, N1)
    partial = os.path.join(env["snapshots"], N1 + ".partial")
    assert "exit code 23" in str(info.value) and partial in str(info.value)
    assert os.path.isdir(partial)
    assert not os.path.exists(os.path.join(env["snapshots"], N1))
    assert catalog.read_info(partial) is None
    assert [(e.name, e.status) for e in catalog.list_backups(env["backup_dir"], "contentstore")] == [
        (N1, catalog.PARTIAL)]
    monkeypatch.undo()
    result = snap(env, N2)
    assert result["resumed_partial"] is True and result["files_copied"] == 0
    assert not os.path.exists(partial)
    assert tree(os.path.join(env["snapshots"], N2)) == tree(env["source"])


def test_empty_source_after_a_full_snapshot_is_refused(tmp_path):
    """An unmounted contentstore share must not become a DONE, empty snapshot."""
    source, backup_dir = tmp_path / "store", tmp_path / "backups"
    (source / "2024" / "1").mkdir(parents=True)
    (source / "2024" / "1" / "a.bin").write_bytes(b"data")
    backup_dir.mkdir()
    log = logging.getLogger("test")
    contentstore.take_snapshot(str(source), str(backup_dir), "contentstore-2024-01-01_02-00-00", log)
    shutil.rmtree(source / "2024")
    with pytest.raises(contentstore.ContentstoreError, match="mounted"):
        contentstore.take_snapshot(str(source), str(backup_dir), "contentstore-2024-01-02_02-00-00", log)
