"""The btrfs engine on a real loop-mounted btrfs: subvolume snapshots with the same tree, names, metadata,
resume, retention, restore and drill as hardlinked ones. Skipped (with the reason) when not root or
without a loop device; the file system is unmounted and its loop device detached afterwards."""

import json
import logging
import os
import stat
import subprocess
import time

import btrfs_loop
import btrfs_snapshot
import catalog
import contentstore
import pytest
import retention
import sandbox as sandbox_module
import tree_delete
from test_contentstore import N1, N2, N3, fs, inode, make_store, tree, write

LOG = logging.getLogger("test-btrfs")
REASON = btrfs_loop.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def mount(**kwargs):
    try:
        return btrfs_loop.LoopBtrfs.create(**kwargs)
    except btrfs_loop.LoopBtrfsError as exc:
        pytest.skip("cannot mount a loop btrfs here: %s" % exc)


@pytest.fixture(scope="module")
def btrfs():
    fs_ = mount()
    yield fs_
    fs_.destroy()
    assert not os.path.ismount(fs_.mountpoint) and not fs_.loop_devices()


@pytest.fixture
def env(tmp_path, btrfs, request):
    source = make_store(tmp_path / "alf_data" / "contentstore")
    backup_dir = os.path.join(btrfs.mountpoint, request.node.name[:60].replace("[", "-").replace("]", ""))
    os.mkdir(backup_dir, 0o700)
    yield {"source": os.fsdecode(source), "backup_dir": backup_dir, "tmp": tmp_path,
           "snapshots": os.path.join(backup_dir, "contentstore")}
    for entry in catalog.list_backups(backup_dir, "contentstore"):
        tree_delete.remove_tree(entry.path)


def snap(env, name, **kwargs):
    return contentstore.take_snapshot(env["source"], env["backup_dir"], name, LOG, **kwargs)


def files_and_bytes(root):
    """(regular files, bytes as rsync counts its "total file size": files and symlink targets)."""
    entries = tree(root).values()
    return (sum(1 for v in entries if v[0] == "file"),
            sum(len(v[5]) for v in entries if v[0] in ("file", "link")))


def subvolumes(path):
    out = subprocess.run(["btrfs", "subvolume", "list", "-o", path], capture_output=True, text=True, check=True)
    return sorted(line.rsplit("/", 1)[-1] for line in out.stdout.splitlines())


def assert_read_only_snapshot(path):
    assert btrfs_snapshot.is_subvolume(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    with pytest.raises(OSError) as info:
        open(os.path.join(path, "written-into-a-snapshot"), "wb").close()
    assert info.value.errno == 30  # EROFS, even for root


def test_nights_are_read_only_subvolumes_holding_the_sources_tree(env, monkeypatch):
    first = snap(env, N1)
    one = os.path.join(env["snapshots"], N1)
    assert first["engine"] == "btrfs" and first["compare"] == "full" and first["link_dest"] is None
    assert tree(one) == tree(env["source"]) and not os.path.exists(one + ".partial")
    assert_read_only_snapshot(one)
    assert (first["files"], first["bytes_total"]) == files_and_bytes(env["source"])
    assert catalog.read_info(one) == json.loads(json.dumps(first))

    src = env["source"]
    write(src, b"2024/1/31/2/0/bbbb.bin", b"B" * 2500, mode=0o604, mtime=1700000500)  # rewritten in place
    os.unlink(os.path.join(fs(src), b"2024/2/1/0/0/gone.bin"))
    write(src, b"2024/2/1/0/0/new file.bin", b"new" * 10)
    second = snap(env, N2)
    two = os.path.join(env["snapshots"], N2)
    assert tree(two) == tree(src) and second["link_dest"] == N1 and second["engine"] == "btrfs"
    assert_read_only_snapshot(two)
    assert second["files_copied"] == 2 and second["bytes_copied"] == 2500 + 30
    assert (second["files"], second["bytes_total"]) == files_and_bytes(src)
    assert second["bytes_linked"] == second["bytes_total"] - second["bytes_copied"]
    # The earlier snapshot is untouched; unchanged files share their extents (btrfs keeps inode numbers).
    with open(os.path.join(fs(one), b"2024/1/31/2/0/bbbb.bin"), "rb") as handle:
        assert handle.read() == b"b" * 2000
    assert os.path.exists(os.path.join(fs(one), b"2024/2/1/0/0/gone.bin"))
    assert inode(one, b"2024/1/31/2/0/aaaa.bin") == inode(two, b"2024/1/31/2/0/aaaa.bin")

    # A night relying on unchanged directories (margin 0: the test's directories are seconds old).
    monkeypatch.setattr(contentstore, "TRUST_MARGIN_S", 0)
    time.sleep(0.05)
    write(src, b"2024/3/1/1/1/tonight.bin", b"t" * 700)
    os.unlink(os.path.join(fs(src), b"2024/1/31/3/5/cccc.bin"))
    third = snap(env, N3)
    three = os.path.join(env["snapshots"], N3)
    assert third["compare"] == "changed directories" and third["dirs_trusted"] > 0
    assert tree(three) == tree(src)
    assert (third["files"], third["bytes_total"]) == files_and_bytes(src)
    assert third["full_compare_at"] == first["started_at"]
    assert subvolumes(env["snapshots"]) == [N1, N2, N3]


def test_retention_deletes_a_snapshot_as_one_subvolume(env):
    snap(env, N1)
    snap(env, N2)
    entry = catalog.list_backups(env["backup_dir"], "contentstore")[0]
    retention.delete_entry(entry)
    assert subvolumes(env["snapshots"]) == [N2]
    assert sorted(os.listdir(env["snapshots"])) == [N2, N2 + ".json"]


def test_an_interrupted_night_is_resumed_and_compared_fully(env):
    snap(env, N1)
    # What a run killed after its sync began leaves: a writable snapshot of N1, partly updated.
    leftover = os.path.join(env["snapshots"], N2 + ".partial")
    btrfs_snapshot.snapshot(os.path.join(env["snapshots"], N1), leftover)
    write(leftover, b"stray.bin", b"not in the source")
    os.unlink(os.path.join(fs(leftover), b"2024/1/31/2/0/aaaa.bin"))
    write(env["source"], b"2024/2/2/0/0/big-new.bin", os.urandom(100000))
    info = snap(env, N3)
    final = os.path.join(env["snapshots"], N3)
    assert info["resumed_partial"] is True and info["compare"] == "full" and info["link_dest"] == N1
    assert tree(final) == tree(env["source"]) and not os.path.exists(leftover)
    assert_read_only_snapshot(final)
    assert (info["files"], info["bytes_total"]) == files_and_bytes(env["source"])


def test_an_interrupted_first_copy_is_resumed_in_its_subvolume(env):
    os.makedirs(env["snapshots"], 0o700)
    leftover = os.path.join(env["snapshots"], N1 + ".partial")
    btrfs_snapshot.create(leftover)
    write(leftover, b"2024/1/31/2/0/aaaa.bin", b"a" * 1000)  # copied before the kill
    write(leftover, b"stale.bin", b"stale")
    info = snap(env, N2)
    assert info["resumed_partial"] is True and info["link_dest"] is None and info["engine"] == "btrfs"
    assert tree(os.path.join(env["snapshots"], N2)) == tree(env["source"])
    assert_read_only_snapshot(os.path.join(env["snapshots"], N2))


def test_a_hardlinked_partial_from_before_btrfs_is_kept_as_a_subvolume(env):
    os.makedirs(env["snapshots"], 0o700)
    leftover = os.path.join(env["snapshots"], N1 + ".partial")
    os.mkdir(leftover, 0o700)  # a plain directory: an interrupted first copy by rsync
    write(leftover, b"2024/1/31/2/0/aaaa.bin", b"a" * 1000)
    info = snap(env, N2)
    final = os.path.join(env["snapshots"], N2)
    assert info["resumed_partial"] is True and info["engine"] == "btrfs" and not os.path.exists(leftover)
    assert tree(final) == tree(env["source"])
    assert_read_only_snapshot(final)


def test_first_btrfs_night_after_hardlinked_snapshots(env):
    snap(env, N1, method="rsync")
    plain = os.path.join(env["snapshots"], N1)
    assert not btrfs_snapshot.is_subvolume(plain)
    write(env["source"], b"2024/2/2/0/0/new.bin", b"n" * 50)
    info = snap(env, N2)
    two = os.path.join(env["snapshots"], N2)
    assert info["engine"] == "btrfs" and info["link_dest"] == N1 and info["files_copied"] == 1
    assert tree(two) == tree(env["source"])
    assert_read_only_snapshot(two)
    for entry in catalog.list_backups(env["backup_dir"], "contentstore"):
        retention.delete_entry(entry)
    assert os.listdir(env["snapshots"]) == []


def test_btrfs_method_elsewhere_is_refused_naming_the_setting(tmp_path):
    source = make_store(tmp_path / "store")
    with pytest.raises(contentstore.ContentstoreError, match="CONTENTSTORE_METHOD=btrfs.*not btrfs"):
        contentstore.take_snapshot(os.fsdecode(source), str(tmp_path / "backups"), N1, LOG, method="btrfs")


def test_delete_without_user_subvol_rm_allowed_empties_and_removes_it(service_user):
    """As the service user on a mount without user_subvol_rm_allowed: btrfs subvolume delete is refused,
    so remove_tree makes the snapshot writable, empties it and removes it with rmdir."""
    plain = mount(user_subvol_rm_allowed=False)
    try:
        folder = os.path.join(plain.mountpoint, "contentstore")
        os.mkdir(folder, 0o700)
        os.chown(folder, service_user.uid, service_user.gid)
        code = ("import os, sys, btrfs_snapshot, tree_delete\n"
                "work, snap = sys.argv[1] + '/w', sys.argv[1] + '/contentstore-2024-01-01_02-00-00'\n"
                "btrfs_snapshot.create(work)\n"
                "os.makedirs(work + '/2024/1/1'); open(work + '/2024/1/1/a.bin', 'w').write('a')\n"
                "btrfs_snapshot.snapshot(work, snap, readonly=True)\n"
                "assert not btrfs_snapshot.delete(snap)  # refused: not allowed\n"
                "btrfs_snapshot.set_readonly(snap, True)\n"
                "tree_delete.remove_tree(snap)\n"
                "tree_delete.remove_tree(work)\n"
                "print(sorted(os.listdir(sys.argv[1])))\n")
        proc = sandbox_module._run_as(service_user, [sandbox_module.resolve_python(service_user), "-c", code, folder],
                                      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "[]"
    finally:
        plain.destroy()
    assert not plain.loop_devices()


def test_backup_restore_drill_and_retention_on_btrfs_as_the_service_user(sandbox, btrfs):
    sb = sandbox
    backup_dir = os.path.join(btrfs.mountpoint, "e2e-backups")
    os.mkdir(backup_dir, 0o700)
    os.chown(backup_dir, sb.uid, sb.gid)
    env = sb.write_env(BACKUP_DIR=backup_dir, WAL_ARCHIVE_DIR=sb.wal_archive_dir)
    snaps = os.path.join(backup_dir, "contentstore")
    try:
        for night in range(2):
            if night:
                sb.add_content(2, date=(2025, 1, 2, 3, 4))
            result = sb.run_cli("backup.py", env_path=env, timeout=300)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "snapshot engine: btrfs" in result.stdout
            time.sleep(1)  # names carry the second
        done = catalog.done_backups(backup_dir, "contentstore")
        assert len(done) == 2 and all(btrfs_snapshot.is_subvolume(e.path) for e in done)
        assert tree(done[-1].path) == tree(sb.contentstore_dir)
        assert done[-1].info["link_dest"] == done[0].name

        drill = sb.run_cli("restore.py", args=["verify"], env_path=env, timeout=300)
        assert drill.returncode == 0 and "Restore drill OK" in drill.stdout, drill.stdout + drill.stderr
        assert "42 store:// URLs checked, 0 missing" in drill.stdout
        restored = os.path.join(sb.root, "restored-store")
        copy = sb.run_cli("restore.py", args=["contentstore", "--to", restored], env_path=env)
        assert copy.returncode == 0, copy.stdout + copy.stderr
        assert tree(restored) == tree(sb.contentstore_dir)

        # Retention as the service user deletes whole subvolumes (user_subvol_rm_allowed).
        third = sb.run_cli("backup.py", env_path=sb.write_env(BACKUP_DIR=backup_dir, WAL_ARCHIVE_DIR=sb.wal_archive_dir,
                                                              RETENTION_DAYS=0), timeout=300)
        assert third.returncode == 0, third.stdout + third.stderr
        left = catalog.list_backups(backup_dir, "contentstore")
        assert [e.status for e in left] == [catalog.DONE] and subvolumes(snaps) == [left[0].name]
    finally:
        for entry in catalog.list_backups(backup_dir, "contentstore"):
            tree_delete.remove_tree(entry.path)
