"""tar_io: reading pg_basebackup's tars whatever their compression, also while they are being written."""

import io
import os
import subprocess
import tarfile
import threading
import time

import pytest
import tar_extract
import tar_io


def make_tar_bytes(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


MEMBERS = {"backup_label": b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n",
           "base/1/1234": os.urandom(300000), "global/pg_control": b"\0" * 8192}


def compressed(data, ext):
    if ext == "":
        return data
    tool = {".gz": ["gzip", "-c"], ".zst": ["zstd", "-q", "-c"], ".lz4": ["lz4", "-q", "-c"]}[ext]
    return subprocess.run(tool, input=data, stdout=subprocess.PIPE, check=True).stdout


def slow_writer(path, data, finished, chunk=4096):
    def write():
        with open(path, "wb") as handle:
            for start in range(0, len(data), chunk):
                handle.write(data[start:start + chunk])
                handle.flush()
                time.sleep(0.001)
        finished.set()

    thread = threading.Thread(target=write)
    thread.start()
    return thread


@pytest.mark.parametrize("ext", ["", ".gz", ".zst", ".lz4"])
def test_scan_while_written_equals_a_scan_afterwards(tmp_path, ext):
    path = str(tmp_path / ("base.tar" + ext))
    data = compressed(make_tar_bytes(MEMBERS), ext)
    finished = threading.Event()
    writer = slow_writer(path, data, finished)
    result = tar_io.scan_while_written(path, ("backup_label",), finished)
    writer.join()
    assert result is not None
    assert result == tar_io.scan(path, ("backup_label",))
    assert result[0]["base/1/1234"] == 300000 and result[1]["backup_label"] == MEMBERS["backup_label"]


@pytest.mark.parametrize("ext", ["", ".zst"])
def test_a_file_cut_short_when_the_writer_ends_is_an_error(tmp_path, ext):
    path = str(tmp_path / ("base.tar" + ext))
    data = compressed(make_tar_bytes(MEMBERS), ext)
    finished = threading.Event()
    writer = slow_writer(path, data[: len(data) // 2], finished)
    with pytest.raises(tar_io.TarError):
        tar_io.scan_while_written(path, ("backup_label",), finished)
    writer.join()


def test_a_file_that_never_appears_gives_none(tmp_path):
    finished = threading.Event()
    threading.Timer(0.2, finished.set).start()
    assert tar_io.scan_while_written(str(tmp_path / "base.tar.zst"), (), finished) is None


def test_a_file_rewritten_behind_the_reader_gives_none(tmp_path):
    """When the final file is not what was read (the writer seeked back, or appended after finishing),
    the caller must read it again."""
    path = str(tmp_path / "base.tar")
    data = make_tar_bytes(MEMBERS)
    finished = threading.Event()
    writer = slow_writer(path, data, finished)
    result = {}
    reader = threading.Thread(target=lambda: result.update(scan=tar_io.scan_while_written(path, (), finished)))
    reader.start()
    writer.join()
    reader.join()
    with open(path, "ab") as handle:
        handle.write(b"\0" * 10240)  # grew after the reader was done
    assert result["scan"] is not None  # what it read was whole at the time...
    assert os.path.getsize(path) != len(data)  # ...and a later size check would notice the change


@pytest.mark.parametrize("splice", [True, False], ids=["spliced", "read"])
def test_member_data_skipped_by_splice_or_by_reading_gives_the_same_scan(tmp_path, monkeypatch, splice):
    """From a pipe (zstd -dc) member data the scan only counts goes straight to /dev/null with os.splice
    where it exists; reading it into a buffer instead must give the same answer, and both must notice a cut."""
    members = dict(MEMBERS, **{"base/1/%d" % n: os.urandom(700000 + n) for n in range(4)})
    whole = make_tar_bytes(members)
    path = str(tmp_path / "base.tar.zst")
    with open(path, "wb") as handle:
        handle.write(compressed(whole, ".zst"))
    spliced = []
    if splice:
        if not hasattr(os, "splice"):
            pytest.skip("os.splice needs Python 3.10+ on Linux")
        real = os.splice
        monkeypatch.setattr(os, "splice", lambda *a: spliced.append(a[2]) or real(*a))
    else:
        monkeypatch.setattr(tar_io, "_splice_source", lambda raw: None)
    sizes, contents = tar_io.scan(path, ("backup_label",))
    assert sizes == {name: len(data) for name, data in members.items()}
    assert contents == {"backup_label": MEMBERS["backup_label"]}
    assert bool(spliced) == splice
    with open(path, "wb") as handle:
        handle.write(compressed(whole[: len(whole) // 2], ".zst"))
    with pytest.raises(tar_io.TarError):
        tar_io.scan(path)


@pytest.mark.parametrize("ext", ["", ".gz", ".zst"])
def test_a_tar_cut_exactly_after_a_member_is_truncated_not_complete(tmp_path, ext):
    whole = make_tar_bytes(MEMBERS)
    # Everything up to and including the last member's data, without the zero blocks at the end.
    last = list(tarfile.open(fileobj=io.BytesIO(whole)))[-1]
    cut = whole[: last.offset_data + (last.size + 511) // 512 * 512]
    path = str(tmp_path / ("base.tar" + ext))
    with open(path, "wb") as handle:
        handle.write(compressed(cut, ext))
    with pytest.raises(tar_io.TarError, match="end-of-archive marker"):
        tar_io.scan(path)
    with open(path, "wb") as handle:
        handle.write(compressed(whole, ext))
    assert set(tar_io.list_members(path)) == set(MEMBERS)


# ---- hostile archives (issue 10, point 1): what a base backup never holds is refused ------------------------

def hostile_tar(path, members, ext=".zst"):
    """Write a tar of ``members``: (name, kind, payload) with kind 'file' (bytes), 'dir', 'sym' (link target),
    'hard' (link target), 'fifo', or ('file', bytes, mode)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, kind, payload, *rest in members:
            info = tarfile.TarInfo(name)
            info.mode = rest[0] if rest else (0o700 if kind == "dir" else 0o600)
            data = None
            if kind == "file":
                info.size, data = len(payload), io.BytesIO(payload)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind in ("sym", "hard"):
                info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                info.linkname = payload
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            archive.addfile(info, data)
    with open(path, "wb") as handle:
        handle.write(compressed(buffer.getvalue(), ext))
    return path


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim"
    path.write_bytes(b"precious\n")
    return path


def test_a_hard_link_resolved_against_the_root_cannot_overwrite_a_file_outside(tmp_path, victim):
    dest = tmp_path / "deep" / "dest"
    dest.mkdir(parents=True)
    # tarfile resolves a hard link's target against the extraction root: d/x -> ../../victim is outside,
    # although seen from d/ it looks like dest/victim.
    tar = hostile_tar(str(tmp_path / "base.tar.zst"), [
        ("d", "dir", None), ("d/x", "hard", "../../victim"), ("d/x", "file", b"OVERWRITTEN")])
    with pytest.raises(tar_io.TarError, match="hard link"):
        tar_extract.extract(tar, str(dest))
    assert victim.read_bytes() == b"precious\n"


@pytest.mark.parametrize("wal_dir", ["pg_wal", "pg_xlog"])
def test_a_wal_directory_that_is_a_link_is_refused(tmp_path, wal_dir):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    tar = hostile_tar(str(tmp_path / "base.tar"), [("PG_VERSION", "file", b"15\n"), (wal_dir, "sym", str(outside))],
                      ext="")
    with pytest.raises(tar_io.TarError, match="%s is a symbolic link" % wal_dir):
        tar_extract.extract(tar, str(dest))
    assert not os.path.lexists(dest / wal_dir)


def test_absolute_links_only_as_tablespaces_and_relative_links_stay_inside(tmp_path, victim):
    dest = tmp_path / "dest"
    dest.mkdir()
    ok = hostile_tar(str(tmp_path / "ok.tar.gz"), [
        ("pg_tblspc", "dir", None), ("pg_tblspc/16384", "sym", "/srv/tablespaces/ts1"),
        ("conf", "dir", None), ("conf/link", "sym", "../PG_VERSION"), ("PG_VERSION", "file", b"15\n")], ext=".gz")
    tar_extract.extract(ok, str(dest))
    assert os.readlink(dest / "pg_tblspc" / "16384") == "/srv/tablespaces/ts1"
    assert (dest / "conf" / "link").read_bytes() == b"15\n"
    for i, members in enumerate([
            [("postgresql.auto.conf", "sym", str(victim))],  # absolute, not a tablespace
            [("conf", "dir", None), ("conf/up", "sym", "../../victim")],  # relative, leaves the tree
            [("esc", "sym", ".."), ("esc/victim", "file", b"OVERWRITTEN")],  # a file through a link
            [("pg_tblspc", "dir", None), ("pg_tblspc/1", "sym", str(tmp_path)),
             ("pg_tblspc/1/victim", "file", b"OVERWRITTEN")]]):  # a file through a tablespace link
        target = tmp_path / ("dest%d" % i)
        target.mkdir()
        with pytest.raises(tar_io.TarError, match="outside|absolute path"):
            tar_extract.extract(hostile_tar(str(tmp_path / ("bad%d.tar" % i)), members, ext=""), str(target))
    assert victim.read_bytes() == b"precious\n"


def test_setuid_bits_are_dropped_and_devices_refused(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    tar = hostile_tar(str(tmp_path / "base.tar"), [("bin", "file", b"#!/bin/sh\n", 0o6777),
                                                  ("dir", "dir", None, 0o3777)], ext="")
    tar_extract.extract(tar, str(dest))
    assert oct(os.stat(dest / "bin").st_mode & 0o7777) == oct(0o755)
    assert oct(os.stat(dest / "dir").st_mode & 0o7777) == oct(0o755)
    other = tmp_path / "dest2"
    other.mkdir()
    with pytest.raises(tar_io.TarError, match="device or FIFO"):
        tar_extract.extract(hostile_tar(str(tmp_path / "fifo.tar"), [("pipe", "fifo", None)], ext=""), str(other))
    assert not os.path.lexists(other / "pipe")


def test_a_real_base_backup_still_extracts(tmp_path):
    tar = hostile_tar(str(tmp_path / "base.tar.lz4"), [(n, "file", d) for n, d in MEMBERS.items()], ext=".lz4")
    dest = tmp_path / "dest"
    dest.mkdir()
    tar_extract.extract(tar, str(dest))
    for name, data in MEMBERS.items():
        assert (dest / name).read_bytes() == data


# ---- extraction in one pass with digests (issue 13: restore time) -----------------------------------------

@pytest.mark.parametrize("ext", ["", ".gz", ".zst", ".lz4"])
def test_extract_returns_each_files_digest_and_writes_it_exactly(tmp_path, ext):
    import hashlib

    members = dict(MEMBERS, **{"base/1/empty": b"", "base/1/%d" % 512: os.urandom(512),
                               "base/1/big": os.urandom(3 * tar_io.BUFSIZE + 17)})
    path = str(tmp_path / ("base.tar" + ext))
    with open(path, "wb") as handle:
        handle.write(compressed(make_tar_bytes(members), ext))
    dest = tmp_path / "dest"
    dest.mkdir()
    digests = tar_extract.extract(path, str(dest), digest="sha256")
    assert digests == {name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in members.items()}
    for name, data in members.items():
        assert (dest / name).read_bytes() == data
    again = tmp_path / "again"
    again.mkdir()
    assert tar_extract.extract(path, str(again)) == {}


def test_writeback_asks_the_kernel_for_every_byte_written_and_changes_nothing_else(tmp_path, monkeypatch):
    import hashlib

    members = dict(MEMBERS, **{"base/1/empty": b"", "base/1/big": os.urandom(2 * tar_io.BUFSIZE + 5)})
    path = str(tmp_path / "base.tar.zst")
    with open(path, "wb") as handle:
        handle.write(compressed(make_tar_bytes(members), ".zst"))
    real = tar_extract._writeback_starter()
    assert real is not None  # Linux with glibc: sync_file_range is there
    asked = []

    def recording():
        def start(fd, offset, count):
            asked.append((os.readlink("/proc/self/fd/%d" % fd), offset, count))
            real(fd, offset, count)
        return start

    monkeypatch.setattr(tar_extract, "_writeback_starter", recording)
    dest = tmp_path / "dest"
    dest.mkdir()
    digests = tar_extract.extract(path, str(dest), digest="sha256", writeback=True)
    assert digests == {name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in members.items()}
    covered = {}
    for file_path, offset, count in asked:
        assert offset == covered.get(file_path, 0)  # in order, no gap, nothing twice
        covered[file_path] = offset + count
    assert covered == {str(dest / n): len(d) for n, d in members.items() if d}
    for name, data in members.items():
        assert (dest / name).read_bytes() == data
    asked.clear()
    plain = tmp_path / "plain"
    plain.mkdir()
    tar_extract.extract(path, str(plain), digest="sha256")
    assert asked == []  # only where asked for


@pytest.mark.parametrize("ext", ["", ".zst"])
def test_extract_refuses_a_tar_cut_short_or_without_its_end(tmp_path, ext):
    whole = make_tar_bytes(MEMBERS)
    last = list(tarfile.open(fileobj=io.BytesIO(whole)))[-1]
    for cut in (whole[: last.offset_data + (last.size + 511) // 512 * 512], whole[: last.offset_data + 100]):
        path = str(tmp_path / ("cut.tar" + ext))
        with open(path, "wb") as handle:
            handle.write(compressed(cut, ext))
        dest = tmp_path / ("dest-%d" % len(cut))
        dest.mkdir()
        with pytest.raises(tar_io.TarError, match="truncated|unexpected end"):
            tar_extract.extract(path, str(dest), digest="sha256")


def test_extract_keeps_file_modes_and_mtimes(tmp_path):
    tar = hostile_tar(str(tmp_path / "m.tar"), [("a/x", "file", b"x", 0o640), ("a/y", "file", b"yy", 0o700)], ext="")
    dest = tmp_path / "dest"
    dest.mkdir()
    tar_extract.extract(tar, str(dest))
    assert (dest / "a/x").stat().st_mode & 0o7777 == 0o640 and (dest / "a/y").stat().st_mode & 0o7777 == 0o700
    with tarfile.open(tar) as archive:
        assert int((dest / "a/x").stat().st_mtime) == archive.getmember("a/x").mtime
