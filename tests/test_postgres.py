"""Tests for postgres.py's pure parts: version numbers, the pg_basebackup plan, backup_label, the manifest
check, the backup-directory check on hand-built tar files, and find_bin_dir. No server is started."""

import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tarfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import base_backup  # noqa: E402
import matrix_pg  # noqa: E402
import pg_versions  # noqa: E402
import postgres  # noqa: E402
import tar_io  # noqa: E402
from postgres import PostgresError  # noqa: E402

V94, V95, V96, V10, V12, V13, V14, V15, V16 = 90426, 90526, 90624, 100023, 120022, 130018, 140015, 150018, 160002
# The system's PostgreSQL (15 on Debian 12, 17 on Debian 13): detected, not assumed.
SYSTEM_MAJOR = matrix_pg.system_major()
SYSTEM_BIN = matrix_pg.system_bin(SYSTEM_MAJOR) if SYSTEM_MAJOR else None


# --- version numbers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,num", [
    ("pg_basebackup (PostgreSQL) 15.18 (Debian 15.18-1.pgdg120+1)\n", 150018),
    ("pg_basebackup (PostgreSQL) 9.4.26\n", 90426),
    ("pg_basebackup (PostgreSQL) 10.23 (Ubuntu 10.23-1.pgdg20.04+1)", 100023),
    ("pg_basebackup (PostgreSQL) 16devel", 160000),
    ("pg_basebackup (PostgreSQL) 16.2", 160002),
    ("pg_basebackup (PostgreSQL) 9.6.24", 90624),
    ("9.4.26", 90426),
    ("15.18", 150018),
    ("12", 120000),
])
def test_parse_version_num(text, num):
    assert postgres.parse_version_num(text) == num


def test_parse_version_num_garbage():
    with pytest.raises(PostgresError):
        postgres.parse_version_num("pg_basebackup: command not found")


@pytest.mark.parametrize("num,label,major", [
    (90426, "9.4.26", 90400), (90500, "9.5.0", 90500), (100023, "10.23", 100000), (150018, "15.18", 150000),
    (160002, "16.2", 160000), (130000, "13.0", 130000)])
def test_version_label_and_major(num, label, major):
    assert postgres.version_label(num) == label
    assert postgres.major_of(num) == major


def test_version_label_round_trips_through_parse():
    for num in (90426, 90624, 100023, 120022, 150018, 160002):
        assert postgres.parse_version_num(postgres.version_label(num)) == num


def test_client_version_of_the_installed_tools():
    if not SYSTEM_BIN or not os.access(os.path.join(SYSTEM_BIN, "pg_basebackup"), os.X_OK):
        pytest.skip("no system PostgreSQL client tools installed (make deps)")
    path, num = postgres.client_version(SYSTEM_BIN, {"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    assert path == os.path.join(SYSTEM_BIN, "pg_basebackup")
    assert postgres.major_of(num) == pg_versions.major_from_label(SYSTEM_MAJOR)


def test_client_version_missing_tool_is_postgres_error(tmp_path):
    with pytest.raises(PostgresError):
        postgres.client_version(str(tmp_path), {"PATH": "/usr/bin:/bin"})


# --- basebackup_plan -------------------------------------------------------------------------------------

def plan(client, server, compression="gzip"):
    return postgres.basebackup_plan(client, server, compression, "alfresco-backup base-X")


def flag_value(args, flag):
    """The value after ``flag`` (``-F t``) in an argv list."""
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("client,server", [(V94, V95), (V94, V96), (V10, V12), (V14, V15), (V15, V16),
                                           (V96, V10)])
def test_client_older_than_server_is_refused(client, server):
    with pytest.raises(PostgresError) as info:
        plan(client, server)
    assert "older than the server" in str(info.value)
    assert postgres.version_label(client) in str(info.value)


def test_minor_versions_do_not_matter():
    # 15.2 client, 15.18 server: same major, allowed.
    assert plan(150002, 150018).wal_method == "stream"
    assert plan(90420, 90426).wal_method == "fetch"


@pytest.mark.parametrize("client", [V15, V16])
def test_new_client_cannot_take_tar_backups_of_94(client):
    with pytest.raises(PostgresError) as info:
        plan(client, V94)
    assert "9.4.26" in str(info.value) and "PG_BIN_DIR" in str(info.value)


def test_new_client_with_95_server_is_allowed():
    assert plan(V15, V95).wal_method == "stream"


@pytest.mark.parametrize("client,server", [(V94, V94), (V10, V10), (V13, V13), (V15, V15), (V16, V96),
                                           (V15, V12), (V16, V16)])
def test_always_tar_no_password_label_fast_checkpoint(client, server):
    result = plan(client, server)
    assert flag_value(result.args, "-F") == "t"
    assert "--no-password" in result.args
    assert "--label=alfresco-backup base-X" in result.args
    assert "--checkpoint=fast" in result.args
    assert flag_value(result.args, "-X") == result.wal_method
    assert not any(a.startswith("-D") for a in result.args)


def test_94_client_fetches_wal_and_uses_gzip():
    result = plan(V94, V94, "gzip")
    assert result.wal_method == "fetch"
    assert flag_value(result.args, "-X") == "fetch"
    assert "--gzip" in result.args
    assert not any(a.startswith("--compress") for a in result.args)
    assert not any(a.startswith("--manifest") for a in result.args)
    assert (result.compression, result.level, result.extension, result.notes) == ("gzip", None, ".gz", [])


def test_94_client_with_gzip_level_uses_numeric_compress():
    result = plan(V94, V94, "gzip:5")
    assert "--compress=5" in result.args
    assert "--gzip" not in result.args
    assert not any(a.startswith("--compress=client") for a in result.args)
    assert (result.compression, result.level, result.extension) == ("gzip", 5, ".gz")


@pytest.mark.parametrize("method", ["zstd", "lz4", "zstd:9"])
def test_94_client_asked_for_zstd_or_lz4_gets_gzip_and_a_note(method):
    result = plan(V94, V94, method)
    assert result.compression == "gzip" and result.extension == ".gz" and result.level is None
    assert "--gzip" in result.args
    assert not any("zstd" in a or "lz4" in a for a in result.args)
    assert len(result.notes) == 1 and method.split(":")[0] in result.notes[0] and "gzip" in result.notes[0]


@pytest.mark.parametrize("client", [V10, V12, V13, V14])
def test_10_to_14_stream_wal_and_use_old_compress_syntax(client):
    result = plan(client, V10, "gzip:6")
    assert result.wal_method == "stream" and flag_value(result.args, "-X") == "stream"
    assert "--compress=6" in result.args
    assert not any(a.startswith("--compress=client") for a in result.args)
    lz4 = plan(client, V10, "lz4")
    assert lz4.compression == "gzip" and "--gzip" in lz4.args and lz4.notes


@pytest.mark.parametrize("client", [V15, V16])
def test_15_plus_uses_client_side_compress_spec(client):
    # A 14 server cannot compress: the 15+ client does it, with the 15 --compress syntax.
    V15 = 140010  # noqa: N806  (the server of this test)
    zstd = plan(client, V15, "zstd:3")
    assert "--compress=client-zstd:level=3" in zstd.args
    assert (zstd.compression, zstd.level, zstd.extension, zstd.notes) == ("zstd", 3, ".zst", [])
    assert "--gzip" not in zstd.args
    lz4 = plan(client, V15, "lz4")
    assert "--compress=client-lz4" in lz4.args and lz4.extension == ".lz4"
    gzip = plan(client, V15, "gzip")
    assert "--compress=client-gzip" in gzip.args and gzip.extension == ".gz"
    gzip9 = plan(client, V15, "gzip:9")
    assert "--compress=client-gzip:level=9" in gzip9.args


@pytest.mark.parametrize("client,server,expected", [
    (V13, V13, True), (V14, V13, True), (V15, V15, True), (V16, V14, True),
    (V13, V12, False), (V15, V96, False), (V12, V12, False), (V94, V94, False), (V10, V10, False)])
def test_manifest_checksums_only_when_both_are_13_plus(client, server, expected):
    args = plan(client, server).args
    assert ("--manifest-checksums=SHA256" in args) is expected
    assert sum(a.startswith("--manifest") for a in args) == (1 if expected else 0)


@pytest.mark.parametrize("client", [V94, V10, V14, V15, V16])
def test_no_compression(client):
    server = V94 if client == V94 else V10
    result = plan(client, server, "none")
    assert result.extension == "" and result.compression == "none"
    assert not any(a.startswith("--compress") or a in ("--gzip", "-z", "-Z") for a in result.args)


@pytest.mark.parametrize("compression,ext", [("gzip", ".gz"), ("zstd", ".zst"), ("lz4", ".lz4"), ("none", ""),
                                             ("zstd:1", ".zst"), ("gzip:1", ".gz")])
def test_extension_follows_method_on_15(compression, ext):
    assert plan(V15, V15, compression).extension == ext


# --- backup_label ----------------------------------------------------------------------------------------

LABEL_15 = """START WAL LOCATION: 0/2000028 (file 000000010000000000000002)
CHECKPOINT LOCATION: 0/2000060
BACKUP METHOD: streamed
BACKUP FROM: primary
START TIME: 2024-01-31 02:00:01 UTC
LABEL: alfresco-backup base-2024-01-31_02-00-00
START TIMELINE: 1
"""

LABEL_94 = """START WAL LOCATION: 1A/DE000028 (file 000000030000001A000000DE)
CHECKPOINT LOCATION: 1A/DE000060
BACKUP METHOD: streamed
BACKUP FROM: master
START TIME: 2019-05-01 03:00:00 CEST
LABEL: nightly
"""


def test_parse_backup_label_15():
    info = base_backup.parse_backup_label(LABEL_15)
    assert info == {"start_lsn": "0/2000028", "start_wal_file": "000000010000000000000002", "timeline": 1,
                    "label": "alfresco-backup base-2024-01-31_02-00-00", "start_time": "2024-01-31 02:00:01 UTC"}


def test_parse_backup_label_94_other_timeline():
    info = base_backup.parse_backup_label(LABEL_94)
    assert info["start_lsn"] == "1A/DE000028"
    assert info["start_wal_file"] == "000000030000001A000000DE"
    assert info["timeline"] == 3
    assert info["label"] == "nightly"


def test_parse_backup_label_without_start_line():
    with pytest.raises(PostgresError):
        base_backup.parse_backup_label("CHECKPOINT LOCATION: 0/2000060\nLABEL: x\n")


# --- verify_manifest -------------------------------------------------------------------------------------

def manifest_bytes(files, ranges=None, tamper=None):
    """A backup_manifest laid out as PostgreSQL writes it: the checksum covers every byte before the line
    holding "Manifest-Checksum" (the same slice verify_manifest takes)."""
    lines = ['{ "PostgreSQL-Backup-Manifest-Version": 1,', '"Files": [']
    entries = []
    for entry in files:
        entries.append(json.dumps(entry))
    lines.append(",\n".join(entries))
    lines.append("],")
    if ranges is None:
        ranges = [{"Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100"}]
    lines.append('"WAL-Ranges": [')
    lines.append(",\n".join(json.dumps(r) for r in ranges))
    lines.append("],")
    body = ("\n".join(lines) + "\n").encode()
    checksum = hashlib.sha256(body).hexdigest()
    if tamper:
        body = tamper(body)
    return body + ('"Manifest-Checksum": "%s"}\n' % checksum).encode()


def file_entry(path, size):
    return {"Path": path, "Size": size, "Last-Modified": "2024-01-31 02:00:01 GMT",
            "Checksum-Algorithm": "SHA256", "Checksum": "00" * 32}


MEMBERS = {"backup_label": 225, "PG_VERSION": 3, "base/1/1259": 8192, "global/pg_control": 8192}


def write(tmp_path, data, name="backup_manifest"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_manifest_checksum_matches_hashlib_of_prefix(tmp_path):
    data = manifest_bytes([file_entry(n, s) for n, s in MEMBERS.items()])
    marker = data.rfind(b'"Manifest-Checksum"')
    assert data[marker - 1:marker] == b"\n"
    assert json.loads(data)["Manifest-Checksum"] == hashlib.sha256(data[:marker]).hexdigest()


def test_verify_manifest_good(tmp_path):
    path = write(tmp_path, manifest_bytes([file_entry(n, s) for n, s in MEMBERS.items()],
                                          ranges=[{"Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/3000000"},
                                                  {"Timeline": 2, "Start-LSN": "0/3000000",
                                                   "End-LSN": "0/3000100"}]))
    assert base_backup.verify_manifest(path, dict(MEMBERS)) == {"start_lsn": "0/2000028", "end_lsn": "0/3000100",
                                                            "timeline": 2}


def test_verify_manifest_extra_tar_members_are_fine(tmp_path):
    path = write(tmp_path, manifest_bytes([file_entry("PG_VERSION", 3)]))
    members = dict(MEMBERS, **{"pg_wal/000000010000000000000002": 16777216})
    assert base_backup.verify_manifest(path, members)["end_lsn"] == "0/2000100"


def test_verify_manifest_without_wal_ranges(tmp_path):
    path = write(tmp_path, manifest_bytes([file_entry("PG_VERSION", 3)], ranges=[]))
    assert base_backup.verify_manifest(path, dict(MEMBERS)) == {}


def test_verify_manifest_tampered_body(tmp_path):
    path = write(tmp_path, manifest_bytes([file_entry(n, s) for n, s in MEMBERS.items()],
                                          tamper=lambda b: b.replace(b'"Size": 8192', b'"Size": 8193', 1)))
    with pytest.raises(PostgresError) as info:
        base_backup.verify_manifest(path, dict(MEMBERS))
    assert "checksum mismatch" in str(info.value)


def test_verify_manifest_tampered_checksum(tmp_path):
    data = manifest_bytes([file_entry("PG_VERSION", 3)])
    marker = data.rfind(b'"Manifest-Checksum"')
    start = data.index(b'": "', marker) + 4
    flipped = data[:start] + (b"0" if data[start:start + 1] != b"0" else b"1") + data[start + 1:]
    with pytest.raises(PostgresError) as info:
        base_backup.verify_manifest(write(tmp_path, flipped), dict(MEMBERS))
    assert "checksum mismatch" in str(info.value)


def test_verify_manifest_without_checksum(tmp_path):
    path = write(tmp_path, b'{"PostgreSQL-Backup-Manifest-Version": 1, "Files": []}\n')
    with pytest.raises(PostgresError) as info:
        base_backup.verify_manifest(path, {})
    assert "no Manifest-Checksum" in str(info.value)


def test_verify_manifest_missing_file(tmp_path):
    path = write(tmp_path, manifest_bytes([file_entry(n, s) for n, s in MEMBERS.items()]))
    members = dict(MEMBERS)
    del members["base/1/1259"]
    with pytest.raises(PostgresError) as info:
        base_backup.verify_manifest(path, members)
    assert "missing from base.tar: base/1/1259" in str(info.value)


def test_verify_manifest_size_mismatch(tmp_path):
    path = write(tmp_path, manifest_bytes([file_entry(n, s) for n, s in MEMBERS.items()]))
    members = dict(MEMBERS, **{"global/pg_control": 4096})
    with pytest.raises(PostgresError) as info:
        base_backup.verify_manifest(path, members)
    assert "size differs for global/pg_control: manifest 8192, tar 4096" in str(info.value)


def test_verify_manifest_many_problems_are_summarised(tmp_path):
    entries = [file_entry("base/1/%d" % i, 10) for i in range(8)]
    with pytest.raises(PostgresError) as info:
        base_backup.verify_manifest(write(tmp_path, manifest_bytes(entries)), {})
    assert "(and 3 more)" in str(info.value)


def test_verify_manifest_truncated_is_postgres_error(tmp_path):
    data = manifest_bytes([file_entry("PG_VERSION", 3)])
    with pytest.raises(PostgresError):
        base_backup.verify_manifest(write(tmp_path, data[:-20]), dict(MEMBERS))


def test_verify_manifest_encoded_path(tmp_path):
    raw_name = b"base/1/stray-\xff-file"
    entry = {"Encoded-Path": raw_name.hex(), "Size": 5, "Last-Modified": "2024-01-31 02:00:01 GMT"}
    path = write(tmp_path, manifest_bytes([entry]))
    # tarfile (and so tar_io.list_members) decodes member names with UTF-8 + surrogateescape.
    members = {raw_name.decode("utf-8", "surrogateescape"): 5}
    assert base_backup.verify_manifest(path, members)["start_lsn"] == "0/2000028"


# --- check_backup_dir on hand-built tars -----------------------------------------------------------------

SEGMENT = "000000010000000000000002"


def make_tar(path, members):
    """Write an uncompressed tar ``path`` with ``members`` {name: bytes}."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def base_members(extra=None):
    members = {"backup_label": LABEL_15.encode(), "PG_VERSION": b"15\n", "global/pg_control": b"\0" * 512}
    members.update(extra or {})
    return members


def test_check_backup_dir_stream_with_manifest(tmp_path):
    members = base_members()
    make_tar(str(tmp_path / "base.tar"), members)
    make_tar(str(tmp_path / "pg_wal.tar"), {SEGMENT: b"\0" * 1024})
    (tmp_path / "backup_manifest").write_bytes(
        manifest_bytes([file_entry(n, len(d)) for n, d in members.items()]))
    facts = base_backup.check_backup_dir(str(tmp_path), "stream", V15)
    assert facts["start_wal_file"] == SEGMENT and facts["timeline"] == 1
    assert set(facts["files"]) == {"base.tar", "pg_wal.tar", "backup_manifest"}
    assert facts["files"]["backup_manifest"] == os.path.getsize(str(tmp_path / "backup_manifest"))
    assert facts["manifest_wal"]["end_lsn"] == "0/2000100"


def test_check_backup_dir_fetch_94_finds_wal_in_pg_xlog(tmp_path):
    label = LABEL_15.encode()
    make_tar(str(tmp_path / "base.tar"), {"backup_label": label, "pg_xlog/" + SEGMENT: b"\0" * 64})
    facts = base_backup.check_backup_dir(str(tmp_path), "fetch", V94)
    assert facts["start_wal_file"] == SEGMENT
    assert "manifest_wal" not in facts


def test_check_backup_dir_without_backup_label(tmp_path):
    make_tar(str(tmp_path / "base.tar"), {"PG_VERSION": b"15\n"})
    make_tar(str(tmp_path / "pg_wal.tar"), {SEGMENT: b"\0"})
    with pytest.raises(PostgresError) as info:
        base_backup.check_backup_dir(str(tmp_path), "stream", V15)
    assert "backup_label" in str(info.value)


def test_check_backup_dir_without_start_segment(tmp_path):
    make_tar(str(tmp_path / "base.tar"), base_members())
    make_tar(str(tmp_path / "pg_wal.tar"), {"000000010000000000000003": b"\0"})
    with pytest.raises(PostgresError) as info:
        base_backup.check_backup_dir(str(tmp_path), "stream", V15)
    assert SEGMENT in str(info.value)


def test_check_backup_dir_stream_without_wal_tar(tmp_path):
    make_tar(str(tmp_path / "base.tar"), base_members())
    with pytest.raises(PostgresError) as info:
        base_backup.check_backup_dir(str(tmp_path), "stream", V15)
    assert "pg_wal.tar" in str(info.value)


def test_check_backup_dir_truncated_tar(tmp_path):
    make_tar(str(tmp_path / "base.tar"), base_members({"base/1/big": os.urandom(20000)}))
    make_tar(str(tmp_path / "pg_wal.tar"), {SEGMENT: b"\0"})
    with open(str(tmp_path / "base.tar"), "r+b") as handle:
        handle.truncate(4096)
    with pytest.raises(PostgresError):
        base_backup.check_backup_dir(str(tmp_path), "stream", V15)


def test_check_backup_dir_empty(tmp_path):
    with pytest.raises(PostgresError) as info:
        base_backup.check_backup_dir(str(tmp_path), "stream", V15)
    assert "no base.tar" in str(info.value)


def test_check_backup_dir_with_tablespace(tmp_path):
    members = base_members()
    make_tar(str(tmp_path / "base.tar"), members)
    make_tar(str(tmp_path / "pg_wal.tar"), {SEGMENT: b"\0" * 1024})
    make_tar(str(tmp_path / "16385.tar"), {"PG_15_202209061/16384/16386": b"\0" * 8192})
    entries = [file_entry(n, len(d)) for n, d in members.items()]
    entries.append(file_entry("pg_tblspc/16385/PG_15_202209061/16384/16386", 8192))
    (tmp_path / "backup_manifest").write_bytes(manifest_bytes(entries))
    facts = base_backup.check_backup_dir(str(tmp_path), "stream", V15)
    assert "16385.tar" in facts["files"]


@pytest.mark.skipif(not shutil.which("zstd"), reason="zstd not installed")
def test_compress_wal_tar_lists_the_tar_it_compresses_and_the_check_uses_that(tmp_path):
    make_tar(str(tmp_path / "base.tar"), base_members())
    make_tar(str(tmp_path / "pg_wal.tar"), {SEGMENT: os.urandom(70000)})
    listed = base_backup.compress_wal_tar(str(tmp_path), "zstd", None, logging.getLogger("test"))
    assert listed == {"pg_wal.tar.zst": {SEGMENT: 70000}}
    assert sorted(os.listdir(str(tmp_path))) == ["base.tar", "pg_wal.tar.zst"]
    assert tar_io.list_members(str(tmp_path / "pg_wal.tar.zst")) == {SEGMENT: 70000}
    # The check takes the listing instead of reading the compressed copy again: a listing without the
    # start segment fails it although the file itself has it.
    with pytest.raises(PostgresError, match=SEGMENT):
        base_backup.check_backup_dir(str(tmp_path), "stream", V15, wal_scan={"pg_wal.tar.zst": {}})
    assert base_backup.check_backup_dir(str(tmp_path), "stream", V15, wal_scan=listed)["start_wal_file"] == SEGMENT


@pytest.mark.skipif(not shutil.which("zstd"), reason="zstd not installed")
def test_compress_wal_tar_refuses_a_cut_wal_tar(tmp_path):
    make_tar(str(tmp_path / "pg_wal.tar"), {SEGMENT: os.urandom(70000)})
    with open(str(tmp_path / "pg_wal.tar"), "r+b") as handle:
        handle.truncate(40000)
    with pytest.raises(PostgresError, match="pg_wal.tar"):
        base_backup.compress_wal_tar(str(tmp_path), "zstd", None, logging.getLogger("test"))


def test_compress_wal_tar_without_a_wal_tar_or_compression_lists_nothing(tmp_path):
    log = logging.getLogger("test")
    assert base_backup.compress_wal_tar(str(tmp_path), "zstd", None, log) is None
    make_tar(str(tmp_path / "pg_wal.tar"), {SEGMENT: b"\0"})
    assert base_backup.compress_wal_tar(str(tmp_path), "none", None, log) is None
    assert os.listdir(str(tmp_path)) == ["pg_wal.tar"]


# --- find_bin_dir ----------------------------------------------------------------------------------------

def fake_tool(directory, executable=True):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "pg_basebackup")
    with open(path, "w") as handle:
        handle.write("#!/bin/sh\nexit 0\n")
    os.chmod(path, 0o755 if executable else 0o644)
    return path


def test_find_bin_dir_prefers_pg_bin_dir(tmp_path):
    explicit = str(tmp_path / "explicit")
    fake_tool(explicit)
    fake_tool(str(tmp_path / "alf" / "postgresql" / "bin"))
    assert postgres.find_bin_dir(explicit, str(tmp_path / "alf")) == explicit


def test_find_bin_dir_pg_bin_dir_without_tool_is_an_error(tmp_path):
    fake_tool(str(tmp_path / "alf" / "postgresql" / "bin"))
    with pytest.raises(PostgresError) as info:
        postgres.find_bin_dir(str(tmp_path), str(tmp_path / "alf"))
    assert "PG_BIN_DIR" in str(info.value)


def test_find_bin_dir_bundle_before_path(tmp_path, monkeypatch):
    on_path = str(tmp_path / "onpath")
    fake_tool(on_path)
    monkeypatch.setenv("PATH", on_path)
    bundled = str(tmp_path / "alf" / "postgresql" / "bin")
    fake_tool(bundled)
    assert postgres.find_bin_dir("", str(tmp_path / "alf")) == bundled


def test_find_bin_dir_falls_back_to_path(tmp_path, monkeypatch):
    on_path = str(tmp_path / "onpath")
    fake_tool(on_path)
    monkeypatch.setenv("PATH", on_path)
    # A bundle whose pg_basebackup is not executable does not count.
    fake_tool(str(tmp_path / "alf" / "postgresql" / "bin"), executable=False)
    assert postgres.find_bin_dir("", str(tmp_path / "alf")) == on_path
    assert postgres.find_bin_dir("", "") == on_path


def test_find_bin_dir_nothing_found(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(PostgresError) as info:
        postgres.find_bin_dir("", str(tmp_path / "alf"))
    assert "PG_BIN_DIR" in str(info.value)


# --- hints -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stderr,needle", [
    ('FATAL:  no pg_hba.conf entry for replication connection from host "[local]"', "pg_hba.conf"),
    ("FATAL:  must be superuser or replication role to start walsender", "ALTER ROLE"),
    ('FATAL:  password authentication failed for user "alfresco"', "PGPASSWORD"),
    ("FATAL:  number of requested standby connections exceeds max_wal_senders (currently 0)", "max_wal_senders"),
    ("pg_basebackup: error: could not write to file: No space left on device", "BACKUP_DIR"),
    ('ERROR:  could not open file "./postgresql.conf.backup": Permission denied', "not readable"),
])
def test_hints(stderr, needle):
    assert needle in postgres.hint_for(stderr)


def test_no_hint_for_unknown_errors():
    assert postgres.hint_for("something else entirely") == ""


# --- compression location and fallbacks -------------------------------------------------------------------

def test_server_side_compression_on_15_both_ends():
    result = plan(V15, V15, "server-zstd:5")
    assert "--compress=server-zstd:level=5" in result.args and result.extension == ".zst" and not result.notes


def test_server_side_compression_falls_back_to_client_for_an_older_server():
    result = plan(V15, 140010, "server-zstd")
    assert "--compress=client-zstd" in result.args and result.notes and "server-side" in result.notes[0]


def test_server_side_compression_with_an_old_client_becomes_gzip():
    result = plan(140010, 140010, "server-lz4")
    assert "--gzip" in result.args and result.extension == ".gz"


@pytest.mark.parametrize("text,expected", [
    ("zstd", (None, "zstd", None)), ("server-zstd:5", ("server", "zstd", 5)),
    ("client-lz4:1", ("client", "lz4", 1)), ("none", (None, "none", None)), ("gzip:9", (None, "gzip", 9))])
def test_parse_compression(text, expected):
    assert postgres.parse_compression(text) == expected


@pytest.mark.parametrize("stderr,expected", [
    ("pg_basebackup: error: this build does not support compression with zstd", True),
    ('pg_basebackup: error: could not initiate base backup: ERROR:  zstd compression is not supported by this '
     'build', True),
    ("pg_basebackup: error: connection to server failed", False)])
def test_unsupported_compression_is_recognised(stderr, expected):
    assert postgres.unsupported_compression(stderr) is expected


def test_unspecified_location_compresses_on_the_server_when_both_are_15_plus():
    result = plan(V16, V15, "zstd")
    assert "--compress=server-zstd" in result.args and result.location == "server" and not result.notes
    assert plan(V15, 140010, "zstd").location == "client"
    assert plan(V15, V15, "client-zstd").location == "client"


@pytest.mark.parametrize("spec,expected", [
    ("zstd:3", ["client-zstd:3", "client-gzip"]), ("client-zstd", ["client-gzip"]), ("client-gzip", []),
    ("server-gzip", ["client-gzip"]), ("none", [])])
def test_compression_fallbacks(spec, expected):
    assert base_backup._compression_fallbacks(plan(V15, V15, spec)) == expected
