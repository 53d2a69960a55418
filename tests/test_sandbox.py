"""Smoke tests of the test sandbox itself (tests/sandbox.py): a real server, real files, real users."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import psycopg2
import pytest
from dotenv import dotenv_values

from sandbox import Sandbox, SandboxError, pid_alive

PATH_RE = re.compile(r"^\d{4}/[1-9]\d?/[1-9]\d?/(0|[1-9]\d?)/(0|[1-9]\d?)/[0-9a-f-]{36}\.bin$")
TRICKY_PASSWORD = "p#w$d 'q\"x\\y=z"


@pytest.fixture(scope="module")
def shared(service_user):
    """One default sandbox for the tests that only read (creation is the slow part)."""
    sb = Sandbox.create()
    yield sb
    sb.destroy()


def settings(sb, *names):
    out = sb.psql("SELECT name, setting FROM pg_settings WHERE name IN (%s)" % ", ".join("'%s'" % n for n in names),
                  user="postgres")
    return dict(line.split("|", 1) for line in out.splitlines())


def identify_system(sb):
    """Open a physical replication connection as alfresco; returns the CompletedProcess."""
    conninfo = "host=%s port=%d user=alfresco dbname=alfresco replication=true" % (sb.socket_dir, sb.port)
    return sb.run_as_service_user([sb.pg_bin + "/psql", "-X", "-A", "-t", "--no-password", conninfo, "-c",
                                   "IDENTIFY_SYSTEM"], extra_env={"PGPASSWORD": sb.alfresco_password}, timeout=30)


def db_contents(sb):
    rows = sb.psql("SELECT u.content_url, u.content_size FROM alf_content_url u "
                   "JOIN alf_content_data d ON d.content_url_id = u.id JOIN alf_node n ON n.id = d.id")
    return {url[len("store://"):]: int(size) for url, size in (r.split("|") for r in rows.splitlines())}


def test_server_runs_with_requested_settings(shared):
    assert shared.is_running()
    assert int(shared.psql("SHOW server_version_num")) >= 100000
    got = settings(shared, "port", "wal_level", "archive_mode", "archive_command", "fsync", "listen_addresses",
                   "unix_socket_directories", "max_wal_senders")
    assert got["port"] == str(shared.port)
    assert (got["wal_level"], got["archive_mode"], got["fsync"]) == ("replica", "on", "on")
    assert got["archive_command"] == '"/usr/bin/python3" "%s/wal.py" archive-push "%%p" "%s"' % (
        shared.project_dir, shared.wal_archive_dir)
    assert got["listen_addresses"] == "127.0.0.1" and got["unix_socket_directories"] == shared.socket_dir
    conn = psycopg2.connect(host="127.0.0.1", port=shared.port, dbname="alfresco", user="alfresco",
                            password=shared.alfresco_password)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user")
            assert cur.fetchone() == ("alfresco",)
    finally:
        conn.close()


def test_alfresco_role_needs_its_password_and_has_its_rights(shared):
    conn = shared.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user")
            assert cur.fetchone() == (True, False)
            cur.execute("SELECT pg_switch_wal(), pg_create_restore_point('smoke')")
    finally:
        conn.close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        shared.connect(password="wrong")
    no_password = shared.run_as_service_user(
        [shared.pg_bin + "/psql", "-X", "--no-password", "-h", shared.socket_dir, "-p", str(shared.port),
         "-U", "alfresco", "-d", "alfresco", "-c", "SELECT 1"], timeout=30)
    assert no_password.returncode != 0 and "password" in no_password.stderr
    assert identify_system(shared).returncode == 0


def test_contentstore_matches_database(shared):
    files = shared.content_files()
    assert len(files) == 40
    assert all(PATH_RE.match(path) for path in files), sorted(files)[:3]
    assert len({path.rsplit("/", 1)[0] for path in files}) >= 3
    assert sum(1 for size in files.values() if size >= 200 * 1024) == 2
    assert db_contents(shared) == files
    base = shared.alf_base_dir
    for rel in ("alf_data/keystore/keystore", "alf_data/keystore/keystore-passwords.properties"):
        assert stat.S_IMODE(os.stat(os.path.join(base, rel)).st_mode) == 0o600
    assert os.path.isdir(os.path.join(base, "alf_data/contentstore.deleted"))
    with open(os.path.join(base, "tomcat/shared/classes/alfresco-global.properties")) as handle:
        props = handle.read()
    assert "db.url=jdbc:postgresql://localhost:%d/alfresco\n" % shared.port in props
    assert "dir.root=%s/alf_data\n" % base in props
    assert os.path.realpath(os.path.join(shared.pg_bin, "pg_basebackup")) == os.path.realpath(
        os.path.join(shared.real_pg_bin, "pg_basebackup"))
    for name in ("backups", "backups/pg_wal"):
        assert stat.S_IMODE(os.stat(os.path.join(shared.root, name)).st_mode) == 0o700


def test_add_content_writes_files_and_rows(sandbox):
    new = sandbox.add_content(3, date=(2024, 12, 31, 23, 7))
    assert len(new) == 3 and all(p.startswith("2024/12/31/23/7/") for p in new)
    files = sandbox.content_files()
    assert len(files) == 43 and set(new) <= set(files)
    assert db_contents(sandbox) == files
    assert sandbox.add_content(1, size=5)[0] in sandbox.content_files()
    assert sandbox.psql("SELECT count(*) FROM alf_node") == "44"


def test_restart_stop_start_keep_data(sandbox):
    sandbox.psql("CREATE TABLE smoke (v text); INSERT INTO smoke VALUES ('kept')")
    first = sandbox.postmaster_pid()
    sandbox.restart()
    second = sandbox.postmaster_pid()
    assert first and second and first != second and not pid_alive(first)
    assert sandbox.psql("SELECT v FROM smoke") == "kept"
    sandbox.stop()
    assert not sandbox.is_running() and sandbox.postmaster_pid() is None
    with pytest.raises(SandboxError):
        sandbox.psql("SELECT 1")
    sandbox.start()
    assert sandbox.is_running() and sandbox.psql("SELECT count(*) FROM smoke") == "1"


def test_write_env_round_trips_through_dotenv(sandbox_factory):
    sb = sandbox_factory(n_files=1, alfresco_password=TRICKY_PASSWORD)
    path = sb.write_env(RETENTION_DAYS=None, SMTP_HOST="mail.example.org")
    values = dotenv_values(path)
    assert values == {"PGHOST": sb.socket_dir, "PGPORT": str(sb.port), "PGUSER": "alfresco",
                      "PGPASSWORD": TRICKY_PASSWORD, "PGDATABASE": "alfresco", "BACKUP_DIR": sb.backup_dir,
                      "ALF_BASE_DIR": sb.alf_base_dir, "SMTP_HOST": "mail.example.org"}
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == sb.uid
    conn = psycopg2.connect(host=values["PGHOST"], port=int(values["PGPORT"]), user=values["PGUSER"],
                            password=values["PGPASSWORD"], dbname=values["PGDATABASE"])
    conn.close()
    assert dotenv_values(sb.write_env(os.path.join(sb.root, "other.env")))["RETENTION_DAYS"] == "7"
    with pytest.raises(ValueError):
        sb.write_env(PGPASSWORD="a${HOME}b")


def test_run_cli_runs_as_service_user(shared):
    script = os.path.join(shared.root, "probe.py")
    with open(script, "w") as handle:
        handle.write("import json, os, sys\nimport dotenv, psycopg2\n"
                     "print(json.dumps({'argv': sys.argv[1:], 'uid': os.getuid(), 'groups': os.getgroups(),"
                     " 'home': os.environ['HOME'], 'cwd': os.getcwd(), 'x': os.environ.get('X'),"
                     " 'pw': os.environ.get('PGPASSWORD'), 'stdin': sys.stdin.read()}))\n")
    shared.chown_to_service_user(script)
    env_path = shared.write_env()
    proc = shared.run_cli(script, ["a", 1], env_path=env_path, extra_env={"X": "y"}, input="in", timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["argv"] == ["--env", env_path, "a", "1"]
    assert got["uid"] == shared.uid and got["home"] == shared.home and got["cwd"] == shared.root
    assert (got["x"], got["pw"], got["stdin"]) == ("y", None, "in")
    if os.geteuid() == 0:
        assert set(got["groups"]) <= {shared.gid}


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the sandbox to another user")
def test_root_hands_everything_to_the_service_user(shared):
    assert shared.service_user == "alfbackup" and shared.uid != 0
    for dirpath, dirs, names in os.walk(shared.root):
        for name in [dirpath] + [os.path.join(dirpath, n) for n in dirs + names]:
            assert os.lstat(name).st_uid == shared.uid, name
    with open("/proc/%d/status" % shared.postmaster_pid()) as handle:
        uid_line = [line for line in handle if line.startswith("Uid:")][0]
    assert uid_line.split()[1:] == [str(shared.uid)] * 4
    assert shared.run_as_service_user(["id", "-u"]).stdout.strip() == str(shared.uid)


def test_archiving_with_a_verbatim_command(sandbox_factory):
    sb = sandbox_factory(n_files=1, archive_command='test ! -f "{archive_dir}/%f" && cp "%p" "{archive_dir}/%f"')
    segment = sb.psql("SELECT pg_walfile_name(pg_current_wal_lsn())", user="postgres")
    sb.psql("CREATE TABLE t AS SELECT 1 AS x; SELECT pg_switch_wal()")
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(sb.wal_archive_dir, segment)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert os.path.exists(os.path.join(sb.wal_archive_dir, segment))


def test_options_turn_off_replication_and_archiving(sandbox_factory):
    sb = sandbox_factory(n_files=2, archive=False, replication=False, hba_replication=False, start=False,
                         extra_conf={"archive_timeout": 60, "log_min_messages": "notice"})
    assert not sb.is_running()
    sb.start()
    got = settings(sb, "archive_mode", "archive_timeout", "log_min_messages")
    assert got == {"archive_mode": "off", "archive_timeout": "60", "log_min_messages": "notice"}
    assert sb.psql("SELECT rolreplication FROM pg_roles WHERE rolname = 'alfresco'") == "f"
    with open(os.path.join(sb.pgdata, "pg_hba.conf")) as handle:
        assert "replication" not in handle.read()
    assert identify_system(sb).returncode != 0


def test_alfresco_sh_and_destroy(sandbox_factory):
    sb = sandbox_factory(n_files=1)
    script = os.path.join(sb.alf_base_dir, "alfresco.sh")
    status = sb.run_as_service_user([script, "status"], timeout=30)
    assert status.returncode == 3 and "postgresql already running" in status.stdout
    assert sb.run_as_service_user([script, "start", "tomcat"], timeout=30).returncode == 0
    with open(os.path.join(sb.alf_base_dir, "tomcat/logs/catalina.out")) as handle:
        assert "Server startup in" in handle.read()
    assert sb.run_as_service_user([script, "status"], timeout=30).returncode == 0
    stop = sb.run_as_service_user([script, "stop"], timeout=60)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not sb.is_running() and not os.path.exists(os.path.join(sb.alf_base_dir, "tomcat/temp/catalina.pid"))
    assert sb.run_as_service_user([script, "start"], timeout=60).returncode == 0
    assert sb.is_running() and sb.psql("SELECT 1") == "1"
    with open(os.path.join(sb.alf_base_dir, "tomcat/temp/catalina.pid")) as handle:
        tomcat = int(handle.read())
    postmaster = sb.postmaster_pid()
    shutil.rmtree(sb.pg_bin)  # pg_ctl gone: destroy must fall back to killing by postmaster.pid
    sb.destroy()
    assert not pid_alive(postmaster) and not pid_alive(tomcat) and not os.path.exists(sb.root)
    sb.destroy()  # idempotent


def test_cli_create_reattach_destroy():
    root = tempfile.mkdtemp(prefix="alfsandbox-cli-", dir="/tmp")
    os.chmod(root, 0o755)
    cli = [sys.executable, os.path.join(os.path.dirname(__file__), "sandbox.py")]
    try:
        proc = subprocess.run(cli + ["create", "--root", root, "--n-files", "3"], capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert info["root"] == root and os.path.isfile(info["env_file"])
        sb = Sandbox.load(root)
        assert sb.port == info["port"] and sb.psql("SELECT count(*) FROM alf_content_url") == "3"
        assert subprocess.run(cli + ["stop", "--root", root], timeout=60, check=False).returncode == 0
        assert not sb.is_running()
        assert subprocess.run(cli + ["start", "--root", root], timeout=60, check=False).returncode == 0
        assert sb.is_running()
        assert subprocess.run(cli + ["destroy", "--root", root], timeout=60, check=False).returncode == 0
        assert not os.path.exists(root)
    finally:
        if os.path.exists(os.path.join(root, "sandbox.json")):
            Sandbox.load(root).destroy()
        shutil.rmtree(root, ignore_errors=True)
