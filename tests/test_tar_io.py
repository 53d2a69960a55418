"""tar_io: reading pg_basebackup's tars whatever their compression, also while they are being written."""

import io
import os
import subprocess
import tarfile
import threading
import time

import pytest
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
