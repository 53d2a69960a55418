"""A night's off-site list derived from the previous night's list and the directories the snapshot engine
changed (offsite_listing) against a walk of the same snapshot: equal whatever the night did, or refused."""

import gzip
import logging
import os
import time

import catalog
import contentstore
import linktree
import offsite
import offsite_listing
import pytest
from test_linktree import build_source, write
from test_linktree_trust import alfresco_night, first_copy, settle

T = 1_700_000_000


def more_of_a_night(root):
    """What the derivation must get right beyond alfresco_night: an empty directory that gains a file (its
    parent unchanged), a whole subtree removed, a directory renamed, an unshippable name in a new bucket."""
    root = os.fsencode(root)
    write(os.path.join(root, b"empty/dir/now.bin"), b"into an old empty dir", mtime=T)
    for i in (4, 9, 14, 19, 24, 29):  # every bucket of day 5: 2024/3/5 goes
        bucket = os.path.join(root, b"2024/3/5/10/%d" % i)
        for name in os.listdir(bucket):
            os.remove(os.path.join(bucket, name))
        os.rmdir(bucket)
    os.rmdir(os.path.join(root, b"2024/3/5/10"))
    os.rmdir(os.path.join(root, b"2024/3/5"))
    os.rename(os.path.join(root, b"2024/3/1/10/0"), os.path.join(root, b"2024/3/1/10/renamed"))
    write(os.path.join(root, b"2025/1/2/3/6/tab\there.bin"), b"not shippable", mtime=T)


def night_info(stats, base="prev"):
    """The metadata contentstore.take_snapshot writes for a linktree night (the fields the derivation reads)."""
    return {"engine": "linktree", "compare": "changed directories", "link_dest": base, "files": stats.files,
            "regular_bytes": stats.bytes_total - stats.symlink_bytes, "dirs_trusted": stats.dirs_trusted,
            "dirs_compared": stats.dirs_compared,
            "changed_dirs": [os.fsdecode(d) for d in stats.changed_dirs]}


def two_nights(tmp_path, workers, night=alfresco_night):
    src, prev, ours = str(tmp_path / "src"), str(tmp_path / "prev"), str(tmp_path / "ours")
    build_source(src)
    write(os.path.join(os.fsencode(src), b"2024/3/2/10/6/un\nshippable.bin"), b"old", mtime=T)
    first_copy(src, prev)
    trust = settle()
    night(src)
    os.mkdir(ours)
    stats = linktree.snapshot(src, ours, prev, workers=workers, trust_before_ns=trust)
    stats.trust = trust  # for a test that runs the night again
    return prev, ours, stats


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("night", [alfresco_night, lambda root: (alfresco_night(root), more_of_a_night(root)),
                                   lambda root: None], ids=["alfresco", "more", "nothing"])
def test_the_derived_list_is_the_walked_list(tmp_path, workers, night):
    prev, ours, stats = two_nights(tmp_path, workers, night)
    info = night_info(stats)
    walked = offsite_listing.walk_files(ours)
    assert walked[1]  # the unshippable names are part of the comparison
    assert offsite_listing.derive_files(ours, info, *offsite_listing.walk_files(prev)) == walked
    # The derivation skipped directories: most were not changed.
    all_dirs = sum(len(dirs) for _path, dirs, _files in os.walk(ours)) + 1
    assert 0 < len(info["changed_dirs"]) < all_dirs / 2
    assert "" in info["changed_dirs"]


def test_base_unshippable_names_unknown_means_walk(tmp_path):
    """A base read from its manifest lacks its unshippable names: the count check refuses (the old bucket
    with one stays unchanged), so the caller walks."""
    prev, ours, stats = two_nights(tmp_path, 1)
    info = night_info(stats)
    assert "2024/3/2/10/6" not in info["changed_dirs"]
    assert offsite_listing.derive_files(ours, info, offsite_listing.walk_files(prev)[0], None) is None


def test_a_record_missing_a_changed_directory_is_refused(tmp_path):
    prev, ours, stats = two_nights(tmp_path, 1)
    info = night_info(stats)
    base = offsite_listing.walk_files(prev)
    info["changed_dirs"] = [d for d in info["changed_dirs"] if d != "2025/1/2/3/5"]  # its new file unseen
    assert offsite_listing.derive_files(ours, info, *base) is None
    info = night_info(stats)
    info["regular_bytes"] += 1
    assert offsite_listing.derive_files(ours, info, *base) is None
    info = night_info(stats)
    info["changed_dirs"].remove("")
    assert offsite_listing.derive_files(ours, info, *base) is None


@pytest.mark.parametrize("info, expected", [
    ({"engine": "linktree", "compare": "changed directories", "link_dest": "n1", "changed_dirs": [""],
      "regular_bytes": 1, "dirs_trusted": 3, "dirs_compared": 1}, "n1"),
    ({"engine": "linktree", "compare": "changed directories", "link_dest": "n1", "changed_dirs": ["", "a", "b"],
      "regular_bytes": 1, "dirs_trusted": 6, "dirs_compared": 3}, None),  # 3 of 9 changed: walked
    ({"engine": "linktree", "compare": "full", "link_dest": "n1", "changed_dirs": None, "regular_bytes": 1}, None),
    ({"engine": "linktree", "compare": "changed directories", "link_dest": "n1", "changed_dirs": None,
      "regular_bytes": 1, "dirs_trusted": 3, "dirs_compared": 1}, None),  # too many changed to record
    ({"engine": "btrfs", "compare": "changed directories", "link_dest": "n1"}, None),
    ({"engine": "rsync", "link_dest": "n1"}, None),
    ({"engine": "linktree", "compare": "changed directories", "link_dest": "n1", "changed_dirs": [""],
      "dirs_trusted": 3, "dirs_compared": 1}, None),  # written before regular_bytes was
])
def test_only_a_linktree_night_with_its_record_is_derived(info, expected):
    assert offsite_listing.derivable(info) == expected


def test_too_many_changed_directories_are_not_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(linktree, "MAX_CHANGED_DIRS", 3)
    _prev, _ours, stats = two_nights(tmp_path, 3)
    assert stats.changed_dirs is None


class _Cfg:
    def __init__(self, backup_dir):
        self.BACKUP_DIR = backup_dir
        self.OFFSITE_REMOTE = "unused:"


def test_nights_through_take_snapshot_are_derived_from_memory_and_from_the_kept_manifest(tmp_path, monkeypatch,
                                                                                      caplog):
    """Three nights by contentstore.take_snapshot (the first by rsync): the shipper lists the second from the
    first's walk (same run) and, in a later run, the third from the second's manifest kept locally."""
    monkeypatch.setattr(contentstore, "TRUST_MARGIN_S", 0)
    src, backup_dir = str(tmp_path / "store"), str(tmp_path / "backups")
    os.makedirs(backup_dir)
    for i in range(40):
        write(os.path.join(os.fsencode(src), b"2024/3/%d/10/%d/%032x.bin" % (i % 4 + 1, i, i)), os.urandom(50 + i),
              mtime=T)
    log = logging.getLogger("test")
    for night in range(3):
        time.sleep(1.1)  # the directories' ctimes fall before the next night's start
        if night:
            write(os.path.join(os.fsencode(src), b"2025/1/%d/1/1/new.bin" % night), b"night %d" % night, mtime=T)
        time.sleep(1.1)
        info = contentstore.take_snapshot(src, backup_dir, "contentstore-2025010%dT020000" % (night + 1), log)
        assert info["engine"] == ("rsync" if night == 0 else "linktree")
        if night:
            assert info["compare"] == "changed directories" and 0 < len(info["changed_dirs"]) < 12
    snapshots = catalog.done_backups(backup_dir, "contentstore")
    caplog.set_level(logging.INFO)
    job = offsite.Run(_Cfg(backup_dir), log, remote=object(), state=object())
    first = job._snapshot_files(snapshots[0])
    second = job._snapshot_files(snapshots[1])
    assert second == offsite_listing.walk_files(snapshots[1].path) and len(second[0]) == len(first[0]) + 1
    assert "listed from contentstore-20250101T020000" in caplog.text
    offsite.write_manifest(os.path.join(backup_dir, offsite.MANIFEST_DIR), snapshots[1].name, second[0])
    caplog.clear()
    later = offsite.Run(_Cfg(backup_dir), log, remote=object(), state=object())
    third = later._snapshot_files(snapshots[2])
    assert third == offsite_listing.walk_files(snapshots[2].path) and len(third[0]) == len(first[0]) + 2
    assert "listed from contentstore-20250102T020000" in caplog.text
    # A damaged kept manifest: walked, same list.
    with open(os.path.join(backup_dir, offsite.MANIFEST_DIR, snapshots[1].name + ".tsv.gz"), "wb") as handle:
        handle.write(gzip.compress(b"2024/3/1/10/0/x.bin\t1\n")[:-3])
    caplog.clear()
    again = offsite.Run(_Cfg(backup_dir), log, remote=object(), state=object())
    assert again._snapshot_files(snapshots[2]) == third
    assert "listed from" not in caplog.text


def test_a_resumed_night_is_derived_as_walked(tmp_path):
    """An interrupted run left a partial copy with a stray file in an unchanged bucket and files missing:
    the resumed run's record still gives the walked list."""
    prev, ours, first = two_nights(tmp_path, 1)
    write(os.path.join(os.fsencode(ours), b"2024/3/1/10/5/stray.bin"), b"left by hand", mtime=T)
    os.remove(os.path.join(ours, "2024/3/2/10/6/00000000000000000000000000000006.bin"))
    os.remove(os.path.join(ours, "2025/1/2/3/5/new-bucket.bin"))
    stats = linktree.snapshot(str(tmp_path / "src"), ours, prev, workers=1, resume=True,
                              trust_before_ns=first.trust)
    walked = offsite_listing.walk_files(ours)
    assert "2024/3/1/10/5/stray.bin" not in dict(walked[0]) and len(walked[0]) == stats.files - len(walked[1])
    assert offsite_listing.derive_files(ours, night_info(stats), *offsite_listing.walk_files(prev)) == walked


def test_local_manifests_go_once_off_site_gone_here_and_past_off_site_retention(tmp_path):
    import datetime

    import offsite_state

    backup_dir = str(tmp_path)
    cfg = _Cfg(backup_dir)
    cfg.OFFSITE_RETENTION_DAYS = 30
    directory = os.path.join(backup_dir, offsite.MANIFEST_DIR)
    os.makedirs(directory)
    now = datetime.datetime(2026, 6, 1, 12, 0, 0)
    names = {"old-gone-shipped": "contentstore-2026-04-01_02-00-00",
             "old-gone-pending": "contentstore-2026-04-02_02-00-00",
             "old-kept-here": "contentstore-2026-04-03_02-00-00",
             "recent-gone": "contentstore-2026-05-20_02-00-00",
             "old-partial-here": "contentstore-2026-04-04_02-00-00", "not-a-night": "notes"}
    os.makedirs(os.path.join(backup_dir, "contentstore", names["old-kept-here"]))
    os.makedirs(os.path.join(backup_dir, "contentstore", names["old-partial-here"] + ".partial"))
    with offsite_state.State(backup_dir, "remote:") as state:
        for what, name in names.items():
            path = os.path.join(directory, name + ".tsv.gz")
            offsite.write_manifest(directory, name, [("a.bin", 1)])
            state.queue([("manifests/%s.tsv.gz" % name, 1, path)], first_set=name)
            if what != "old-gone-pending":
                state.mark_shipped("manifests/%s.tsv.gz" % name)
        offsite.Run(cfg, logging.getLogger("test"), remote=object(), state=state)._prune_manifests(now)
    left = sorted(n[:-len(".tsv.gz")] for n in os.listdir(directory))
    assert left == sorted(name for what, name in names.items() if what != "old-gone-shipped")
