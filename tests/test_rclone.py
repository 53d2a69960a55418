"""rclone.py: argv, JSON log parsing (rclone 1.60 and 1.75 line shapes), progress, per-file results."""

import json
import logging
import os
import stat
import types

import pytest
import rclone


def cfg(tmp_path, **extra):
    values = {"OFFSITE_REMOTE": "s3x:bucket/prod/", "OFFSITE_RCLONE_CONFIG": str(tmp_path / "rclone.conf"),
              "OFFSITE_RCLONE": "", "OFFSITE_TRANSFERS": 4, "OFFSITE_BWLIMIT": "", "OFFSITE_TIMEOUT": 0}
    values.update(extra)
    return types.SimpleNamespace(**values)


def test_join_and_paths():
    assert rclone.join("s3:b/prod", "wal", "x.gz") == "s3:b/prod/wal/x.gz"
    assert rclone.join("crypt:", "content/", "/2024/1") == "crypt:content/2024/1"
    assert rclone.join("s3:b/prod/") == "s3:b/prod"


def test_argv_passes_the_config_file_never_keys_and_runs_with_a_clean_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leak")
    monkeypatch.setenv("RCLONE_CONFIG_S3X_SECRET_ACCESS_KEY", "leak")
    remote = rclone.Remote(cfg(tmp_path), logging.getLogger("t"))
    argv = remote.argv("copy", "a", "b")
    assert argv[1:3] == ["--config", str(tmp_path / "rclone.conf")] and "--use-json-log" in argv
    assert not [k for k in remote.env() if k.startswith(("AWS", "RCLONE"))]
    assert remote.path("wal") == "s3x:bucket/prod/wal"


def test_find_binary(tmp_path):
    fake = tmp_path / "rclone"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert rclone.find_binary(str(fake)) == str(fake)
    with pytest.raises(rclone.RcloneError, match="OFFSITE_RCLONE"):
        rclone.find_binary(str(tmp_path / "missing"))
    fake.chmod(stat.S_IRUSR)
    with pytest.raises(rclone.RcloneError):
        rclone.find_binary(str(fake))


NEW = ('{"time":"2026-12-01T19:25:22Z","level":"%s","msg":"%s","object":"%s","objectType":"*local.Object",'
       '"source":"x"}')
OLD = '{"level":"%s","msg":"%s","object":"%s","objectType":"*local.Object","source":"x","time":"2026-12-01"}'


@pytest.mark.parametrize("shape", [NEW, OLD])
@pytest.mark.parametrize("program", ["rclone", "rclone-v1.68.2"])  # OFFSITE_RCLONE may have any file name
def test_copy_log_reports_verified_files_with_their_hash_and_errors(shape, program, caplog):
    done = []
    sink = rclone._CopyLog(logging.getLogger("t"), lambda rel, md5, copied: done.append((rel, md5, copied)),
                           program)
    lines = [shape % ("debug", "Need to transfer - File not found at Destination", "a/f1.bin"),
             shape % ("debug", "md5 = cdacc38c66e98dd570bb92afd2bbecef OK", "a/f1.bin"),
             shape % ("info", "Copied (new)", "a/f1.bin"),
             shape % ("debug", "md5 = 53273e09404b70ad50066e2286d5a0ae OK", "a/f2.bin"),
             shape % ("debug", "Size and md5 of src and dst objects identical", "a/f2.bin"),
             shape % ("debug", "Unchanged skipping", "a/f2.bin"),
             shape % ("error", "Source and destination exist but do not match: immutable file modified", "a/f3.bin"),
             json.dumps({"level": "info", "msg": "stats", "stats": {"bytes": 1048576, "totalBytes": 4194304,
                                                                    "transfers": 1, "totalTransfers": 4,
                                                                    "speed": 524288.0, "eta": 6}})]
    with caplog.at_level(logging.INFO):
        for line in lines:
            sink.log(logging.INFO, "%s%s", program + ": ", line)
    assert done == [("a/f1.bin", "cdacc38c66e98dd570bb92afd2bbecef", True),
                    ("a/f2.bin", "53273e09404b70ad50066e2286d5a0ae", False)]
    assert sink.errors == {"a/f3.bin": "Source and destination exist but do not match: immutable file modified"}
    assert "off-site upload: 1/4 files, 1.0 MiB of 4.0 MiB, 512.0 KiB/s, ETA 00:00:06" in caplog.text
    assert "a/f3.bin failed" in caplog.text


def test_reason_reads_json_and_plain_fatal_lines():
    plain = ("2026/12/01 19:56:46 Failed to lsjson: RequestError: send request failed\n"
             "caused by: Get \"http://127.0.0.1:1/b\": dial tcp 127.0.0.1:1: connect: connection refused")
    assert rclone.rclone_reason(plain).endswith("connect: connection refused")
    assert rclone.rclone_reason(plain).startswith("Failed to lsjson")  # no time stamp: repeated errors compare equal
    assert "send request failed" in rclone.rclone_reason(plain)
    notice = json.dumps({"level": "notice", "msg": "Failed to lsjson: dial tcp: connection refused"})
    assert rclone.rclone_reason(notice) == "Failed to lsjson: dial tcp: connection refused"
    assert rclone.rclone_reason(json.dumps({"level": "debug", "msg": "x"})) == ""
    assert rclone.parse_line("") is None


def test_write_list_is_private(tmp_path):
    path = rclone.write_list(["a/b.bin", "c d/e.bin"], str(tmp_path))
    assert open(path).read() == "a/b.bin\nc d/e.bin\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
