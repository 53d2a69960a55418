"""What setup.py does as root with files and programs another user controls (issue 10, points 3 and 4), on real
files and processes: never through a symbolic link, never a FIFO, never a file of the wrong owner, never a
chmod/chown by path, never a program that is not root's, never a signal to a process named by a planted pid
file."""

import io
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest
import setup_answers
import setup_safefs
import setup_finish
import setup_service
import setup_steps
import setup_sys
from setup_sys import SetupError

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="about what root does with another user's files")
SECRET = "root:$6$stand-in-for-etc-shadow:19000:0:99999:7:::\nPGUSER=leaked\n"


@pytest.fixture
def victim(tmp_path):
    """A root-only file (the stand-in for /etc/shadow) and a root directory (for /etc), with their state."""
    vault = tmp_path / "vault"
    vault.mkdir(mode=0o755)
    secret = vault / "shadow"
    secret.write_text(SECRET)
    os.chmod(str(secret), 0o600)
    rootdir = vault / "etc"
    rootdir.mkdir(mode=0o755)
    (rootdir / "keep").write_text("x")

    def state():
        return (secret.read_text(), stat.S_IMODE(secret.stat().st_mode), secret.stat().st_mtime_ns,
                stat.S_IMODE(rootdir.stat().st_mode), rootdir.stat().st_uid, sorted(os.listdir(str(rootdir))))
    return secret, rootdir, state


@pytest.fixture
def public_dir(service_user):
    """A directory under /tmp owned by the service user (what it may plant links in)."""
    path = tempfile.mkdtemp(prefix="safefs-", dir="/tmp")
    os.chmod(path, 0o755)
    os.chown(path, service_user.uid, service_user.gid)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def planted(link, target, owner):
    os.symlink(str(target), str(link))
    if os.geteuid() == 0:
        os.lchown(str(link), owner.uid, owner.gid)


def context(env_path, user, pg_user=None):
    ctx = setup_steps.Context(setup_answers.Ui(False, {}), PROJECT, str(env_path), False, out=io.StringIO())
    ctx.service_user = setup_sys.User.named(user.name)
    ctx.pg_os_user = pg_user or ctx.service_user
    return ctx


@root_only
def test_rewrite_in_place_never_writes_through_a_link(public_dir, victim, service_user):
    secret, _rootdir, state = victim
    before = state()
    conf = public_dir / "postgresql.conf"
    planted(conf, secret, service_user)
    with pytest.raises(SetupError, match="symbolic link"):
        setup_safefs.rewrite_in_place(str(conf), "archive_mode = on\n")
    os.unlink(str(conf))
    conf.write_text("mine\n")  # root's file in the service user's directory: not PostgreSQL's
    with pytest.raises(SetupError, match="belongs to root"):
        setup_safefs.rewrite_in_place(str(conf), "archive_mode = on\n")
    assert state() == before and conf.read_text() == "mine\n"


def test_detection_never_hangs_on_a_fifo_nor_reads_through_a_link(tmp_path, victim):
    secret, _rootdir, state = victim
    pgdata = tmp_path / "alfresco" / "alf_data" / "postgresql"
    pgdata.mkdir(parents=True)
    os.mkfifo(str(pgdata / "PG_VERSION"))  # an open() of it blocks until someone writes
    os.symlink(str(secret), str(pgdata / "postgresql.conf"))
    code = "import json, setup_steps; print(json.dumps(setup_steps.detect(None, %r)))" % str(tmp_path / "alfresco")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "stand-in-for-etc-shadow" not in proc.stdout and "not a regular file" in proc.stdout
    assert "symbolic link" in proc.stdout and '"pg_version": null' in proc.stdout


@root_only
def test_directories_are_never_changed_through_a_link_nor_taken_over(public_dir, victim, service_user):
    _secret, rootdir, state = victim
    before = state()
    backup = public_dir / "backups"
    backup.mkdir()
    os.chown(str(backup), service_user.uid, service_user.gid)
    ctx = context(public_dir / "setup.env", service_user)
    ctx.values = {"BACKUP_DIR": str(backup)}
    planted(backup / "logs", rootdir, service_user)
    with pytest.raises(SetupError, match="symbolic link"):
        setup_steps.directories(ctx, str(backup / "logs"))
    assert state() == before
    os.unlink(str(backup / "logs"))
    (backup / "postgres").mkdir()  # root's directory with something in it (a swapped-in /var/lib/...)
    (backup / "postgres" / "data").write_text("x")
    with pytest.raises(SetupError, match="belongs to root.*does not take it over"):
        setup_steps.directories(ctx, str(backup / "logs"))
    assert (backup / "postgres").stat().st_uid == 0 and stat.S_IMODE((backup / "postgres").stat().st_mode) == 0o755


@root_only
def test_copies_for_the_service_user_never_land_through_a_link(public_dir, victim, service_user):
    _secret, rootdir, state = victim
    before = state()
    ctx = context(public_dir / "setup.env", service_user)
    planted(public_dir / "setup-backups", rootdir, service_user)
    with pytest.raises(SetupError, match="setup-backups"):
        ctx.save_copy("pg_hba.conf", "local all all scram-sha-256\n")
    assert state() == before
    os.unlink(str(public_dir / "setup-backups"))
    copy = ctx.save_copy("pg_hba.conf", "local all all scram-sha-256\n")
    info = os.lstat(copy)
    assert stat.S_ISREG(info.st_mode) and info.st_uid == service_user.uid and stat.S_IMODE(info.st_mode) == 0o600
    assert os.stat(os.path.dirname(copy)).st_uid == service_user.uid
    # A link planted where the .bak goes is replaced, never written through.
    bak = public_dir / "setup.env.bak"
    planted(bak, _secret, service_user)
    setup_safefs.write_private(str(bak), "PGUSER=x\n", ctx.service_user)
    assert not bak.is_symlink() and bak.read_text() == "PGUSER=x\n" and state() == before


@root_only
def test_root_runs_only_root_owned_programs(public_dir, service_user, monkeypatch):
    fake_bin = public_dir / "bin"
    fake_bin.mkdir()
    log = public_dir / "ran-as-root"
    for name in ("setpriv", "crontab"):
        fake = fake_bin / name
        fake.write_text('#!/bin/sh\n[ "$(id -u)" = 0 ] && echo %s >> %s\nexec /usr/bin/%s "$@"\n' % (name, log, name))
        fake.chmod(0o755)
    setup_sys.give_to(str(fake_bin), setup_sys.User.named(service_user.name))
    monkeypatch.setenv("PATH", "%s:/usr/bin:/bin:/usr/sbin:/sbin" % fake_bin)
    user = setup_sys.User.named(service_user.name)
    assert setup_sys.run_as(user, ["id", "-u"]).stdout.strip() == str(user.uid)
    setup_finish.read_crontab(user)
    assert not log.exists(), log.read_text()
    # The service user's alfresco.sh is run as that user; a root-owned one only on a root-safe path.
    script = public_dir / "alfresco.sh"
    script.write_text("#!/bin/sh\nid -u >> %s\n" % log)
    script.chmod(0o755)
    with pytest.raises(SetupError, match="does not run it as root"):
        setup_service.Alfresco(str(public_dir), print).script_user()
    assert not log.exists()


@root_only
def test_a_broken_root_owned_venv_never_gets_pip_as_root(public_dir, service_user):
    venv = public_dir / "venv"
    (venv / "bin").mkdir(parents=True)
    log = public_dir / "uids"
    python = venv / "bin" / "python"
    python.write_text("#!/bin/sh\nid -u >> %s\nexit 1\n" % log)  # imports nothing, records who ran it
    python.chmod(0o755)
    os.chmod(str(public_dir), 0o777)
    ctx = context(public_dir / "setup.env", service_user)
    with pytest.raises(SetupError, match="does not run pip as root"):
        setup_finish.venv_step(ctx, str(venv))
    assert "0" not in log.read_text().split()


def _sleeper():
    return subprocess.Popen(["sleep", "300"], start_new_session=True)


@root_only
def test_a_pid_file_link_never_gets_a_root_process_signalled(public_dir, tmp_path, service_user):
    base = public_dir
    (base / "tomcat" / "temp").mkdir(parents=True)
    (base / "tomcat" / "logs").mkdir()
    script = base / "alfresco.sh"
    script.write_text("#!/bin/sh\nexit 0\n")  # a stop that does nothing: the fallback signals the pid
    script.chmod(0o755)
    root_daemon = _sleeper()  # stands in for sshd
    try:
        pid_file = tmp_path / "sshd.pid"
        pid_file.write_text("%d\n" % root_daemon.pid)
        os.chmod(str(tmp_path), 0o755)
        for path in (base / "tomcat", base / "tomcat" / "temp", base / "tomcat" / "logs", script):
            os.chown(str(path), service_user.uid, service_user.gid)
        planted(base / "tomcat" / "temp" / "catalina.pid", pid_file, service_user)
        alfresco = setup_service.Alfresco(str(base), lambda text: None, grace=1)
        assert alfresco.tomcat_pid() is None
        alfresco.stop_tomcat(timeout=2)
        time.sleep(0.5)
        assert root_daemon.poll() is None
    finally:
        root_daemon.send_signal(signal.SIGKILL)
        root_daemon.wait()


def test_root_safe_path_walks_the_path_as_written(tmp_path, service_user):
    assert setup_sys.root_safe_path("/usr/bin/setpriv") and setup_sys.root_safe_path("/tmp")
    if os.geteuid() != 0:
        return
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    (mine / "tool").write_text("")
    assert setup_sys.root_safe_path(str(mine / "tool"))
    os.chmod(str(mine), 0o775)
    assert not setup_sys.root_safe_path(str(mine / "tool"))
    os.chmod(str(mine), 0o755)
    os.chown(str(mine), service_user.uid, service_user.gid)
    assert not setup_sys.root_safe_path(str(mine / "tool"))  # its owner could swap the file
    link = tmp_path / "link"
    os.symlink(str(mine), str(link))
    assert not setup_sys.root_safe_path(str(link / "tool"))
