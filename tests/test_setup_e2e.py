"""End to end: ``setup.py`` against a sandbox that does not archive, whose role may not replicate and whose
pg_hba.conf has no replication lines. Interactive (pexpect, real prompts, under "sudo" when root) and
non-interactive (as the service user); a second run changes nothing; bad answers change nothing."""

import io
import os
import re
import stat
import subprocess
import sys

import pexpect
import pytest
import setup_files
import sandbox as sandbox_module
import setup_formats
from sandbox import SAFE_PATH

pytestmark = pytest.mark.slow
SYSTEM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_VENV = os.path.join(PROJECT, ".venv")
SETTINGS = ("wal_level", "archive_mode", "archive_command", "max_wal_senders", "archive_timeout")
EXIT_OK, EXIT_ANSWERS, EXIT_INCOMPLETE = 0, 2, 3


crontab = sandbox_module.crontab


def fresh(sandbox_factory):
    return sandbox_factory(archive=False, replication=False, hba_replication=False, n_files=3)


def server_state(sb, env_path):
    """Everything the wizard may change, with file mtimes, to prove a run changed nothing."""
    files = {}
    names = ("pg_hba.conf", "postgresql.conf", "postgresql.auto.conf")
    for path in [os.path.join(sb.pgdata, name) for name in names] + [env_path]:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                files[path] = (handle.read(), os.stat(path).st_mtime_ns)
    settings = sb.psql("SELECT string_agg(name || '=' || setting, E'\\n' ORDER BY name) FROM pg_settings WHERE "
                       "name IN (%s)" % ",".join("'%s'" % s for s in SETTINGS), user="postgres")
    role = sb.psql("SELECT rolreplication FROM pg_roles WHERE rolname = 'alfresco'", user="postgres")
    top = sorted(n for n in os.listdir(sb.pgdata))
    return {"files": files, "settings": settings, "role": role, "postmaster": sb.postmaster_pid(),
            "crontab": crontab(sb.service_user), "pgdata": top}


def settings(sb):
    rows = sb.psql("SELECT name || '=' || setting FROM pg_settings WHERE name IN (%s)"
                   % ",".join("'%s'" % s for s in SETTINGS), user="postgres")
    return dict(line.split("=", 1) for line in rows.splitlines())


def write_answers(sb, path, **values):
    text = "".join("%s=%s\n" % (k, setup_files.quote_env(v)) for k, v in values.items())
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, 0o600)
    sb.chown_to_service_user(path)
    return path


def tomcat_pid(sb):
    with open(os.path.join(sb.alf_base_dir, "tomcat", "temp", "catalina.pid")) as handle:
        return int(handle.read().strip())


def assert_set_up(sb, env_path, state_before_pgdata):
    now = settings(sb)
    assert now["wal_level"] == "replica" and now["archive_mode"] == "on", now
    assert int(now["max_wal_senders"]) >= 3 and int(now["archive_timeout"]) > 0
    assert now["archive_command"] == '"%s" "%s/wal.py" archive-push --gzip "%%p" "%s"' % (
        "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable, PROJECT,
        sb.wal_archive_dir), now["archive_command"]
    with open(os.path.join(sb.pgdata, "pg_hba.conf")) as handle:
        hba = [fields for _n, fields in setup_formats.parse_hba(handle.read())]
    mine = [f for f in hba if f[1] == "replication" and f[2] == "alfresco"]
    assert sorted(f[-2] if f[0] == "host" else "local" for f in mine) == ["127.0.0.1/32", "::1/128", "local"]
    assert {f[-1] for f in mine} == {"scram-sha-256"} and not any("trust" in f for f in hba)
    assert sb.psql("SELECT rolreplication FROM pg_roles WHERE rolname = 'alfresco'", user="postgres") == "t"
    info = os.stat(env_path)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == sb.uid
    entries = [line for line in crontab(sb.service_user).splitlines()
               if "backup.py" in line and env_path in line and not line.startswith("#")]
    assert len(entries) == 1, crontab(sb.service_user)
    # Nothing new in the data directory but what the server itself makes (no copies of its files).
    assert set(os.listdir(sb.pgdata)) - set(state_before_pgdata) <= {"postmaster.pid", "postmaster.opts",
                                                                      "current_logfiles"}
    if os.geteuid() == 0:
        root_owned = [os.path.join(d, n) for d, dirs, names in os.walk(sb.root) for n in dirs + names
                      if os.lstat(os.path.join(d, n)).st_uid == 0]
        assert root_owned == [], root_owned


def drive(child, answers, log):
    """Answer every ``? KEY ...: `` prompt from ``answers`` (Enter when absent) until the wizard ends."""
    asked = []
    while True:
        index = child.expect([r"\? ([A-Z_]+) [^\r\n]*\]: ", pexpect.EOF], timeout=240)
        if index == 1:
            break
        key = child.match.group(1).decode()
        asked.append(key)
        child.sendline(answers.get(key, ""))
    child.close()
    return asked, child.exitstatus, log.getvalue().decode("utf-8", "replace")


def test_interactive_wizard_then_a_rerun_changes_nothing(sandbox_factory, cron_guard):
    sb = fresh(sandbox_factory)
    sb.run_as_service_user([os.path.join(sb.alf_base_dir, "alfresco.sh"), "start", "tomcat"], timeout=60)
    old_tomcat = tomcat_pid(sb)
    before = server_state(sb, "/nonexistent")
    env_path = os.path.join(sb.root, "setup.env")
    env = {"PATH": SAFE_PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8", "TERM": "dumb"}
    if os.geteuid() == 0:
        env["SUDO_USER"] = sb.service_user  # what sudo sets: the wizard acts for that user
    log = io.BytesIO()
    child = pexpect.spawn(SYSTEM_PYTHON, [os.path.join(PROJECT, "setup.py"), "--env", env_path], env=env,
                          cwd=sb.root, timeout=240)
    child.logfile_read = log  # what the terminal showed (not what we typed)
    answers = {"ALF_BASE_DIR": sb.alf_base_dir, "BACKUP_DIR": sb.backup_dir, "PGSUPERPASSWORD":
               sb.superuser_password, "VENV_DIR": PROJECT_VENV, "RESTART_POSTGRES": "yes"}
    asked, code, transcript = drive(child, answers, log)
    assert code == EXIT_OK, transcript[-3000:]
    for key in ("ALF_BASE_DIR", "PGHOST", "PGPASSWORD", "BACKUP_DIR", "INSTALLATION_NAME", "PGSUPERUSER",
                "PGSUPERPASSWORD", "APPLY_ENV", "APPLY_PG_SETTINGS", "APPLY_HBA", "APPLY_ROLE", "RESTART_POSTGRES",
                "APPLY_CRON"):
        assert key in asked, (key, asked)
    assert sb.superuser_password not in transcript and sb.alfresco_password not in transcript
    assert "+host\treplication\talfresco\t127.0.0.1/32" in transcript  # the diff was shown before asking
    assert_set_up(sb, env_path, before["pgdata"])
    # Alfresco was stopped through its script and started again (a new "Server startup in").
    new_tomcat = tomcat_pid(sb)
    assert new_tomcat != old_tomcat and os.path.exists("/proc/%d" % new_tomcat)
    with open(os.path.join(sb.alf_base_dir, "tomcat", "logs", "catalina.out")) as handle:
        assert handle.read().count("Server startup in") == 2
    result = sb.run_cli("backup.py", env_path=env_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr

    # Again, non-interactively with an answers file: nothing changes, nothing restarts.
    answers_path = write_answers(sb, os.path.join(sb.root, "answers.env"), ALF_BASE_DIR=sb.alf_base_dir,
                                 PGSUPERPASSWORD=sb.superuser_password, VENV_DIR=PROJECT_VENV, RESTART_POSTGRES="yes")
    state = server_state(sb, env_path)
    rerun = subprocess.run([SYSTEM_PYTHON, os.path.join(PROJECT, "setup.py"), "--env", env_path,
                            "--non-interactive", "--answers", answers_path], env=env, capture_output=True,
                           text=True, timeout=300, check=False)
    assert rerun.returncode == EXIT_OK, rerun.stdout[-3000:] + rerun.stderr
    assert server_state(sb, env_path) == state
    assert tomcat_pid(sb) == new_tomcat
    summary = rerun.stdout.split("== Summary ==")[1]
    assert " changed " not in summary and "backup.py --check passed" in summary, summary


def test_non_interactive_as_the_service_user_with_a_maintenance_window_restart(sandbox_factory, cron_guard):
    sb = fresh(sandbox_factory)
    env_path = os.path.join(sb.root, "setup.env")
    before = server_state(sb, env_path)
    venv = os.path.join(sb.root, "venv")
    values = dict(ALF_BASE_DIR=sb.alf_base_dir, BACKUP_DIR=sb.backup_dir, PGSUPERUSER="postgres",
                  PGSUPERPASSWORD=sb.superuser_password, CRON_SCHEDULE="30 1 * * *", VENV_DIR=venv,
                  RESTART_POSTGRES="no", RETENTION_DAYS="9")
    answers = write_answers(sb, os.path.join(sb.root, "answers.env"), **values)
    args = ["--non-interactive", "--answers", answers]

    first = sb.run_cli("setup.py", args, env_path=env_path, timeout=900)
    assert first.returncode == EXIT_INCOMPLETE, first.stdout[-3000:] + first.stderr
    # Configured but not restarted: the exact commands are printed, the server still runs unchanged.
    assert "%s/alfresco.sh stop tomcat" % sb.alf_base_dir in first.stdout
    assert "%s/alfresco.sh start postgresql" % sb.alf_base_dir in first.stdout
    assert settings(sb)["archive_mode"] == "off" and sb.postmaster_pid() == before["postmaster"]
    assert sb.psql("SELECT count(*) FROM pg_settings WHERE pending_restart", user="postgres") != "0"
    assert os.access(os.path.join(venv, "bin", "python"), os.X_OK)  # a real venv with a real pip install
    assert "RETENTION_DAYS='9'" in open(env_path).read()

    write_answers(sb, answers, **dict(values, RESTART_POSTGRES="yes"))
    second = sb.run_cli("setup.py", args, env_path=env_path, timeout=600)
    assert second.returncode == EXIT_OK, second.stdout[-3000:] + second.stderr
    assert re.search(r"OK +wal_archived", second.stdout), second.stdout[-3000:]
    assert_set_up(sb, env_path, before["pgdata"])
    assert "30 1 * * * " in crontab(sb.service_user)
    backup = sb.run_cli("backup.py", env_path=env_path, timeout=300)
    assert backup.returncode == 0, backup.stdout[-3000:] + backup.stderr

    state = server_state(sb, env_path)
    third = sb.run_cli("setup.py", args, env_path=env_path, timeout=600)
    assert third.returncode == EXIT_OK, third.stdout[-3000:]
    assert server_state(sb, env_path) == state


def test_without_a_superuser_postgresql_conf_is_edited_and_copied_outside_the_data_directory(sandbox_factory,
                                                                                             cron_guard):
    sb = sandbox_factory(archive=False, n_files=2)  # the role may replicate already; pg_hba allows it
    env_path = os.path.join(sb.root, "setup.env")
    before = server_state(sb, env_path)
    answers = write_answers(sb, os.path.join(sb.root, "answers.env"), ALF_BASE_DIR=sb.alf_base_dir,
                            BACKUP_DIR=sb.backup_dir, PGSUPERUSER="", VENV_DIR=PROJECT_VENV, RESTART_POSTGRES="yes",
                            CRON_SCHEDULE="")
    args = ["--non-interactive", "--answers", answers]
    result = sb.run_cli("setup.py", args, env_path=env_path, timeout=600)
    assert result.returncode == EXIT_OK, result.stdout[-3000:] + result.stderr
    conf = os.path.join(sb.pgdata, "postgresql.conf")
    with open(conf) as handle:
        assert "archive_mode = 'on'" in handle.read()
    copies = [os.path.join(d, n) for d, _dirs, names in os.walk(os.path.join(sb.root, "setup-backups"))
              for n in names]
    # pg_hba.conf allowed replication for all roles over the socket and 127.0.0.1, so only ::1 was added.
    assert sorted(os.path.basename(c) for c in copies) == ["pg_hba.conf", "postgresql.conf"]
    for copy in copies:
        with open(copy) as handle:
            assert handle.read() == before["files"][os.path.join(sb.pgdata, os.path.basename(copy))][0]
    with open(os.path.join(sb.pgdata, "pg_hba.conf")) as handle:
        assert [f for _n, f in setup_formats.parse_hba(handle.read()) if f[2] == "alfresco"] == [
            ["host", "replication", "alfresco", "::1/128", "scram-sha-256"]]
    assert set(os.listdir(sb.pgdata)) - set(before["pgdata"]) <= {"postmaster.pid", "postmaster.opts"}
    assert settings(sb)["archive_mode"] == "on"
    state = server_state(sb, env_path)
    again = sb.run_cli("setup.py", args, env_path=env_path, timeout=600)
    assert again.returncode == EXIT_OK, again.stdout[-3000:]
    assert server_state(sb, env_path) == state


def test_bad_answers_and_a_dry_run_leave_everything_as_it_was(sandbox_factory, cron_guard):
    sb = fresh(sandbox_factory)
    env_path = os.path.join(sb.root, "setup.env")
    before = server_state(sb, env_path)
    good = dict(ALF_BASE_DIR=sb.alf_base_dir, BACKUP_DIR=sb.backup_dir, PGSUPERPASSWORD=sb.superuser_password,
                VENV_DIR=PROJECT_VENV, RESTART_POSTGRES="yes")
    locked = os.path.join(sb.root, "locked")
    os.mkdir(locked, 0o755 if os.geteuid() == 0 else 0o500)  # root-owned, or read-only for us
    cases = [
        (dict(good, ALF_BASE_DIR=os.path.join(sb.root, "no-such-alfresco")), r"ALF_BASE_DIR: .* is not a directory"),
        (dict(good, PGSUPERPASSWORD="wrong-" + sb.superuser_password), r"cannot connect as PGSUPERUSER: .*password "
                                                                        r"authentication failed"),
        (dict(good, BACKUP_DIR=os.path.join(locked, "backups")), r"BACKUP_DIR .*backups cannot be created"),
    ]
    answers = os.path.join(sb.root, "answers.env")
    for values, message in cases:
        write_answers(sb, answers, **values)
        result = sb.run_cli("setup.py", ["--non-interactive", "--answers", answers], env_path=env_path, timeout=300)
        assert result.returncode == EXIT_ANSWERS, result.stdout[-3000:] + result.stderr
        assert re.search(message, result.stdout), result.stdout[-2000:]
        assert "Nothing was changed on the server." in result.stdout
        assert "wrong-" not in result.stdout and sb.superuser_password not in result.stdout
        assert server_state(sb, env_path) == before
    os.chmod(locked, 0o755)

    write_answers(sb, answers, **good)
    dry = sb.run_cli("setup.py", ["--non-interactive", "--answers", answers, "--dry-run"], env_path=env_path,
                     timeout=300)
    assert dry.returncode == EXIT_OK, dry.stdout[-3000:] + dry.stderr
    for shown in ("ALTER SYSTEM SET archive_mode = 'on';", "+host\treplication\talfresco\t::1/128",
                  "ALTER ROLE alfresco REPLICATION;", "alfresco.sh stop tomcat", "+# alfresco-backup setup.py --env",
                  "+PGPASSWORD='********'"):
        assert shown in dry.stdout, (shown, dry.stdout[-3000:])
    assert sb.alfresco_password not in dry.stdout
    assert server_state(sb, env_path) == before and not os.path.exists(os.path.join(sb.root, "setup-backups"))


def test_a_failed_restart_puts_the_old_settings_back_and_says_what_stays(sandbox_factory, cron_guard):
    sb = fresh(sandbox_factory)
    script = os.path.join(sb.alf_base_dir, "alfresco.sh")
    real = os.path.join(sb.alf_base_dir, "alfresco-real.sh")
    os.rename(script, real)
    flag = os.path.join(sb.root, "refused-once")
    with open(script, "w") as handle:  # a PostgreSQL that refuses to start once (the first start after the change)
        handle.write('#!/bin/bash\nif [ "$1 $2" = "start postgresql" ] && [ ! -e "%s" ]; then\n  touch "%s"\n'
                     '  echo "postgresql could not be started"; exit 1\nfi\nexec "%s" "$@"\n' % (flag, flag, real))
    os.chmod(script, 0o755)
    sb.chown_to_service_user(script)
    auto_conf = os.path.join(sb.pgdata, "postgresql.auto.conf")
    with open(auto_conf) as handle:
        auto_before = handle.read()
    env_path = os.path.join(sb.root, "setup.env")
    answers = write_answers(sb, os.path.join(sb.root, "answers.env"), ALF_BASE_DIR=sb.alf_base_dir,
                            BACKUP_DIR=sb.backup_dir, PGSUPERPASSWORD=sb.superuser_password, VENV_DIR=PROJECT_VENV,
                            RESTART_POSTGRES="yes", CRON_SCHEDULE="")
    result = sb.run_cli("setup.py", ["--non-interactive", "--answers", answers], env_path=env_path, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr
    out = result.stdout
    assert "PostgreSQL did not start with the new settings" in out, out[-3000:]
    assert "is running again with its previous settings" in out and "postgresql.auto.conf restored" in out
    applied = out.split("still in effect):", 1)[1]
    assert "pg_hba.conf" in applied and "ALTER ROLE alfresco REPLICATION" in applied
    assert "ALTER SYSTEM" not in applied
    assert sb.is_running() and settings(sb)["archive_mode"] == "off"
    with open(auto_conf) as handle:
        assert handle.read() == auto_before
