"""Free-space estimates (pure) and the date-bucket growth measure."""

import datetime
import logging
import os

import pytest
import space

MB = 1 << 20


def test_first_run_needs_the_cluster_and_the_whole_store_minus_a_partial():
    need = space.estimate(500 * MB, [], [], store_bytes=3000 * MB, partial_bytes=1000 * MB)
    assert need["database"] == 500 * MB and need["contentstore"] == 2000 * MB
    assert "first base backup" in need["why_database"] and "already copied" in need["why_contentstore"]


def test_nightly_needs_last_base_plus_growth_ignoring_first_copies():
    bases = [{"size_bytes": 40 * MB}, {"size_bytes": 50 * MB}]
    snaps = [{"bytes_copied": 3000 * MB, "link_dest": None, "files": 60000},  # the first, full copy
             {"bytes_copied": 30 * MB, "link_dest": "a", "files": 60100},
             {"bytes_copied": 10 * MB, "link_dest": "b", "files": 60200}]
    need = space.estimate(900 * MB, bases, snaps)
    assert need["database"] == int(50 * MB * 1.25)
    assert need["contentstore"] == int(30 * MB * 1.5) + 60200 * 1024


def test_todays_buckets_count_when_they_exceed_the_history():
    snaps = [{"bytes_copied": 5 * MB, "link_dest": "a", "files": 10}]
    need = space.estimate(0, [], snaps, recent_bytes=100 * MB)
    assert need["contentstore"] == int(100 * MB * 1.5) + 10 * 1024


def write(path, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(b"x" * size)


def test_recent_bytes_reads_only_buckets_at_or_after_the_time(tmp_path):
    store = str(tmp_path)
    write(os.path.join(store, "2023/12/31/23/59/old.bin"), 1000)
    write(os.path.join(store, "2024/5/1/9/59/before.bin"), 2000)
    write(os.path.join(store, "2024/5/1/10/30/same-minute.bin"), 30)
    write(os.path.join(store, "2024/5/1/11/0/later-hour.bin"), 400)
    write(os.path.join(store, "2024/5/2/0/0/next-day.bin"), 5000)
    write(os.path.join(store, "2025/1/1/0/0/next-year.bin"), 60000)
    write(os.path.join(store, "odd-folder/anything.bin"), 7)
    since = datetime.datetime(2024, 5, 1, 10, 30)
    assert space.recent_bytes(store, since) == 30 + 400 + 5000 + 60000 + 7


def test_check_refuses_with_the_numbers(tmp_path, monkeypatch):
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    store = tmp_path / "store"
    write(str(store / "2024/1/1/0/0/a.bin"), 4096)
    real_statvfs = os.statvfs

    class Tiny:
        def __init__(self, st):
            self.f_frsize, self.f_blocks, self.f_bavail = 4096, 1000, 1  # 4 KB free of 4 MB

    monkeypatch.setattr(os, "statvfs", lambda path: Tiny(real_statvfs(path)))
    with pytest.raises(space.SpaceError) as error:
        space.check(str(backup_dir), str(backup_dir / "pg_wal"), str(store), 10 * MB, 16 * MB,
                    logging.getLogger("test"))
    message = str(error.value)
    assert str(backup_dir) in message and "4.0 KiB free" in message and "first base backup" in message
