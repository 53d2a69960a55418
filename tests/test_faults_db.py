"""Database faults against a real PostgreSQL: restarted mid-backup, server down and back, wrong password, no
REPLICATION privilege, no pg_hba.conf replication line, archive_command failing. Each: a clear message, exit 1,
an alert, nothing half-made left, and the next run (once the cause is fixed) succeeds.

(The server being down when the run starts is in test_backup_e2e.py; archive_command failing on its own in
test_wal_e2e.py: here both are extended with the recovery.)"""

import glob
import json
import os
import threading
import time

import catalog
import faultkit
import pytest
import sandbox as sandbox_module
from mailserver import MailServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs backup.py as the service user (needs root)")

EXIT_OK, EXIT_FAILED = 0, 1


def backup(sb, env_path):
    result = sb.run_cli("backup.py", env_path=env_path, timeout=600)
    return result


def base_dirs(sb):
    return sorted(p for p in glob.glob(os.path.join(sb.backup_dir, "postgres", "base-*")) if os.path.isdir(p))


def assert_next_run_succeeds(sb, env_path):
    result = backup(sb, env_path)
    assert result.returncode == EXIT_OK, result.stdout[-4000:] + result.stderr
    done = [e for e in faultkit.entries(sb, "postgres") if e.status == catalog.DONE]
    assert done, faultkit.entries(sb, "postgres")
    assert not faultkit.partials(sb.backup_dir)
    verify = faultkit.restore_verify(sb, env_path)
    if verify is not None:
        assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr
    return result


@pytest.mark.slow
def test_postgres_restarted_during_the_base_backup(sandbox):
    sb = sandbox
    sb.psql("CREATE TABLE big AS SELECT g, repeat(md5(g::text), 20) AS t FROM generate_series(1, 300000) g")
    with MailServer() as mail:
        env_path = sb.write_env(**mail.env())
        run = faultkit.Run(sb, env_path)
        restarter = threading.Thread(target=sb.restart)
        try:
            def streaming(run, procs):
                partial = glob.glob(os.path.join(sb.backup_dir, "postgres", "base-*.partial"))
                return faultkit.has_comm(procs, "pg_basebackup") and partial and faultkit.dir_bytes(partial[0]) > 0

            assert run.stop_when(streaming), run.output()[-3000:]
            restarter.start()  # pg_ctl restart -m fast: the walsender serving pg_basebackup is terminated
            time.sleep(0.2)
            run.thaw()
            restarter.join(120)
            code = run.wait(600)
        finally:
            run.cleanup()
        messages = mail.wait(1)
    output = run.output()
    assert code == EXIT_FAILED, output[-4000:]
    row = faultkit.stage_line(output, "postgres")
    assert "FAILED" in row and "pg_basebackup" in row, row
    # Nothing half-made looks like a backup: the partial was removed, no base-* directory is left.
    assert base_dirs(sb) == [], base_dirs(sb)
    assert len(messages) == 1 and "FAILED" in messages[0]["subject"], [m["subject"] for m in messages]
    assert "postgres" in messages[0]["body"] and "pg_basebackup" in messages[0]["body"]
    assert sb.alfresco_password not in messages[0]["raw"] + output
    assert sb.is_running()
    assert_next_run_succeeds(sb, env_path)


def test_server_down_then_back(sandbox):
    sb = sandbox
    env_path = sb.write_env()
    sb.stop()
    down = backup(sb, env_path)
    assert down.returncode == EXIT_FAILED
    assert "cannot connect to PostgreSQL" in faultkit.stage_line(down.stdout, "postgres")
    # The content backup did not depend on the database: it is DONE and is tomorrow's link base.
    snaps = [e for e in faultkit.entries(sb, "contentstore") if e.status == catalog.DONE]
    assert len(snaps) == 1
    sb.start()
    assert_next_run_succeeds(sb, env_path)
    newest = [e for e in faultkit.entries(sb, "contentstore") if e.status == catalog.DONE][-1]
    assert newest.info["link_dest"] == snaps[0].name


def test_wrong_password_is_named_with_a_hint(sandbox):
    sb = sandbox
    wrong = "Wr0ng-Pa55-" + os.urandom(4).hex()
    with MailServer() as mail:
        env_path = sb.write_env(PGPASSWORD=wrong, **mail.env())
        result = backup(sb, env_path)
        messages = mail.wait(1)
    out = result.stdout
    assert result.returncode == EXIT_FAILED, out[-3000:]
    for stage in ("wal_config", "postgres"):
        row = faultkit.stage_line(out, stage)
        assert "FAILED" in row and "password authentication failed" in row, row
        assert "PGPASSWORD" in row, row  # the hint says which key to fix
    assert len(messages) == 1 and "password authentication failed" in messages[0]["body"]
    assert "PGPASSWORD" in messages[0]["body"]
    log = faultkit.backup_log(sb)
    for text in (out, result.stderr, log, messages[0]["raw"]):
        assert wrong not in text
    assert base_dirs(sb) == []
    assert_next_run_succeeds(sb, sb.write_env())


def test_no_replication_privilege(sandbox_factory):
    sb = sandbox_factory(replication=False)
    env_path = sb.write_env()
    result = backup(sb, env_path)
    out = result.stdout
    assert result.returncode == EXIT_FAILED, out[-3000:]
    assert "replication_privilege" in out
    assert 'ALTER ROLE "alfresco" REPLICATION' in faultkit.stage_line(out, "wal_config")
    row = faultkit.stage_line(out, "postgres")
    assert "FAILED" in row and "ALTER ROLE" in row and "REPLICATION" in row, row
    assert base_dirs(sb) == []
    sb.psql("ALTER ROLE alfresco REPLICATION", user="postgres")
    assert_next_run_succeeds(sb, env_path)


def test_missing_pg_hba_replication_line(sandbox_factory):
    sb = sandbox_factory(hba_replication=False)
    env_path = sb.write_env()
    result = backup(sb, env_path)
    out = result.stdout
    assert result.returncode == EXIT_FAILED, out[-3000:]
    row = faultkit.stage_line(out, "postgres")
    assert "FAILED" in row and "pg_hba.conf" in row and "replication" in row, row
    assert base_dirs(sb) == []
    hba = os.path.join(sb.pgdata, "pg_hba.conf")
    with open(hba, "a") as handle:
        handle.write("local replication all scram-sha-256\n")
    sb.chown_to_service_user(hba)
    sb.reload()
    assert_next_run_succeeds(sb, env_path)


def test_archive_command_failing_then_fixed(sandbox_factory):
    sb = sandbox_factory(archive_command="/bin/false")
    with MailServer() as mail:
        env_path = sb.write_env(WAL_WAIT_TIMEOUT=5, **mail.env())
        result = backup(sb, env_path)
        messages = mail.wait(1)
    assert result.returncode == EXIT_FAILED
    assert "archive_command is failing" in faultkit.stage_line(result.stdout, "wal_archive")
    assert len(messages) == 1
    failed = [e for e in faultkit.entries(sb, "postgres")]
    assert [e.status for e in failed] == [catalog.FAILED]
    command = '"%s" "%s" archive-push "%%p" "%s"' % (sandbox_module.ARCHIVE_PYTHON,
                                                     os.path.join(sb.project_dir, "wal.py"), sb.wal_archive_dir)
    sb.append_conf({"archive_command": command})
    sb.reload()
    sb.psql("SELECT pg_switch_wal()", user="postgres")
    env_path = sb.write_env(WAL_WAIT_TIMEOUT=120)
    good = assert_next_run_succeeds(sb, env_path)
    # The FAILED base backup was deleted by retention (never a survivor or a restore source).
    assert "FAILED backup, not needed" in good.stdout
    assert not os.path.exists(failed[0].path)
    status = json.loads(sb.run_cli("backup.py", args=["--status", "--json"], env_path=env_path).stdout)
    assert status["facts"]["chain"]["ok"], status["facts"]["chain"]
