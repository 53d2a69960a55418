"""``sudo setup.py`` against an attacker holding the service user's account (issue 10, points 3, 4, 5 and 12),
with real servers and the real CLI run as root with SUDO_USER set (what sudo does): links planted in the
data directory and next to the .env hand nothing over and get nothing written; the superuser's password is
in no process of the service user and reaches no program of it; a db.name holding '=' redirects no login;
the service user's commands never hold the admin's terminal; a project another user can change is never
imported as root; a '%' in a path of the cron line runs as written."""

import datetime
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading

import pexpect
import pytest
import setup_formats
from fakepg import FakeServer
from sandbox import SAFE_PATH, crontab
from test_setup_e2e import PROJECT, PROJECT_VENV, SYSTEM_PYTHON, fresh, write_answers

pytestmark = pytest.mark.slow
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="about what setup.py does as root")
TOKEN = "stand-in-for-etc-shadow"


def as_sudo(sb):
    return {"PATH": SAFE_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb", "SUDO_USER": sb.service_user}


def wizard(sb, env_path, answers, *extra, timeout=600):
    return subprocess.run([SYSTEM_PYTHON, os.path.join(PROJECT, "setup.py"), "--env", env_path, "--non-interactive",
                           "--answers", answers] + list(extra), env=as_sudo(sb), cwd=sb.root, capture_output=True,
                          text=True, timeout=timeout)


def files_holding(root, token):
    found = []
    for directory, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode) and info.st_size < (1 << 20):
                with open(path, "rb") as handle:
                    if token.encode() in handle.read():
                        found.append(path)
    return found


@root_only
def test_links_planted_by_the_service_user_hand_nothing_over_and_get_nothing_written(sandbox_factory, cron_guard,
                                                                                    tmp_path):
    sb = fresh(sandbox_factory)
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$%s:19000:0:99999:7:::\n" % TOKEN)
    os.chmod(str(secret), 0o600)
    rootdir = tmp_path / "etc"
    rootdir.mkdir(mode=0o755)
    (rootdir / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")

    def state():
        return (secret.read_bytes(), secret.stat().st_mtime_ns, stat.S_IMODE(secret.stat().st_mode),
                stat.S_IMODE(rootdir.stat().st_mode), rootdir.stat().st_uid, sorted(os.listdir(str(rootdir))))

    before = state()
    env_path = os.path.join(sb.root, "setup.env")
    answers = os.path.join(sb.root, "answers.env")
    base = dict(ALF_BASE_DIR=sb.alf_base_dir, BACKUP_DIR=sb.backup_dir, PGSUPERPASSWORD=sb.superuser_password,
                VENV_DIR=PROJECT_VENV, RESTART_POSTGRES="no", CRON_SCHEDULE="")
    runs = [  # (the link, where it points, answers, exit code, what the output says), in the wizard's order
        (env_path, secret, {}, 2, "setup.env is a symbolic link"),
        (os.path.join(sb.backup_dir, "logs"), rootdir, {}, 1, "logs is a symbolic link"),
        (os.path.join(sb.root, "setup-backups"), rootdir, {}, 1, "setup-backups .*does not create files in it"),
        (os.path.join(sb.pgdata, "postgresql.auto.conf"), secret, {}, 1, "postgresql.auto.conf is a symbolic link"),
        (os.path.join(sb.pgdata, "postgresql.conf"), secret, {"PGSUPERUSER": ""}, 1, "postgresql.conf is a symbolic"),
        (os.path.join(sb.pgdata, "pg_hba.conf"), secret, {}, 1, "pg_hba.conf is a symbolic link"),
    ]
    for link, target, values, code, message in runs:
        aside = link + ".aside"
        if os.path.lexists(link):
            os.rename(link, aside)
        os.symlink(str(target), link)
        os.lchown(link, sb.uid, sb.gid)
        write_answers(sb, answers, **dict(base, **values))
        result = wizard(sb, env_path, answers)
        os.unlink(link)
        if os.path.lexists(aside):
            os.rename(aside, link)
        out = result.stdout + result.stderr
        assert state() == before, link
        assert files_holding(sb.root, TOKEN) == [] and TOKEN not in out, link
        assert result.returncode == code, (link, out[-3000:])
        assert re.search(message, out), (message, out[-3000:])


@root_only
def test_the_superuser_password_reaches_no_process_of_the_service_user_nor_its_terminal(sandbox_factory,
                                                                                        cron_guard):
    sb = fresh(sandbox_factory)
    alfresco_sh = os.path.join(sb.alf_base_dir, "alfresco.sh")
    sb.run_as_service_user([alfresco_sh, "start", "tomcat"], timeout=60)
    terminal_log, psql_log = os.path.join(sb.root, "terminal.log"), os.path.join(sb.root, "psql.log")
    os.rename(alfresco_sh, alfresco_sh + ".real")
    with open(alfresco_sh, "w") as handle:  # records whether it could open the admin's terminal
        handle.write('#!/bin/bash\nif (: </dev/tty) 2>/dev/null; then t=tty; else t=none; fi\necho "$t $*" >> %s\n'
                     'exec %s.real "$@"\n' % (terminal_log, alfresco_sh))
    psql = os.path.join(sb.pg_bin, "psql")
    real_psql = os.path.realpath(psql)
    log_dir = os.path.join(sb.backup_dir, "lo%gs")
    env_path = os.path.join(sb.root, "setup.env")
    answers = write_answers(sb, os.path.join(sb.root, "answers.env"), ALF_BASE_DIR=sb.alf_base_dir,
                            BACKUP_DIR=sb.backup_dir, PGSUPERPASSWORD=sb.superuser_password, VENV_DIR=PROJECT_VENV,
                            RESTART_POSTGRES="yes", CRON_LOG_DIR=log_dir)
    os.unlink(psql)  # the bundle's psql is the service user's: what it would do with a password
    with open(psql, "w") as handle:
        handle.write("#!/bin/sh\nenv >> %s\nexec %s \"$@\"\n" % (psql_log, real_psql))
    for path in (alfresco_sh, psql):
        os.chmod(path, 0o755)
        os.chown(path, sb.uid, sb.gid)
    secret, seen, hits, done = sb.superuser_password.encode(), set(), [], threading.Event()

    def scan():
        while not done.is_set():
            for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
                try:
                    with open("/proc/%s/status" % pid) as handle:
                        uids = [line.split()[1:] for line in handle if line.startswith("Uid:")][0]
                    if str(sb.uid) not in uids:
                        continue
                    with open("/proc/%s/environ" % pid, "rb") as handle:
                        environ = handle.read()
                    with open("/proc/%s/cmdline" % pid, "rb") as handle:
                        cmdline = handle.read()
                except (OSError, IndexError):
                    continue
                seen.add(pid)
                if secret in environ or secret in cmdline:
                    hits.append(cmdline)

    scanner = threading.Thread(target=scan, daemon=True)
    scanner.start()
    log = io.BytesIO()
    child = pexpect.spawn(SYSTEM_PYTHON, [os.path.join(PROJECT, "setup.py"), "--env", env_path, "--non-interactive",
                                          "--answers", answers], env=as_sudo(sb), cwd=sb.root, timeout=600)
    child.logfile_read = log
    try:
        child.expect(pexpect.EOF, timeout=600)
    finally:
        child.close()
        done.set()
        scanner.join(timeout=30)
        os.unlink(psql)
        os.symlink(real_psql, psql)
    transcript = log.getvalue().decode("utf-8", "replace")
    assert child.exitstatus == 0, transcript[-3000:]
    assert hits == [] and len(seen) > 3, (hits, len(seen))
    assert not os.path.exists(psql_log)  # no program of the service user ran with (or without) the password
    with open(terminal_log) as handle:
        calls = handle.read().splitlines()
    assert "none stop tomcat" in calls and all(c.startswith("none ") for c in calls), calls
    # The cron line, read the way cron reads it, runs: the nightly backup logs into the directory with '%'.
    (line,) = [c for c in crontab(sb.service_user).splitlines() if env_path in c and not c.startswith("#")]
    command, stdin = cron_reads(line)
    assert stdin == ""
    run = sb.run_as_service_user(["/bin/sh", "-c", command], timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    with open(os.path.join(log_dir, "cron-%s.log" % datetime.date.today().isoformat())) as handle:
        assert "backup" in handle.read().lower()


@root_only
def test_a_db_name_holding_equals_cannot_redirect_the_superuser_login(sandbox_factory):
    sb = fresh(sandbox_factory)
    fake_dir = tempfile.mkdtemp(prefix="fakepg-", dir="/tmp")
    os.chmod(fake_dir, 0o755)
    fake = FakeServer(fake_dir, 5432, "cleartext").start()
    try:
        props = os.path.join(sb.alf_base_dir, "tomcat", "shared", "classes", "alfresco-global.properties")
        with open(props) as handle:
            text = handle.read().replace("db.name=alfresco", "db.name=dbname=alfresco host=%s port=5432" % fake_dir)
        with open(props, "w") as handle:
            handle.write(text)
        answers = write_answers(sb, os.path.join(sb.root, "answers.env"), ALF_BASE_DIR=sb.alf_base_dir,
                                BACKUP_DIR=sb.backup_dir, PGSUPERPASSWORD=sb.superuser_password, VENV_DIR=PROJECT_VENV)
        result = wizard(sb, os.path.join(sb.root, "setup.env"), answers, "--dry-run", timeout=300)
    finally:
        fake.stop()
        shutil.rmtree(fake_dir, ignore_errors=True)
    assert fake.sessions == [], fake.sessions
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "looks like a connection string" in result.stdout and sb.superuser_password not in result.stdout


@root_only
def test_a_command_run_as_the_service_user_has_no_terminal(service_user):
    probe = ["/bin/sh", "-c", "if (: </dev/tty) 2>/dev/null; then echo tty; else echo none; fi"]
    code = ("import subprocess, setup_sys\nuser = setup_sys.User.named(%r)\nprobe = %r\n"
            "print('WIZARD', setup_sys.run_as(user, probe).stdout.strip())\n"
            "print('BARE', subprocess.run(['setpriv', '--reuid=%d', '--regid=%d', '--init-groups', '--'] + probe, "
            "capture_output=True, text=True).stdout.strip())\n" % (service_user.name, probe, service_user.uid,
                                                                  service_user.gid))
    child = pexpect.spawn(sys.executable, ["-c", code], cwd=PROJECT, timeout=60,
                          env={"PATH": SAFE_PATH, "HOME": "/root", "LANG": "C.UTF-8"})
    child.expect(pexpect.EOF)
    out = child.before.decode()
    child.close()
    assert "BARE tty" in out, out  # the probe does see a terminal it has (setpriv alone keeps it)
    assert "WIZARD none" in out, out


@root_only
@pytest.mark.parametrize("weakness", ["module", "directory", "pycache", None])
def test_root_never_imports_a_project_another_user_can_change(tmp_path, service_user, weakness):
    project = tmp_path / "project"
    project.mkdir(mode=0o755)
    for name in os.listdir(PROJECT):
        if name.endswith(".py") or name == "requirements.txt":
            shutil.copy(os.path.join(PROJECT, name), str(project / name))
    marker = tmp_path / "imported"
    with open(str(project / "setup_files.py"), "a") as handle:
        handle.write("\nopen(%r, 'w').write('imported')\n" % str(marker))
    if weakness == "module":
        os.chown(str(project / "setup_files.py"), service_user.uid, service_user.gid)
    elif weakness == "directory":
        os.chmod(str(project), 0o775)
    elif weakness == "pycache":
        (project / "__pycache__").mkdir()
        os.chown(str(project / "__pycache__"), service_user.uid, service_user.gid)
    result = subprocess.run([SYSTEM_PYTHON, str(project / "setup.py"), "--help"], capture_output=True, text=True,
                            timeout=60, env={"PATH": SAFE_PATH, "LANG": "C.UTF-8"})
    if weakness is None:  # the check passes for a root-owned copy, which is then imported (the probe works)
        assert result.returncode == 0 and marker.exists(), result.stderr
        return
    assert result.returncode == 2 and "refusing to run as root" in result.stderr, result.stderr
    assert "chown -R root:root %s" % project in result.stderr and not marker.exists()


def cron_reads(line):
    """(command, stdin) of a crontab line by cron's own rule (cronie's do_command.c): after the five time
    fields a backslash pairs with the next character, '\\%' gives '%', other pairs stay; the first unpaired
    '%' ends the command, and the rest (each '%' a newline) is its stdin."""
    text = line.split(None, 5)[5]
    out, at = "", 0
    while at < len(text):
        if text[at] == "\\" and at + 1 < len(text):
            out += "%" if text[at + 1] == "%" else text[at:at + 2]
            at += 2
            continue
        if text[at] == "%":
            return out, text[at + 1:].replace("%", "\n")
        out += text[at]
        at += 1
    return out, ""


def test_a_cron_line_with_percent_in_its_paths_runs_as_written(tmp_path):
    project, venv, env_dir, logs = (tmp_path / n for n in ("p%roj", "v%env", "e%nv", "l%og 50%"))
    for directory in (project, venv, env_dir, logs):
        directory.mkdir()
    python = venv / "python"
    python.write_text('#!/bin/sh\necho "$PWD|$*" > %s\n' % (tmp_path / "args"))
    python.chmod(0o755)
    env_path = env_dir / ".env"
    _marker, line = setup_formats.cron_entry("0 2 * * *", str(project), str(python), str(env_path), str(logs))
    command, stdin = cron_reads(line)
    assert stdin == ""
    subprocess.run(["/bin/sh", "-c", command], check=True, timeout=30)
    assert (tmp_path / "args").read_text() == "%s|backup.py --env %s\n" % (project, env_path)
    assert os.listdir(str(logs)) == ["cron-%s.log" % datetime.date.today().isoformat()]
    for unholdable in ("/srv/a\\%b/.env", "/srv/a\nb/.env"):
        with pytest.raises(setup_formats.TextError):
            setup_formats.cron_entry("0 2 * * *", str(project), str(python), unholdable, str(logs))
