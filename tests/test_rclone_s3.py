"""rclone.Remote against a real S3 server on loopback (``rclone serve s3``): what each listing and download
costs in requests, counted in the server's log, and that nothing is lost doing it cheaper."""

import collections
import logging
import os
import subprocess
import types

import pytest
import rclone
from s3server import BUCKET, rclone_binary

pytestmark = pytest.mark.slow


@pytest.fixture
def remote_with_files(s3, tmp_path):
    """(Remote, {rel: (bytes, mtime)}): 150 small files in 40 Alfresco-like minute directories under
    ``content/`` of the server, uploaded with a plain rclone copy. The Remote runs OFFSITE_TEST_RCLONE when set
    (e.g. /usr/bin/rclone, Debian's 1.60)."""
    src = tmp_path / "src"
    files = {}
    for i in range(150):
        rel = "2026/3/%d/10/%d/%08d-0000-0000-0000-000000000000.bin" % (1 + i % 4, i % 10, i)
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(100 + i)
        path.write_bytes(data)
        mtime = 1_700_000_000 + i * 60
        os.utime(path, (mtime, mtime))
        files[rel] = (data, mtime)
    remote = "s3test:%s/%s" % (BUCKET, s3.prefix)
    subprocess.run([rclone_binary(), "--config", s3.conf, "copy", str(src), remote + "/content"], check=True,
                   capture_output=True)
    cfg = types.SimpleNamespace(OFFSITE_REMOTE=remote, OFFSITE_RCLONE_CONFIG=s3.conf, OFFSITE_TRANSFERS=4,
                                OFFSITE_RCLONE=os.environ.get("OFFSITE_TEST_RCLONE") or rclone_binary(),
                                OFFSITE_BWLIMIT="", OFFSITE_TIMEOUT=0)
    return rclone.Remote(cfg, logging.getLogger("test")), files


def counted(s3, action):
    mark = s3.request_mark()
    result = action()
    return result, collections.Counter(op for op, _key in s3.requests()[mark:])


def test_a_recursive_listing_sends_lists_only(s3, remote_with_files):
    remote, files = remote_with_files
    items, ops = counted(s3, lambda: remote.lsjson("content", recursive=True, hashes=True))
    assert {i["Path"]: i["Size"] for i in items} == {rel: len(data) for rel, (data, _m) in files.items()}
    assert all(i["Hashes"]["md5"] for i in items)
    assert ops["HEAD OBJECT"] <= 1 and ops["LIST BUCKET"] >= 1, ops  # not one HEAD per object
    items, ops = counted(s3, lambda: remote.lsjson("content/2026/3/1/10/0", modtimes=True))
    assert items and all(i["ModTime"] for i in items) and ops["HEAD OBJECT"] >= len(items), ops


@pytest.mark.parametrize("count", [150, 5])
def test_a_download_is_whole_with_its_times_and_lists_only_when_it_pays(s3, remote_with_files, tmp_path, count):
    remote, files = remote_with_files
    wanted = sorted(files)[:count]
    dest = tmp_path / "dest"
    _result, ops = counted(s3, lambda: remote.download("content", str(dest), rels=wanted))
    got = sorted(os.path.relpath(os.path.join(d, f), dest) for d, _ds, names in os.walk(dest) for f in names)
    assert got == wanted
    for rel in wanted:
        assert (dest / rel).read_bytes() == files[rel][0]
        assert int((dest / rel).stat().st_mtime) == files[rel][1]
    assert ops["GET OBJECT"] == count, ops
    if count >= rclone.LIST_TO_DOWNLOAD_FROM:
        assert ops["HEAD OBJECT"] <= 1 and ops["LIST BUCKET"] <= 40 + 12, ops  # its directories, not a HEAD each
    else:
        assert ops["LIST BUCKET"] == 0 and ops["HEAD OBJECT"] >= count, ops  # a few files: a HEAD each
    # A rerun keeps what is there (same size and time) and downloads nothing.
    _result, ops = counted(s3, lambda: remote.download("content", str(dest), rels=wanted))
    assert ops["GET OBJECT"] == 0, ops
