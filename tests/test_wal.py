"""Tests for wal.py: name math, history files, chain check, prune plan, and the archive-push/archive-get CLI
run as PostgreSQL runs it (a subprocess of the system python3). One test uses a real PostgreSQL (sandbox)."""

import errno
import fcntl
import glob
import gzip
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import wal
import wal_chain

WAL_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "wal.py")
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
MB = 1024 * 1024
SEG1 = "000000010000000000000001"


def seg(tli, segno, seg_size=16 * MB):
    return wal_chain.segment_from_number(tli, segno, seg_size)


def touch(directory, *names):
    for name in names:
        with open(os.path.join(str(directory), name), "wb") as handle:
            handle.write(b"x")


def run_wal(*args, cwd=None, python=PYTHON):
    return subprocess.run([python, WAL_PY] + [str(a) for a in args], cwd=cwd and str(cwd),
                          capture_output=True, text=True, timeout=60)


def listing(directory):
    return sorted(os.listdir(str(directory)))


# ---------------------------------------------------------------- LSNs and names

def test_parse_and_format_lsn():
    assert wal_chain.parse_lsn("0/3000028") == 0x3000028
    assert wal_chain.parse_lsn("16/b374d848") == (0x16 << 32) | 0xB374D848
    assert wal_chain.parse_lsn(" FFFFFFFF/FFFFFFFF\n") == (1 << 64) - 1
    assert wal_chain.format_lsn(0x3000028) == "0/3000028"
    assert wal_chain.format_lsn((0x16 << 32) | 0xB374D848) == "16/B374D848"
    for text in ("", "3000028", "0/", "1/2/3", "G/0", "100000000/0", None):
        with pytest.raises(ValueError):
            wal_chain.parse_lsn(text)
    with pytest.raises(ValueError):
        wal_chain.format_lsn(-1)


def test_segment_name_16mb():
    assert wal_chain.segments_per_log(16 * MB) == 256
    assert wal_chain.segment_name(1, "0/3000028") == "000000010000000000000003"
    assert wal_chain.segment_name(1, "0/3000000") == "000000010000000000000003"
    # pg_walfile_name / backup stop semantics: an LSN exactly at a boundary belongs to the previous segment.
    assert wal_chain.segment_name(1, "0/3000000", prev=True) == "000000010000000000000002"
    assert wal_chain.segment_name(1, "0/3000001", prev=True) == "000000010000000000000003"
    assert wal_chain.segment_name(2, "1/A8000000", prev=True) == "0000000200000001000000A7"
    assert wal_chain.segment_name(1, "1/0", prev=True) == "0000000100000000000000FF"
    assert wal_chain.segment_name(1, "0/FFFFFFFF") == "0000000100000000000000FF"
    assert wal_chain.segment_name(1, "1/0") == "000000010000000100000000"
    assert wal_chain.segment_name(0x1A, (0x2B << 32) | 0xC5000000) == "0000001A0000002B000000C5"
    with pytest.raises(ValueError):
        wal_chain.segment_name(1, "0/0", prev=True)
    with pytest.raises(ValueError):
        wal_chain.segment_name(0, "0/3000028")


def test_segment_name_other_sizes_match_postgresql():
    # Expected values printed by PostgreSQL 15 pg_walfile_name() on an initdb --wal-segsize=64 cluster.
    size = 64 * MB
    assert wal_chain.segments_per_log(size) == 64
    assert wal_chain.segment_name(1, "1/0", size, prev=True) == "00000001000000000000003F"
    assert wal_chain.segment_name(1, "1/4000000", size, prev=True) == "000000010000000100000000"
    assert wal_chain.segment_name(1, "0/C000028", size, prev=True) == "000000010000000000000003"
    assert wal_chain.segment_name(1, "0/C000000", size, prev=True) == "000000010000000000000002"
    assert wal_chain.segment_name(1, "A/FC000001", size, prev=True) == "000000010000000A0000003F"
    assert wal_chain.segments_per_log(1024 * MB) == 4
    assert wal_chain.segment_name(3, "2/C0000000", 1024 * MB) == "000000030000000200000003"
    assert wal_chain.segments_per_log(1 * MB) == 4096
    assert wal_chain.segment_name(1, "0/FFFFFFFF", 1 * MB) == "000000010000000000000FFF"
    for bad in (0, 8 * MB + 1, 3 * MB, 2048 * MB, 512 * 1024):
        with pytest.raises(ValueError):
            wal_chain.segments_per_log(bad)


def test_segment_number_roundtrip_and_limits():
    for size in (1 * MB, 16 * MB, 64 * MB, 1024 * MB):
        per_log = wal_chain.segments_per_log(size)
        for segno in (0, 1, per_log - 1, per_log, per_log + 1, 5 * per_log + 3, 0xFFFFFFFF * per_log):
            name = wal_chain.segment_from_number(7, segno, size)
            assert wal_chain.segment_number(name, size) == segno
            assert wal.parse_segment_name(name)[0] == 7
    # Seg 0x40 does not exist with 64 MB segments (0..0x3F per log).
    with pytest.raises(ValueError):
        wal_chain.segment_number("000000010000000000000040", 64 * MB)
    assert wal_chain.segment_number("000000010000000000000040", 16 * MB) == 0x40
    with pytest.raises(ValueError):
        wal_chain.segment_number("00000001.history")
    with pytest.raises(ValueError):
        wal_chain.segment_from_number(1, -1)


def test_name_predicates():
    assert wal.parse_segment_name("0000000200000001000000A8") == (2, 1, 0xA8)
    assert wal.is_segment_name("000000010000000000000003")
    for bad in ("00000001000000000000003", "0000000100000000000000030", "00000001000000000000000g",
                "000000010000000000000003.partial", "000000000000000000000003", "", None):
        assert not wal.is_segment_name(bad)
        assert wal.parse_segment_name(bad) is None
    assert wal.is_history_name("00000002.history")
    assert not wal.is_history_name("2.history") and not wal.is_history_name("00000002.history.tmp")
    assert wal.is_backup_label_name("000000010000000000000002.00000028.backup")
    assert wal.is_backup_label_name("0000000100000001000000A8.00F00060.backup")
    assert not wal.is_backup_label_name("000000010000000000000002.backup")
    assert not wal.is_backup_label_name("000000010000000000000002.0000028.backup")


# ---------------------------------------------------------------- history files

def test_read_history_file(tmp_path):
    path = tmp_path / "00000003.history"
    path.write_text("# written by hand\n\n1\t0/7000000\tno recovery target specified\n"
                    "2\t1/A8000060\tbefore 2024-05-01 10:00:00+00 with spaces\n3 2/0\n")
    assert wal_chain.read_history_file(str(path)) == [
        (1, 0x7000000, "no recovery target specified"),
        (2, (1 << 32) | 0xA8000060, "before 2024-05-01 10:00:00+00 with spaces"),
        (3, 2 << 32, ""),
    ]
    gz = tmp_path / "00000002.history.gz"
    with gzip.open(str(gz), "wt") as handle:
        handle.write("1\t0/5000000\tpromoted\n")
    assert wal_chain.read_history_file(str(gz)) == [(1, 0x5000000, "promoted")]
    bad = tmp_path / "00000004.history"
    bad.write_text("1\t0/7000000\tok\nthis is not a history line\n")
    with pytest.raises(ValueError, match="line 2"):
        wal_chain.read_history_file(str(bad))


# ---------------------------------------------------------------- chain check

def test_chain_single_timeline_complete_across_log_boundary(tmp_path):
    touch(tmp_path, *[seg(1, n) for n in range(250, 262)])
    touch(tmp_path, ".%s.tmp.123" % seg(1, 262), "notes.txt", seg(1, 249) + ".00000028.backup")
    report = wal_chain.check_chain(str(tmp_path), seg(1, 250))
    assert report.ok and report.gaps == []
    assert (report.first, report.last) == ("0000000100000000000000FA", "000000010000000100000005")
    assert report.segments == 12 and report.timelines == [1]
    # A start later in the chain counts from there; older segments are not part of it.
    assert wal_chain.check_chain(str(tmp_path), seg(1, 255)).segments == 7


def test_chain_reports_gaps_precisely(tmp_path):
    touch(tmp_path, *[seg(1, n) for n in (3, 4, 8, 9, 11)])
    report = wal_chain.check_chain(str(tmp_path), seg(1, 2))
    assert not report.ok
    assert report.gaps == [(seg(1, 2), seg(1, 2)), (seg(1, 5), seg(1, 7)), (seg(1, 10), seg(1, 10))]
    assert (report.first, report.last, report.segments) == (seg(1, 3), seg(1, 11), 5)
    assert "BROKEN" in report.describe() and "000000010000000000000005..000000010000000000000007" in report.describe()


def test_chain_empty_archive(tmp_path):
    report = wal_chain.check_chain(str(tmp_path), seg(1, 4))
    assert not report.ok and report.segments == 0 and report.first is None and report.last is None
    assert report.gaps == [(seg(1, 4), seg(1, 4))]
    with pytest.raises(ValueError):
        wal_chain.check_chain(str(tmp_path), "00000001.history")


def test_chain_64mb_segments_and_gz(tmp_path):
    size = 64 * MB
    names = [wal_chain.segment_from_number(1, n, size) for n in range(60, 70)]
    touch(tmp_path, *names[:5])
    touch(tmp_path, *[n + ".gz" for n in names[5:]])
    report = wal_chain.check_chain(str(tmp_path), names[0], size)
    assert report.ok and report.last == "000000010000000100000005" and report.segments == 10


def write_history(directory, tli, lines):
    (directory / ("%08X.history" % tli)).write_text("".join("%d\t%s\treason\n" % line for line in lines))


def test_chain_follows_timeline_switch(tmp_path):
    # TLI 2 begins inside segment 7 (switch point 0/70000A0): TLI 1 serves 1..6, TLI 2 serves 7 onwards.
    write_history(tmp_path, 2, [(1, "0/70000A0")])
    touch(tmp_path, *[seg(1, n) for n in range(1, 7)])
    touch(tmp_path, seg(1, 7) + ".partial", *[seg(2, n) for n in range(7, 10)])
    report = wal_chain.check_chain(str(tmp_path), SEG1)
    assert report.ok, report
    assert (report.first, report.last, report.segments, report.timelines) == (SEG1, seg(2, 9), 9, [1, 2])
    # The old timeline's copy of the switch segment is not needed: recovery reads segment 7 from TLI 2.
    os.unlink(str(tmp_path / (seg(1, 7) + ".partial")))
    assert wal_chain.check_chain(str(tmp_path), SEG1).ok
    # The old timeline going on past the switch (its primary kept writing) is another branch: ignored.
    touch(tmp_path, seg(1, 7), seg(1, 8), seg(1, 12))
    report = wal_chain.check_chain(str(tmp_path), SEG1)
    assert report.ok and report.last == seg(2, 9)


def test_chain_timeline_switch_gaps(tmp_path):
    write_history(tmp_path, 2, [(1, "0/7000000")])
    touch(tmp_path, *[seg(1, n) for n in (1, 2, 3, 4)])
    touch(tmp_path, seg(1, 7) + ".partial", seg(2, 8), seg(2, 9))
    report = wal_chain.check_chain(str(tmp_path), SEG1)
    # Missing: TLI 1 segments 5-6 and TLI 2's first segment 7 (a .partial on TLI 1 cannot replace it).
    assert not report.ok and report.gaps == [(seg(1, 5), seg(2, 7))]
    touch(tmp_path, seg(1, 5), seg(1, 6))
    assert wal_chain.check_chain(str(tmp_path), SEG1).gaps == [(seg(2, 7), seg(2, 7))]
    touch(tmp_path, seg(2, 7))
    assert wal_chain.check_chain(str(tmp_path), SEG1).ok


def test_chain_new_timeline_with_nothing_archived_yet(tmp_path):
    write_history(tmp_path, 2, [(1, "0/4000100")])
    touch(tmp_path, seg(1, 1), seg(1, 2), seg(1, 3), seg(1, 4) + ".partial")
    report = wal_chain.check_chain(str(tmp_path), SEG1)
    assert report.ok and report.last == seg(1, 4) + ".partial" and report.segments == 4
    assert report.timelines == [1, 2]


def test_chain_several_switches_and_unreachable_timeline(tmp_path):
    write_history(tmp_path, 2, [(1, "0/5000000")])
    write_history(tmp_path, 3, [(1, "0/5000000"), (2, "0/8000028")])
    # TLI 4 branched from TLI 1 at segment 2, before the start: recovery from segment 3 cannot follow it.
    write_history(tmp_path, 4, [(1, "0/2000000")])
    touch(tmp_path, *[seg(1, n) for n in range(1, 5)])
    touch(tmp_path, *[seg(2, n) for n in range(5, 9)])
    touch(tmp_path, *[seg(3, n) for n in range(8, 11)])
    touch(tmp_path, *[seg(4, n) for n in range(2, 20)])
    report = wal_chain.check_chain(str(tmp_path), seg(1, 3))
    assert report.ok, report
    assert (report.last, report.segments, report.timelines) == (seg(3, 10), 8, [1, 2, 3])
    # From segment 1 TLI 4 is reachable (it branched at 2) and, being the highest, wins.
    report = wal_chain.check_chain(str(tmp_path), SEG1)
    assert report.ok and report.timelines == [1, 4] and report.last == seg(4, 19)
    # A start on TLI 2 follows TLI 3, not TLI 4.
    report = wal_chain.check_chain(str(tmp_path), seg(2, 6))
    assert report.ok and report.timelines == [2, 3] and report.segments == 5


def test_archive_segments_lists_only_wal_members(tmp_path):
    wanted = [seg(1, 1), seg(1, 2) + ".gz", seg(1, 3) + ".partial", "00000002.history",
              seg(1, 1) + ".00000028.backup"]
    touch(tmp_path, *wanted)
    touch(tmp_path, "." + seg(1, 4) + ".tmp.77", "README", seg(1, 5) + ".tmp", "0000000100000000000000ZZ")
    os.mkdir(str(tmp_path / "subdir"))
    assert wal_chain.archive_segments(str(tmp_path)) == sorted(wanted)


# ---------------------------------------------------------------- prune plan

def test_prune_plan():
    label_old, label_kept, label_needed = (seg(1, 2) + ".00000028.backup", seg(1, 3) + ".00000060.backup",
                                           seg(2, 4) + ".00000028.backup")
    names = ([seg(1, n) for n in range(1, 6)] + [seg(1, 2) + ".gz", seg(1, 3) + ".partial",
             seg(1, 3) + ".partial.gz", label_old, label_kept, label_needed, "00000001.history",
             "00000002.history", seg(2, 3), seg(2, 4), seg(2, 5), seg(3, 2), "README", "." + seg(1, 1) + ".tmp.5"])
    plan = wal_chain.wal_prune_plan(names, seg(2, 4), keep={label_kept})
    assert plan == sorted([seg(1, 1), seg(1, 2), seg(1, 3), seg(1, 2) + ".gz", seg(1, 3) + ".partial",
                           seg(1, 3) + ".partial.gz", label_old, seg(2, 3)])
    # Never: the needed segment, anything newer, history files, kept labels, higher timelines, strangers.
    for name in (seg(2, 4), seg(2, 5), seg(1, 4), seg(1, 5), "00000001.history", label_kept, label_needed,
                 seg(3, 2), "README"):
        assert name not in plan
    assert wal_chain.wal_prune_plan(names, seg(1, 1)) == []
    with pytest.raises(ValueError):
        wal_chain.wal_prune_plan(names, "00000002.history")


def test_apply_prune(tmp_path):
    touch(tmp_path, seg(1, 1), seg(1, 2), seg(1, 3))
    assert wal_chain.apply_prune(str(tmp_path), [seg(1, 1), seg(1, 2), seg(1, 9)]) == 2
    assert listing(tmp_path) == [seg(1, 3)]
    for bad in ("../x", "", "..", "sub/" + seg(1, 3)):
        with pytest.raises(ValueError):
            wal_chain.apply_prune(str(tmp_path), [bad])
    assert listing(tmp_path) == [seg(1, 3)]


def test_ready_backlog(tmp_path):
    status = tmp_path / "pg_wal" / "archive_status"
    status.mkdir(parents=True)
    touch(status, seg(1, 1) + ".done", seg(1, 2) + ".ready", seg(1, 3) + ".ready", "00000002.history.ready")
    assert wal_chain.ready_backlog(str(tmp_path)) == 3
    old = tmp_path / "old"
    (old / "pg_xlog" / "archive_status").mkdir(parents=True)
    touch(old / "pg_xlog" / "archive_status", seg(1, 1) + ".ready")
    assert wal_chain.ready_backlog(str(old)) == 1
    with pytest.raises(FileNotFoundError):
        wal_chain.ready_backlog(str(tmp_path / "nowhere"))


def test_wait_for_file(tmp_path):
    started = time.monotonic()
    assert not wal_chain.wait_for_file(str(tmp_path), seg(1, 1), timeout=0.3, poll=0.05)
    assert 0.3 <= time.monotonic() - started < 2
    timer = threading.Timer(0.2, touch, (tmp_path, seg(1, 1)))
    timer.start()
    try:
        assert wal_chain.wait_for_file(str(tmp_path), seg(1, 1), timeout=10, poll=0.05)
    finally:
        timer.join()
    touch(tmp_path, seg(1, 2) + ".gz")
    assert wal_chain.wait_for_file(str(tmp_path), seg(1, 2), timeout=0)


# ---------------------------------------------------------------- archive-push CLI

@pytest.fixture
def dirs(tmp_path):
    src, archive = tmp_path / "pgdata" / "pg_wal", tmp_path / "archive"
    src.mkdir(parents=True)
    archive.mkdir()
    return tmp_path / "pgdata", src, archive


def write_random(path, size):
    with open(str(path), "wb") as handle:
        handle.write(os.urandom(size))
    return path.read_bytes()


def test_push_then_identical_push(dirs):
    pgdata, src, archive = dirs
    data = write_random(src / SEG1, 16 * MB)
    result = run_wal("archive-push", "pg_wal/" + SEG1, archive, cwd=pgdata)  # %p is relative to the data dir
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert (archive / SEG1).read_bytes() == data
    assert os.stat(str(archive / SEG1)).st_mode & 0o777 == 0o600
    assert listing(archive) == [SEG1]
    result = run_wal("archive-push", src / SEG1, archive)
    assert result.returncode == 0
    assert "wal.py archive-push: already archived, identical" in result.stderr
    assert listing(archive) == [SEG1]


def test_push_refuses_different_content(dirs):
    _pgdata, src, archive = dirs
    write_random(src / SEG1, 1 * MB)
    assert run_wal("archive-push", src / SEG1, archive).returncode == 0
    original = (archive / SEG1).read_bytes()
    mtime = os.stat(str(archive / SEG1)).st_mtime_ns
    for size in (1 * MB, 2 * MB):  # same size with other bytes, and another size
        write_random(src / SEG1, size)
        result = run_wal("archive-push", src / SEG1, archive)
        assert result.returncode == 1
        assert "DIFFERENT content" in result.stderr and "not overwriting" in result.stderr
        assert (archive / SEG1).read_bytes() == original
        assert os.stat(str(archive / SEG1)).st_mtime_ns == mtime
        assert listing(archive) == [SEG1]


def test_push_compares_with_gz_copy(dirs):
    _pgdata, src, archive = dirs
    data = write_random(src / SEG1, 100000)
    with gzip.open(str(archive / (SEG1 + ".gz")), "wb") as handle:
        handle.write(data)
    result = run_wal("archive-push", src / SEG1, archive)
    assert result.returncode == 0 and "identical" in result.stderr
    write_random(src / SEG1, 100000)
    assert run_wal("archive-push", src / SEG1, archive).returncode == 1
    assert listing(archive) == [SEG1 + ".gz"]


def test_push_missing_source_or_archive_dir(dirs):
    _pgdata, src, archive = dirs
    result = run_wal("archive-push", src / SEG1, archive)
    assert result.returncode == 1 and "source file not found" in result.stderr
    assert listing(archive) == []
    write_random(src / SEG1, 1000)
    missing = archive / "not-mounted"
    result = run_wal("archive-push", src / SEG1, missing)
    assert result.returncode == 1 and "does not exist" in result.stderr
    assert not missing.exists()  # never created: an unmounted share must not become a local directory


def test_push_history_backup_and_partial_files(dirs):
    _pgdata, src, archive = dirs
    names = ["00000002.history", seg(1, 2) + ".00000028.backup", seg(1, 7) + ".partial"]
    for name in names:
        data = write_random(src / name, 3000)
        assert run_wal("archive-push", src / name, archive).returncode == 0
        assert (archive / name).read_bytes() == data
    assert listing(archive) == sorted(names)
    assert run_wal("archive-push", src / "..", archive).returncode == 1


def dead_pid():
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_push_removes_stale_temp_files(dirs):
    _pgdata, src, archive = dirs
    data = write_random(src / SEG1, 2 * MB)
    dead = archive / (".%s.tmp.%d" % (SEG1, dead_pid()))
    old_live = archive / (".%s.tmp.%d" % (SEG1, os.getppid()))
    young_live = archive / (".%s.tmp.%d" % (SEG1, os.getpid()))
    garbage = archive / (".%s.tmp.notapid" % SEG1)
    other_segment = archive / (".%s.tmp.1" % seg(1, 2))
    for path in (dead, old_live, young_live, garbage, other_segment):
        path.write_bytes(b"half a segment")
    an_hour_ago = time.time() - 3600
    os.utime(str(old_live), (an_hour_ago, an_hour_ago))
    result = run_wal("archive-push", src / SEG1, archive)
    assert result.returncode == 0, result.stderr
    assert (archive / SEG1).read_bytes() == data
    # Gone: dead pid, older than 10 minutes, unparsable. Kept: a live concurrent push, another segment's.
    assert listing(archive) == sorted([SEG1, young_live.name, other_segment.name])


def open_fifo_writer(path, timeout=20):
    """Open the FIFO for writing once the push has opened it for reading (ENXIO until then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(str(path), os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_push_killed_midway_then_retry(dirs, signum):
    _pgdata, src, archive = dirs
    fifo = src / SEG1
    os.mkfifo(str(fifo))
    push = subprocess.Popen([PYTHON, WAL_PY, "archive-push", str(fifo), str(archive)], stderr=subprocess.PIPE)
    temp = archive / (".%s.tmp.%d" % (SEG1, push.pid))
    fd = open_fifo_writer(fifo)
    try:
        os.write(fd, os.urandom(3 * MB))  # the push writes in 1 MB chunks and then waits for more
        deadline = time.monotonic() + 20
        while not (temp.exists() and temp.stat().st_size >= MB):
            assert time.monotonic() < deadline, "the push never started copying"
            time.sleep(0.02)
        push.send_signal(signum)
        push.wait(timeout=20)
    finally:
        os.close(fd)
        push.stderr.close()
    assert push.returncode == -signum  # died by the signal, as PostgreSQL expects
    assert not (archive / SEG1).exists()
    # SIGKILL leaves the temp file behind (the retry removes it); SIGTERM is caught and cleans up.
    assert listing(archive) == ([temp.name] if signum == signal.SIGKILL else [])
    os.unlink(str(fifo))
    data = write_random(src / SEG1, 16 * MB)
    result = run_wal("archive-push", src / SEG1, archive)
    assert result.returncode == 0, result.stderr
    assert (archive / SEG1).read_bytes() == data
    assert listing(archive) == [SEG1]


@pytest.mark.parametrize("same", [True, False])
def test_push_loses_race_without_clobbering(dirs, same):
    """Another push publishes the same name while ours is copying: os.link must not replace it."""
    _pgdata, src, archive = dirs
    fifo = src / SEG1
    os.mkfifo(str(fifo))
    data = os.urandom(2 * MB)
    push = subprocess.Popen([PYTHON, WAL_PY, "archive-push", str(fifo), str(archive)],
                            stderr=subprocess.PIPE, text=True)
    fd = open_fifo_writer(fifo)
    try:
        os.write(fd, data)  # returns once the push has read nearly all of it: its existence check is behind it
        winner = data if same else os.urandom(2 * MB)
        (archive / SEG1).write_bytes(winner)
    finally:
        os.close(fd)
    _out, err = push.communicate(timeout=30)
    assert push.returncode == (0 if same else 1), err
    assert ("already archived, identical" if same else "DIFFERENT content") in err
    assert (archive / SEG1).read_bytes() == winner
    assert listing(archive) == [SEG1]


def test_push_full_disk(dirs):
    _pgdata, src, archive = dirs
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(archive)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount tmpfs here: %s" % mounted.stdout.strip())
    try:
        data = write_random(src / SEG1, 16 * MB)
        result = run_wal("archive-push", src / SEG1, archive)
        assert result.returncode == 1
        assert "wal.py archive-push: no space left on device: %s" % archive in result.stderr
        assert listing(archive) == []  # no final file, no temp file
        subprocess.run(["mount", "-o", "remount,size=32m", str(archive)], check=True)
        result = run_wal("archive-push", src / SEG1, archive)
        assert result.returncode == 0, result.stderr
        assert (archive / SEG1).read_bytes() == data and listing(archive) == [SEG1]
    finally:
        subprocess.run(["umount", str(archive)], check=True)


# ---------------------------------------------------------------- archive-get CLI

def test_get_present_missing_and_gz(dirs):
    pgdata, _src, archive = dirs
    data = write_random(archive / SEG1, 16 * MB)
    (pgdata / "pg_wal" / "RECOVERYXLOG").write_bytes(b"left over")
    result = run_wal("archive-get", SEG1, "pg_wal/RECOVERYXLOG", archive, cwd=pgdata)
    assert result.returncode == 0, result.stderr
    assert (pgdata / "pg_wal" / "RECOVERYXLOG").read_bytes() == data
    assert listing(pgdata / "pg_wal") == ["RECOVERYXLOG"]

    result = run_wal("archive-get", seg(1, 2), "pg_wal/RECOVERYXLOG2", archive, cwd=pgdata)
    assert result.returncode == 1
    assert result.stderr.strip() == "wal.py archive-get: not in archive: %s" % seg(1, 2)
    assert not (pgdata / "pg_wal" / "RECOVERYXLOG2").exists()

    history = b"1\t0/5000000\tno recovery target specified\n"
    with gzip.open(str(archive / "00000002.history.gz"), "wb") as handle:
        handle.write(history)
    result = run_wal("archive-get", "00000002.history", "pg_wal/RECOVERYHISTORY", archive, cwd=pgdata)
    assert result.returncode == 0, result.stderr
    assert (pgdata / "pg_wal" / "RECOVERYHISTORY").read_bytes() == history


def test_get_real_errors_abort_recovery(dirs):
    pgdata, _src, archive = dirs
    target = pgdata / "pg_wal" / "RECOVERYXLOG"
    (archive / (SEG1 + ".gz")).write_bytes(gzip.compress(os.urandom(200000))[:-100])  # truncated
    (archive / seg(1, 2)).mkdir()  # present but unreadable as a file
    cases = [
        (["archive-get", SEG1, target, archive], "cannot restore"),
        (["archive-get", seg(1, 2), target, archive], "cannot restore"),
        (["archive-get", seg(1, 3), target, archive / "not-mounted"], "not available"),
        (["archive-get", seg(1, 3), pgdata / "no-such-dir" / "RECOVERYXLOG", archive], None),
        (["archive-get", "pg_wal/RECOVERYXLOG", SEG1, archive], "bad file name"),  # arguments swapped
        (["archive-get", SEG1, target], None),  # usage error
    ]
    write_random(archive / seg(1, 3), 1000)
    for args, message in cases:
        result = run_wal(*args)
        assert result.returncode == wal.EXIT_ABORT_RECOVERY == 200, (args, result.stderr)
        assert message is None or message in result.stderr
    assert listing(pgdata / "pg_wal") == []  # nothing restored, no temp files left


def test_help():
    result = run_wal("--help")
    assert result.returncode == 0
    assert "archive-push" in result.stdout and "archive-get" in result.stdout
    assert run_wal("archive-push", "only-one-arg").returncode == 2


@pytest.mark.parametrize("argv", [
    ["archive-get", "000000010000000000000003", "pg_wal/RECOVERYXLOG", "/backups/pg_wal"],
    ["archive-get", "00000002.history", "pg_wal/RECOVERYHISTORY", "/a dir/with spaces"],
    ["archive-push", "pg_wal/000000010000000000000003", "/backups/pg_wal"],
    ["archive-push", "--gzip", "pg_wal/000000010000000000000003", "/backups/pg_wal"],
])
def test_the_commands_postgresql_runs_parse_without_argparse_as_argparse_would(argv):
    quick = wal._plain_args(argv)
    assert quick is not None
    assert vars(quick) == vars(wal._parser().parse_args(argv))
    assert "argparse" not in subprocess.run(
        [sys.executable, "-c", "import sys, wal; wal._plain_args(sys.argv[1:]); print(' '.join(sys.modules))"]
        + argv, cwd=os.path.dirname(wal.__file__), stdout=subprocess.PIPE, text=True, check=True).stdout.split()


@pytest.mark.parametrize("argv", [[], ["--help"], ["archive-get", "a", "b"], ["archive-get", "a", "b", "c", "d"],
                                  ["archive-push", "--gzip", "--gzip", "p", "d"], ["archive-get", "-x", "p", "d"],
                                  ["archive-push", "p"], ["archive-get", "", "p", "d"], ["other", "a", "b"]])
def test_any_other_argument_list_is_left_to_argparse(argv):
    assert wal._plain_args(argv) is None


def find_python38():
    """A working Python 3.8 interpreter (pyenv shims may exist without one), or None."""
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8")))
    candidates += [shutil.which("python3.8")] if shutil.which("python3.8") else []
    for candidate in candidates:
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 8))"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return candidate
    return None


def test_runs_on_python38(dirs):
    python38 = find_python38()
    if not python38:
        pytest.skip("no python3.8 interpreter found")
    pgdata, src, archive = dirs
    data = write_random(src / SEG1, 1 * MB)
    assert run_wal("archive-push", src / SEG1, archive, python=python38).returncode == 0
    result = run_wal("archive-get", SEG1, "pg_wal/RECOVERYXLOG", archive, cwd=pgdata, python=python38)
    assert result.returncode == 0, result.stderr
    assert (pgdata / "pg_wal" / "RECOVERYXLOG").read_bytes() == data
    check = subprocess.run([python38, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import wal_chain; "
                            "print(wal_chain.check_chain(sys.argv[2], sys.argv[3]).ok)",
                            os.path.dirname(WAL_PY), str(archive), SEG1],
                           capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == "True", check.stderr


# ---------------------------------------------------------------- real PostgreSQL

def test_real_server_archives_a_continuous_chain(sandbox):
    archive = sandbox.wal_archive_dir
    # Make sure the current segment holds WAL, so that the switch below really closes it.
    sandbox.psql("SELECT pg_logical_emit_message(false, 'test_wal', 'x')", db="postgres", user="postgres")
    current = sandbox.psql("SELECT pg_walfile_name(pg_current_wal_lsn())", user="postgres").strip()
    sandbox.psql("SELECT pg_switch_wal()", user="postgres")
    assert wal_chain.wait_for_file(archive, current, timeout=60), "server never archived %s" % current
    first = [n for n in wal_chain.archive_segments(archive) if wal.is_segment_name(n)][0]
    report = wal_chain.check_chain(archive, first)
    assert report.ok, report.describe()
    assert wal_chain.segment_number(report.last) >= wal_chain.segment_number(current)
    # Once the archiver has caught up, no .ready file is left in pg_wal/archive_status.
    deadline = time.monotonic() + 30
    while wal_chain.ready_backlog(sandbox.pgdata) != 0:
        assert time.monotonic() < deadline, "archive_status still has .ready files"
        time.sleep(0.1)
    # Our name math agrees with the server's.
    tli = wal.parse_segment_name(current)[0]
    for lsn in ("0/1", "0/1000000", "0/1000001", "0/FFFFFFFF", "1/0", "1/A8000060", "2A/FF000000"):
        server = sandbox.psql("SELECT pg_walfile_name('%s')" % lsn, user="postgres").strip()
        assert server == wal_chain.segment_name(tli, lsn, prev=True), lsn


def test_archive_push_gzip_stores_segments_compressed_and_get_restores_them(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    segment = tmp_path / "000000010000000000000007"
    segment.write_bytes(b"WAL" + b"\0" * (16 * 1024 * 1024 - 3))  # a forced switch: mostly zeros
    history = tmp_path / "00000002.history"
    history.write_text("1\t0/7000000\tno recovery target specified\n")
    for source in (segment, history):
        result = subprocess.run([PYTHON, WAL_PY, "archive-push", "--gzip", str(source), str(archive)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    names = sorted(os.listdir(archive))
    assert names == ["000000010000000000000007.gz", "00000002.history"]  # history files stay readable
    assert os.path.getsize(archive / "000000010000000000000007.gz") < 100 * 1024
    again = subprocess.run([PYTHON, WAL_PY, "archive-push", "--gzip", str(segment), str(archive)],
                           capture_output=True, text=True)
    assert again.returncode == 0 and "identical" in again.stderr
    plain_again = subprocess.run([PYTHON, WAL_PY, "archive-push", str(segment), str(archive)],
                                 capture_output=True, text=True)
    assert plain_again.returncode == 0 and "identical" in plain_again.stderr
    target = tmp_path / "restored"
    got = subprocess.run([PYTHON, WAL_PY, "archive-get", "000000010000000000000007", str(target),
                          str(archive)], capture_output=True, text=True)
    assert got.returncode == 0 and target.read_bytes() == segment.read_bytes()
    report = wal_chain.check_chain(str(archive), "000000010000000000000007")
    assert report.ok and report.last == "000000010000000000000007"
