"""Tests for catalog.py: backup names, metadata files, and the status of what lies in BACKUP_DIR."""

import datetime
import json
import os
import stat
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import catalog  # noqa: E402
from catalog import DONE, FAILED, INCOMPLETE, PARTIAL, WAITING_FOR_WAL  # noqa: E402

WHEN = datetime.datetime(2024, 1, 31, 2, 0, 0)


def make_dir(backup_dir, kind, dirname, info=None, mtime=None):
    folder = os.path.join(str(backup_dir), kind)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, dirname)
    os.mkdir(path)
    if info is not None:
        catalog.write_info(path, info)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


# --- names -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,name", [("postgres", "base-2024-01-31_02-00-00"),
                                       ("contentstore", "contentstore-2024-01-31_02-00-00"),
                                       ("config", "config-2024-01-31_02-00-00")])
def test_backup_name_round_trips(kind, name):
    assert catalog.backup_name(kind, WHEN) == name
    assert catalog.parse_name_time(name) == WHEN
    assert catalog.parse_name_time(name + ".partial") == WHEN


@pytest.mark.parametrize("name", ["base-2024-01-31", "base-2024-13-31_02-00-00", "base-2024-02-30_02-00-00",
                                  "wal-2024-01-31_02-00-00", "base-2024-01-31_02-00-00.json",
                                  "base-2024-01-31_02-00-00.partial.old", "xbase-2024-01-31_02-00-00", ""])
def test_parse_name_time_rejects_other_names(name):
    assert catalog.parse_name_time(name) is None


def test_backup_name_unknown_kind():
    with pytest.raises(KeyError):
        catalog.backup_name("wal", WHEN)


def test_info_path_sits_beside_the_directory():
    assert catalog.info_path("/b/postgres/base-X") == "/b/postgres/base-X.json"
    assert catalog.info_path("/b/postgres/base-X/") == "/b/postgres/base-X.json"
    assert catalog.info_path("/b/postgres/base-X.partial") == "/b/postgres/base-X.json"


# --- write_info / read_info ------------------------------------------------------------------------------

def test_write_info_is_private_and_readable_back(tmp_path):
    path = make_dir(tmp_path, "postgres", "base-2024-01-31_02-00-00")
    old_umask = os.umask(0)
    try:
        catalog.write_info(path, {"status": DONE, "name": "base-2024-01-31_02-00-00", "n": 1})
    finally:
        os.umask(old_umask)
    meta = path + ".json"
    assert stat.S_IMODE(os.stat(meta).st_mode) == 0o600
    assert catalog.read_info(path) == {"status": DONE, "name": "base-2024-01-31_02-00-00", "n": 1}
    assert not os.path.exists(meta + ".tmp")
    # Not inside the backup directory: a restored tree holds no foreign file.
    assert os.listdir(path) == []


def test_write_info_replaces_atomically(tmp_path):
    path = make_dir(tmp_path, "postgres", "base-2024-01-31_02-00-00", info={"status": WAITING_FOR_WAL})
    inode = os.stat(path + ".json").st_ino
    catalog.write_info(path, {"status": DONE})
    assert catalog.read_info(path) == {"status": DONE}
    # A new inode: the old file was replaced by rename, never rewritten in place.
    assert os.stat(path + ".json").st_ino != inode


def test_write_info_failure_leaves_old_metadata_intact(tmp_path):
    path = make_dir(tmp_path, "postgres", "base-2024-01-31_02-00-00", info={"status": DONE, "size": 1})
    with pytest.raises(TypeError):
        catalog.write_info(path, {"status": FAILED, "bad": object()})
    assert catalog.read_info(path) == {"status": DONE, "size": 1}


def test_read_info_missing_or_broken(tmp_path):
    path = make_dir(tmp_path, "postgres", "base-2024-01-31_02-00-00")
    assert catalog.read_info(path) is None
    with open(path + ".json", "w") as handle:
        handle.write('{"status": "DONE"')  # truncated
    assert catalog.read_info(path) is None
    with open(path + ".json", "w") as handle:
        handle.write('["DONE"]')  # not an object
    assert catalog.read_info(path) is None
    with open(path + ".json", "wb") as handle:
        handle.write(b'{"status": "\xff"}')  # not UTF-8
    assert catalog.read_info(path) is None


# --- list_backups ----------------------------------------------------------------------------------------

def test_list_backups_missing_folder(tmp_path):
    assert catalog.list_backups(str(tmp_path), "postgres") == []
    assert catalog.newest_done(str(tmp_path), "postgres") is None


def test_list_backups_statuses_and_order(tmp_path):
    b = str(tmp_path)
    make_dir(b, "postgres", "base-2024-01-05_02-00-00", info={"status": DONE})
    make_dir(b, "postgres", "base-2024-01-01_02-00-00", info={"status": DONE})
    make_dir(b, "postgres", "base-2024-01-02_02-00-00", info={"status": WAITING_FOR_WAL})
    make_dir(b, "postgres", "base-2024-01-03_02-00-00", info={"status": FAILED})
    make_dir(b, "postgres", "base-2024-01-04_02-00-00")  # no metadata
    make_dir(b, "postgres", "base-2024-01-06_02-00-00", info={"status": "SOMETHING"})
    make_dir(b, "postgres", "base-2024-01-07_02-00-00", info={"no": "status"})
    make_dir(b, "postgres", "base-2024-01-08_02-00-00.partial")
    entries = catalog.list_backups(b, "postgres")
    assert [(e.name, e.status) for e in entries] == [
        ("base-2024-01-01_02-00-00", DONE),
        ("base-2024-01-02_02-00-00", WAITING_FOR_WAL),
        ("base-2024-01-03_02-00-00", FAILED),
        ("base-2024-01-04_02-00-00", INCOMPLETE),
        ("base-2024-01-05_02-00-00", DONE),
        ("base-2024-01-06_02-00-00", INCOMPLETE),
        ("base-2024-01-07_02-00-00", INCOMPLETE),
        ("base-2024-01-08_02-00-00", PARTIAL),
    ]
    partial = entries[-1]
    assert partial.is_partial and partial.path.endswith("base-2024-01-08_02-00-00.partial")
    assert partial.taken_at == datetime.datetime(2024, 1, 8, 2, 0, 0)
    assert all(e.name_parsed and e.kind == "postgres" for e in entries)
    assert entries[0].info == {"status": DONE}
    assert entries[3].info == {}
    assert [e.name for e in catalog.done_backups(b, "postgres")] == ["base-2024-01-01_02-00-00",
                                                                    "base-2024-01-05_02-00-00"]
    assert catalog.newest_done(b, "postgres").name == "base-2024-01-05_02-00-00"


def test_partial_is_partial_even_with_done_metadata(tmp_path):
    # The final name's metadata beside a NAME.partial directory must not make the partial look complete.
    b = str(tmp_path)
    make_dir(b, "contentstore", "contentstore-2024-01-01_02-00-00.partial")
    catalog.write_info(os.path.join(b, "contentstore", "contentstore-2024-01-01_02-00-00"), {"status": DONE})
    entries = catalog.list_backups(b, "contentstore")
    assert [e.status for e in entries] == [PARTIAL]
    assert catalog.newest_done(b, "contentstore") is None


def test_unparseable_names_use_mtime(tmp_path):
    b = str(tmp_path)
    old = datetime.datetime(2023, 6, 1, 12, 0, 0).timestamp()
    new = datetime.datetime(2024, 6, 1, 12, 0, 0).timestamp()
    make_dir(b, "postgres", "base-2024-01-01_02-00-00", info={"status": DONE})
    make_dir(b, "postgres", "base-manual-copy", info={"status": DONE}, mtime=old)
    make_dir(b, "postgres", "base-2024-99-99_99-99-99", mtime=new)
    make_dir(b, "postgres", "base-broken.partial", mtime=new + 60)
    entries = catalog.list_backups(b, "postgres")
    assert [(e.name, e.status, e.name_parsed) for e in entries] == [
        ("base-manual-copy", DONE, False),
        ("base-2024-01-01_02-00-00", DONE, True),
        ("base-2024-99-99_99-99-99", INCOMPLETE, False),
        ("base-broken", PARTIAL, False),
    ]
    assert entries[0].taken_at == datetime.datetime.fromtimestamp(old)
    assert entries[2].taken_at == datetime.datetime.fromtimestamp(new)


def test_other_entries_are_ignored(tmp_path):
    b = str(tmp_path)
    good = make_dir(b, "contentstore", "contentstore-2024-01-01_02-00-00", info={"status": DONE})
    folder = os.path.join(b, "contentstore")
    os.mkdir(os.path.join(folder, "lost+found"))
    os.mkdir(os.path.join(folder, "base-2024-01-01_02-00-00"))  # another kind's prefix
    with open(os.path.join(folder, "contentstore-2024-01-02_02-00-00"), "w") as handle:
        handle.write("a file, not a directory")
    os.symlink(good, os.path.join(folder, "contentstore-2024-01-03_02-00-00"))
    entries = catalog.list_backups(b, "contentstore")
    assert [e.name for e in entries] == ["contentstore-2024-01-01_02-00-00"]


def test_kinds_are_separate(tmp_path):
    b = str(tmp_path)
    make_dir(b, "postgres", "base-2024-01-01_02-00-00", info={"status": DONE})
    make_dir(b, "config", "config-2024-01-01_02-00-00", info={"status": DONE})
    assert [e.kind for e in catalog.list_backups(b, "config")] == ["config"]
    assert catalog.list_backups(b, "contentstore") == []


def test_same_time_sorted_by_name(tmp_path):
    b = str(tmp_path)
    when = datetime.datetime(2024, 1, 1, 2, 0, 0).timestamp()
    make_dir(b, "postgres", "base-zz", mtime=when)
    make_dir(b, "postgres", "base-aa", mtime=when)
    assert [e.name for e in catalog.list_backups(b, "postgres")] == ["base-aa", "base-zz"]


# --- times -----------------------------------------------------------------------------------------------

def test_utc_now_iso_round_trips():
    text = catalog.utc_now_iso()
    value = catalog.parse_iso(text)
    assert text.endswith("+00:00")
    assert value.tzinfo is not None
    assert abs((datetime.datetime.now(datetime.timezone.utc) - value).total_seconds()) < 5


@pytest.mark.parametrize("text,expected", [
    ("2024-01-31T02:00:00+00:00", datetime.datetime(2024, 1, 31, 2, tzinfo=datetime.timezone.utc)),
    ("2024-01-31T03:00:00+01:00", datetime.datetime(2024, 1, 31, 2, tzinfo=datetime.timezone.utc)),
    ("2024-01-31T02:00:00", datetime.datetime(2024, 1, 31, 2, tzinfo=datetime.timezone.utc)),
])
def test_parse_iso(text, expected):
    assert catalog.parse_iso(text) == expected


@pytest.mark.parametrize("text", [None, "", "yesterday", "2024-13-01T00:00:00"])
def test_parse_iso_bad(text):
    assert catalog.parse_iso(text) is None


def test_metadata_round_trip_through_json(tmp_path):
    path = make_dir(tmp_path, "config", "config-2024-01-31_02-00-00")
    info = {"status": DONE, "files": {"a b": 1, "ü": 2}, "started_at": catalog.utc_now_iso()}
    catalog.write_info(path, info)
    with open(path + ".json", encoding="utf-8") as handle:
        assert json.load(handle) == info
    assert catalog.list_backups(str(tmp_path), "config")[0].info == info
