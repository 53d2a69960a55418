"""A throw-away Alfresco 5.x-style bundle with a real PostgreSQL server, for end-to-end tests and ``make demo``.

Who runs what
    Not root: everything runs as the current user. Root (PostgreSQL refuses to run as root): the sandbox
    belongs to the unprivileged user ``alfbackup`` (created with useradd when missing), the server runs as
    it, and :meth:`Sandbox.run_cli` runs the project's scripts as it. ``Sandbox.python`` is the interpreter
    used for that: ``sys.executable`` if the service user can run it and import dotenv + psycopg2, else
    ``/usr/bin/python3`` if that can; otherwise :class:`SandboxError` (put the venv where the service user
    can read it, e.g. ``/usr/bin/python3 -m venv .venv`` in the checkout; /root is 0700).

Layout under the root R (``Sandbox.create()``; default R = ``mkdtemp(prefix="alfsandbox-", dir="/tmp")``)::

    R/alfresco/                          alf_base_dir (ALF_BASE_DIR)
        alfresco.sh                      fake installer script: start|stop|status [postgresql|tomcat]
        postgresql/bin/                  symlinks to every program of pg_bin
        postgresql/postgresql.log        server log
        alf_data/postgresql/             pgdata; superuser postgres, role + database alfresco
        alf_data/contentstore/Y/M/D/H/M/<uuid>.bin   contentstore_dir; one row each in alf_content_url,
                                         alf_content_data and alf_node
        alf_data/contentstore.deleted/   alf_data/keystore/{keystore,keystore-passwords.properties}
        tomcat/shared/classes/alfresco-global.properties, .../alfresco/extension/custom-context.xml
        tomcat/logs/catalina.out, tomcat/temp/catalina.pid (fake Tomcat: a ``sleep infinity`` process)
    R/run/                               socket_dir (unix_socket_directories)
    R/backups/                           backup_dir (0700); R/backups/pg_wal = wal_archive_dir (0700)
    R/backup.env                         written by write_env()
    R/sandbox.json                       parameters (0600) for Sandbox.load(R)

The server listens on 127.0.0.1:<free port> and on the socket; every login needs a password (scram-sha-256;
md5 on 9.x, which has no SCRAM). 9.4's own rules are followed too: ``initdb --nosync``, ``wal_level =
hot_standby``, no GRANT on pg_switch_xlog()/pg_create_restore_point() (only superusers may call them there).
``archive=True`` archives with ``"/usr/bin/python3" "<project>/wal.py" archive-push "%p" "<wal_archive_dir>"``;
a verbatim ``archive_command`` may contain ``{archive_dir}``, replaced by wal_archive_dir.

API (all paths absolute strings)::

    sb = Sandbox.create(root=None, pg_bin=None, n_files=40, archive=True, archive_command=None,
                        replication=True, hba_replication=True, start=True, extra_conf=None,
                        alfresco_password=None, switch_grants=True)
        # extra_conf: dict name -> value, or raw text; switch_grants: GRANT EXECUTE on pg_switch_wal() and
        # pg_create_restore_point() to alfresco (10+; 9.x refuses non-superusers whatever the grants)
    sb = Sandbox.load(root)                            # reattach (another process)
    attributes: root alf_base_dir pgdata pg_bin socket_dir port backup_dir wal_archive_dir contentstore_dir
        service_user uid gid home python superuser_password alfresco_password project_dir log_file
        real_pg_bin (the PostgreSQL install pg_bin links to)
        server_major (90400, 150000: from ``postgres --version``), password_method ('md5' or 'scram-sha-256')
    sb.switch_wal() -> name of the WAL segment it closed (restore point + pg_switch_wal/pg_switch_xlog)
    sb.start(timeout=60); sb.stop(mode="fast"); sb.restart(); sb.reload(); sb.is_running() -> bool
    sb.postmaster_pid() -> int or None; sb.append_conf(dict or text)   # then restart() or reload()
    sb.psql(sql, db="alfresco", user="alfresco", password=None) -> str   # stdout stripped; SandboxError on failure
    sb.connect(db="alfresco", user="alfresco", password=None) -> psycopg2 connection over the socket
    sb.add_content(n=1, date=(2024, 5, 1, 10, 30), size=None) -> [relpath]   # files + rows
    sb.content_files() -> {relpath: size}            # relpath like "2024/3/7/14/5/<uuid>.bin"
    sb.write_env(path=None, **overrides) -> path     # None removes a key; 0600, owned by the service user
    sb.run_cli(script, args=(), env_path=None, timeout=600, extra_env=None, input=None) -> CompletedProcess
        # [python, project_dir/script, ("--env", env_path,) *args] as the service user, cwd=R
    sb.run_as_service_user(argv, extra_env=None, **subprocess_kwargs) -> CompletedProcess (text, captured)
    sb.chown_to_service_user(path)                   # recursive; no-op when not root
    sb.destroy()                                     # kill server + fake Tomcat, rm -rf R

Environment: SANDBOX_PG_BIN selects the PostgreSQL bin directory (default: ``pg_config --bindir`` if it has
postgres and initdb, else the newest /usr/lib/postgresql/*/bin); ALFSANDBOX_KEEP=1 makes destroy() keep files.
Other majors (9.4, 10..18) come from tests/matrix_pg.py, whose bin dirs hold server and client tools together:
``SANDBOX_PG_BIN=$(python tests/matrix_pg.py path 9.4) pytest tests/test_backup_e2e.py`` runs a test on 9.4
(tests written for the system's major may assume its file names, e.g. backup_manifest, which 9.4..12 do not
write).

CLI (for ``make demo``)::

    python tests/sandbox.py create [--root DIR] [--n-files N] [--no-archive]   # prints JSON, leaves it running
    python tests/sandbox.py start|stop|destroy --root DIR
"""

import argparse
import collections
import datetime
import errno
import fcntl
import glob
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid

SERVICE_USER = "alfbackup"
SERVICE_HOME = "/var/lib/alfbackup"
ARCHIVE_PYTHON = "/usr/bin/python3"
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
DATES = [(2024, 3, 7, 14, 5), (2024, 3, 7, 9, 41), (2024, 11, 23, 0, 0), (2025, 1, 2, 23, 59)]

ServiceUser = collections.namedtuple("ServiceUser", "name uid gid home")


class SandboxError(Exception):
    """The sandbox could not be built, started or used; the message says what and shows output."""


def _i_am_root():
    return os.geteuid() == 0


def service_user():
    """The user the sandbox runs as (creating ``alfbackup`` when root and it is missing). Returns ServiceUser."""
    if not _i_am_root():
        entry = pwd.getpwuid(os.geteuid())
        return ServiceUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        entry = _create_service_user()
    return ServiceUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir or SERVICE_HOME)


def _create_service_user():
    # Serialised by a lock, and re-checked, because parallel test processes may race to create it.
    with open("/tmp/alfsandbox-useradd.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        last = ""
        for _attempt in range(5):
            try:
                return pwd.getpwnam(SERVICE_USER)
            except KeyError:
                pass
            proc = subprocess.run([shutil.which("useradd") or "/usr/sbin/useradd", "--system", "--create-home",
                                   "--home-dir", SERVICE_HOME, "--shell", "/bin/bash", SERVICE_USER],
                                  check=False, capture_output=True, text=True)
            last = proc.stderr.strip()
            time.sleep(0.2)
        try:
            return pwd.getpwnam(SERVICE_USER)
        except KeyError:
            raise SandboxError("cannot create user %s: %s" % (SERVICE_USER, last))


def _run_as(user, argv, extra_env=None, **kw):
    env = kw.pop("env", None)
    if env is None:
        env = {"PATH": SAFE_PATH, "HOME": user.home, "LANG": "C.UTF-8"}
        if "TZ" in os.environ:
            env["TZ"] = os.environ["TZ"]
    env = dict(env)
    env.update({k: str(v) for k, v in (extra_env or {}).items()})
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    if _i_am_root():
        kw.update(user=user.uid, group=user.gid, extra_groups=[])
    return subprocess.run([str(a) for a in argv], env=env, check=False, **kw)


_PYTHON_OK = {}


def resolve_python(user):
    """An interpreter the service user can run with dotenv and psycopg2 importable. Raises SandboxError."""
    tried = []
    for candidate in (sys.executable, "/usr/bin/python3"):
        if not candidate or candidate in tried:
            continue
        tried.append(candidate)
        key = (user.uid, candidate)
        if key not in _PYTHON_OK:
            try:
                proc = _run_as(user, [candidate, "-c", "import dotenv, psycopg2"], timeout=60, cwd="/")
                _PYTHON_OK[key] = proc.returncode == 0
            except (OSError, subprocess.SubprocessError):
                _PYTHON_OK[key] = False
        if _PYTHON_OK[key]:
            return candidate
    raise SandboxError(
        "user %s cannot run %s with python-dotenv and psycopg2 importable; the venv must live in a path the "
        "service user can read (e.g. /usr/bin/python3 -m venv .venv in the checkout, then pip install "
        "python-dotenv psycopg2-binary pytest, and run the tests with .venv/bin/python)"
        % (user.name, " or ".join(tried)))


def default_pg_bin():
    """The PostgreSQL bin directory to use (see the module docstring). Raises SandboxError if none."""
    if os.environ.get("SANDBOX_PG_BIN"):
        return os.environ["SANDBOX_PG_BIN"]
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], check=False, capture_output=True, text=True).stdout.strip()
        if out and all(os.path.isfile(os.path.join(out, p)) for p in ("postgres", "initdb")):
            return out
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: [int(x) for x in re.findall(r"\d+", p.split("/")[-3])])
    if not found:
        raise SandboxError("no PostgreSQL server found (set SANDBOX_PG_BIN to its bin directory)")
    return os.path.dirname(found[-1])


def server_major_of(pg_bin):
    """server_version_num-style major (90400, 150000) of ``pg_bin``/postgres. Raises SandboxError."""
    program = os.path.join(pg_bin, "postgres")
    try:
        out = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=60,
                             check=False).stdout
    except OSError as exc:
        raise SandboxError("%s does not run: %s" % (program, exc))
    match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", out)
    if not match:
        raise SandboxError("%s --version said %r" % (program, out))
    major = int(match.group(1))
    return major * 10000 if major >= 10 else major * 10000 + int(match.group(2) or 0) * 100


def pid_alive(pid):
    """True while process ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sql_literal(text):
    """``text`` as a standard SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def conf_value(value):
    """A Python value as a postgresql.conf value."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


def dotenv_quote(value):
    """``value`` double-quoted for python-dotenv. Raises ValueError for ``${`` (dotenv would expand it)."""
    value = str(value)
    if "${" in value:
        raise ValueError("python-dotenv would expand ${...} in %r" % value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _check_shell_safe(path):
    if re.search(r"[\"$`\\\n']", path):
        raise SandboxError("path not usable in a shell command: %r" % path)


ALFRESCO_SH = r"""#!/bin/bash
# Fake Alfresco 5.x installer control script (test sandbox). Run it as the install owner.
# Usage: alfresco.sh start|stop|restart|status [postgresql|tomcat]; status exits 3 unless all are running.
INSTALLDIR=@INSTALLDIR@
PG_CTL="$INSTALLDIR/postgresql/bin/pg_ctl"
PGDATA="$INSTALLDIR/alf_data/postgresql"
PGLOG="$INSTALLDIR/postgresql/postgresql.log"
CATALINA_PID="$INSTALLDIR/tomcat/temp/catalina.pid"
CATALINA_OUT="$INSTALLDIR/tomcat/logs/catalina.out"

postgresql_running() { "$PG_CTL" -D "$PGDATA" status >/dev/null 2>&1; }
tomcat_running() { [ -s "$CATALINA_PID" ] && kill -0 "$(cat "$CATALINA_PID")" 2>/dev/null; }

start_postgresql() {
    if postgresql_running; then echo "postgresql already running"; return 0; fi
    "$PG_CTL" -D "$PGDATA" -w -l "$PGLOG" start >/dev/null || { echo "postgresql could not be started"; return 1; }
    echo "$INSTALLDIR/postgresql/scripts/ctl.sh : postgresql  started"
}
stop_postgresql() {
    if ! postgresql_running; then echo "postgresql not running"; return 0; fi
    "$PG_CTL" -D "$PGDATA" -w stop -m fast >/dev/null || { echo "postgresql could not be stopped"; return 1; }
    echo "$INSTALLDIR/postgresql/scripts/ctl.sh : postgresql stopped"
}
start_tomcat() {
    if tomcat_running; then echo "tomcat already running"; return 0; fi
    nohup sleep infinity </dev/null >/dev/null 2>&1 &
    echo $! > "$CATALINA_PID"
    echo "$(date '+%b %d, %Y %r') org.apache.catalina.startup.Catalina start" >> "$CATALINA_OUT"
    echo "INFO: Server startup in 1234 ms" >> "$CATALINA_OUT"
    echo "$INSTALLDIR/tomcat/scripts/ctl.sh : tomcat started"
}
stop_tomcat() {
    if ! tomcat_running; then echo "tomcat not running"; rm -f "$CATALINA_PID"; return 0; fi
    pid=$(cat "$CATALINA_PID")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$CATALINA_PID"
    echo "$(date '+%b %d, %Y %r') org.apache.coyote.AbstractProtocol stop" >> "$CATALINA_OUT"
    echo "$INSTALLDIR/tomcat/scripts/ctl.sh : tomcat stopped"
}
status() {
    rc=0
    for c in "$@"; do
        if ${c}_running; then echo "$c already running"; else echo "$c not running"; rc=3; fi
    done
    return $rc
}
case "$2" in
    postgresql|tomcat) only="$2" ;;
    "") only="" ;;
    *) echo "usage: $0 start|stop|restart|status [postgresql|tomcat]"; exit 1 ;;
esac
case "$1" in
    start) if [ -n "$only" ]; then start_$only; else start_postgresql && start_tomcat; fi ;;
    stop) if [ -n "$only" ]; then stop_$only; else stop_tomcat; stop_postgresql; fi ;;
    restart) "$0" stop $only; "$0" start $only ;;
    status) if [ -n "$only" ]; then status "$only"; else status postgresql tomcat; fi ;;
    *) echo "usage: $0 start|stop|restart|status [postgresql|tomcat]"; exit 1 ;;
esac
"""

SCHEMA_SQL = """
CREATE TABLE alf_content_url (id bigint PRIMARY KEY, content_url varchar(255) UNIQUE NOT NULL,
    content_size bigint NOT NULL, orphan_time bigint);
CREATE TABLE alf_content_data (id bigint PRIMARY KEY, content_url_id bigint REFERENCES alf_content_url(id),
    content_mimetype_id bigint, content_encoding_id bigint, content_locale_id bigint);
CREATE TABLE alf_node (id bigint PRIMARY KEY, uuid varchar(36) NOT NULL, type_qname_id bigint,
    audit_created varchar(30));
"""


class Sandbox:
    """One sandbox; build with :meth:`create` or reattach with :meth:`load` (see the module docstring)."""

    def __init__(self, params):
        self.params = params
        self.root = params["root"]
        self.alf_base_dir = os.path.join(self.root, "alfresco")
        self.pgdata = os.path.join(self.alf_base_dir, "alf_data", "postgresql")
        self.contentstore_dir = os.path.join(self.alf_base_dir, "alf_data", "contentstore")
        self.pg_bin = os.path.join(self.alf_base_dir, "postgresql", "bin")
        self.real_pg_bin = params["pg_bin"]
        self.log_file = os.path.join(self.alf_base_dir, "postgresql", "postgresql.log")
        self.socket_dir = os.path.join(self.root, "run")
        self.backup_dir = os.path.join(self.root, "backups")
        self.wal_archive_dir = params["wal_archive_dir"]
        self.port = params["port"]
        self.superuser_password = params["superuser_password"]
        self.alfresco_password = params["alfresco_password"]
        self.project_dir = PROJECT_DIR
        self.user = service_user()
        self.service_user, self.uid, self.gid, self.home = self.user
        self._python = None
        self._server_major = None

    @property
    def server_major(self):
        """The server's major as a server_version_num (90400, 150000), from ``postgres --version``; cached."""
        if self._server_major is None:
            self._server_major = server_major_of(self.real_pg_bin)
        return self._server_major

    @property
    def password_method(self):
        """scram-sha-256 from 10, md5 before (9.x knows no SCRAM)."""
        return "scram-sha-256" if self.server_major >= 100000 else "md5"

    def switch_wal(self):
        """Close the current WAL segment (as the superuser; a restore point first, so that the switch is
        never a no-op, whose boundary position 17+ would name as the next, incomplete segment). Returns the
        closed segment's name."""
        self.psql("SELECT pg_create_restore_point('sandbox-switch')", db="postgres", user="postgres")
        if self.server_major >= 100000:
            return self.psql("SELECT pg_walfile_name(pg_switch_wal())", db="postgres", user="postgres")
        return self.psql("SELECT pg_xlogfile_name(pg_switch_xlog())", db="postgres", user="postgres")

    @property
    def python(self):
        """Interpreter for the project's CLIs as the service user (resolved on first use; SandboxError)."""
        if self._python is None:
            self._python = resolve_python(self.user)
        return self._python

    # ---- building -------------------------------------------------------------------------------------
    @classmethod
    def create(cls, root=None, pg_bin=None, n_files=40, archive=True, archive_command=None, replication=True,
               hba_replication=True, start=True, extra_conf=None, alfresco_password=None, switch_grants=True):
        """Build, initdb, start and fill a sandbox. Returns it (running unless ``start=False``).

        Raises SandboxError (the half-built root is removed) when a step fails.
        """
        if root is None:
            root = tempfile.mkdtemp(prefix="alfsandbox-", dir="/tmp")
        else:
            root = os.path.abspath(root)
            os.makedirs(root, exist_ok=True)
            if os.listdir(root):
                raise SandboxError("sandbox root %s is not empty" % root)
        params = {
            "root": root, "pg_bin": os.path.abspath(pg_bin or default_pg_bin()), "port": free_port(),
            "wal_archive_dir": os.path.join(root, "backups", "pg_wal"),
            "superuser_password": secrets.token_urlsafe(18),
            "alfresco_password": alfresco_password or "alf-" + secrets.token_urlsafe(15),
            "replication": replication, "hba_replication": hba_replication, "switch_grants": switch_grants,
        }
        if len(os.path.join(root, "run", ".s.PGSQL.65535")) > 100:
            raise SandboxError("sandbox root path too long for a Unix socket: %s" % root)
        sb = cls(params)
        try:
            sb._build_tree(n_files)
            sb._initdb()
            sb._configure(archive, archive_command, extra_conf)
            sb._first_start()
            sb._fill_database()
            sb._save()
            if not start:
                sb.stop()
        except BaseException:
            sb.destroy()
            raise
        return sb

    @classmethod
    def load(cls, root):
        """Reattach to the sandbox at ``root`` (reads R/sandbox.json). Raises SandboxError if absent."""
        path = os.path.join(os.path.abspath(root), "sandbox.json")
        try:
            with open(path, encoding="utf-8") as handle:
                return cls(json.load(handle))
        except (OSError, ValueError) as exc:
            raise SandboxError("no sandbox at %s: %s" % (root, exc))

    def _save(self):
        path = os.path.join(self.root, "sandbox.json")
        self._write(path, json.dumps(self.params, indent=2, sort_keys=True) + "\n", 0o600)

    def _write(self, path, data, mode):
        """Write ``data`` (str or bytes) to ``path`` with ``mode``, owned by the service user."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(path, mode)
        self.chown_to_service_user(path)

    def _mkdir(self, path, mode=0o755):
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode)
        self.chown_to_service_user(path)

    def _build_tree(self, n_files):
        os.chmod(self.root, 0o755)
        self.chown_to_service_user(self.root)
        base = self.alf_base_dir
        for rel in ("postgresql/bin", "alf_data", "alf_data/contentstore.deleted", "tomcat/logs",
                    "tomcat/temp", "tomcat/shared/classes/alfresco/extension", "alf_data/contentstore"):
            self._mkdir(os.path.join(base, rel))
        self._mkdir(self.socket_dir)
        self._mkdir(self.backup_dir, 0o700)
        self._mkdir(self.wal_archive_dir, 0o700)
        self._mkdir(os.path.join(base, "alf_data", "keystore"), 0o700)
        if not all(os.path.isfile(os.path.join(self.real_pg_bin, p)) for p in ("postgres", "initdb", "pg_ctl")):
            raise SandboxError("%s has no postgres, initdb or pg_ctl" % self.real_pg_bin)
        for name in sorted(os.listdir(self.real_pg_bin)):
            target = os.path.join(self.real_pg_bin, name)
            if os.path.isfile(target) and os.access(target, os.X_OK):
                os.symlink(target, os.path.join(self.pg_bin, name))
        self._write(os.path.join(base, "alf_data/keystore/keystore"), os.urandom(2048), 0o600)
        self._write(os.path.join(base, "alf_data/keystore/keystore-passwords.properties"),
                    "aliases=metadata\nkeystore.password=%s\nmetadata.keyData=\nmetadata.algorithm=DESede\n"
                    "metadata.password=%s\n" % (secrets.token_hex(8), secrets.token_hex(8)), 0o600)
        self._write(os.path.join(base, "tomcat/shared/classes/alfresco/extension/custom-context.xml"),
                    '<?xml version="1.0" encoding="UTF-8"?>\n<beans xmlns="http://www.springframework.org/'
                    'schema/beans"/>\n', 0o644)
        self._write(os.path.join(base, "tomcat/logs/catalina.out"), "", 0o644)
        self._write_properties()
        self._write(os.path.join(base, "alfresco.sh"), ALFRESCO_SH.replace("@INSTALLDIR@", _sh_quote(base)),
                    0o755)
        self._pending_rows = [self._new_file(DATES[i % len(DATES)], 200 * 1024 if i < 2 else None)
                              for i in range(n_files)]
        self.chown_to_service_user(self.root)
        if self.run_as_service_user(["test", "-w", self.root]).returncode != 0:
            raise SandboxError("user %s cannot reach %s: put the sandbox under a traversable directory"
                               % (self.service_user, self.root))

    def _write_properties(self):
        self._write(os.path.join(self.alf_base_dir, "tomcat/shared/classes/alfresco-global.properties"),
                    "dir.root=%s\ndb.username=alfresco\ndb.password=%s\ndb.name=alfresco\n"
                    "db.url=jdbc:postgresql://localhost:%d/alfresco\ndb.driver=org.postgresql.Driver\n"
                    % (os.path.join(self.alf_base_dir, "alf_data"), self.alfresco_password, self.port), 0o600)

    def _new_file(self, date, size=None):
        """Write one random .bin file for ``date`` (Y, M, D, h, m). Returns (relpath, size, uuid, date)."""
        ident = str(uuid.uuid4())
        reldir = "/".join(str(int(part)) for part in date)
        directory = self.contentstore_dir
        for part in reldir.split("/"):
            directory = os.path.join(directory, part)
            if not os.path.isdir(directory):
                self._mkdir(directory)
        size = size if size is not None else int.from_bytes(os.urandom(2), "big") % (64 * 1024) + 1024
        relpath = "%s/%s.bin" % (reldir, ident)
        self._write(os.path.join(self.contentstore_dir, relpath), os.urandom(size), 0o644)
        return relpath, size, ident, date

    def _initdb(self):
        fd, pwfile = tempfile.mkstemp(prefix=".pw-", dir=self.root)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(self.superuser_password + "\n")
            self.chown_to_service_user(pwfile)
            auth = self.password_method
            self._check(["%s/initdb" % self.pg_bin, "-D", self.pgdata, "-U", "postgres", "--auth-local=" + auth,
                         "--auth-host=" + auth, "--pwfile=" + pwfile, "-E", "UTF8", "--locale=C",
                         "--no-sync" if self.server_major >= 100000 else "--nosync"], "initdb", timeout=180)
        finally:
            os.unlink(pwfile)

    def _configure(self, archive, archive_command, extra_conf):
        if archive_command is None and archive:
            _check_shell_safe(self.project_dir)
            _check_shell_safe(self.wal_archive_dir)
            archive_command = '"%s" "%s" archive-push "%%p" "%s"' % (
                ARCHIVE_PYTHON, os.path.join(self.project_dir, "wal.py"), self.wal_archive_dir)
        elif archive_command is not None:
            archive_command = archive_command.replace("{archive_dir}", self.wal_archive_dir)
        settings = collections.OrderedDict([
            ("listen_addresses", "127.0.0.1"), ("unix_socket_directories", self.socket_dir),
            ("wal_level", "replica" if self.server_major >= 90600 else "hot_standby"), ("max_wal_senders", 10),
            ("synchronous_commit", False),
            ("shared_buffers", "16MB"), ("archive_mode", bool(archive)), ("archive_timeout", 0)])
        if archive_command is not None:
            settings["archive_command"] = archive_command
        if isinstance(extra_conf, dict):
            settings.update(extra_conf)
        with open(os.path.join(self.pgdata, "postgresql.conf"), encoding="utf-8") as handle:
            self._base_conf = handle.read()
        self._conf_block = "".join("%s = %s\n" % (k, conf_value(v)) for k, v in settings.items())
        if isinstance(extra_conf, str):
            self._conf_block += extra_conf.rstrip("\n") + "\n"
        self._write_conf()
        auth = self.password_method
        hba = ["local all all " + auth, "host all all 127.0.0.1/32 " + auth]
        if self.params["hba_replication"]:
            hba[1:1] = ["local replication all " + auth]
            hba.append("host replication all 127.0.0.1/32 " + auth)
        self._write(os.path.join(self.pgdata, "pg_hba.conf"), "\n".join(hba) + "\n", 0o600)

    def _write_conf(self):
        text = "%s\n# ---- alfsandbox ----\nport = %d\n%s" % (self._base_conf, self.port, self._conf_block)
        self._write(os.path.join(self.pgdata, "postgresql.conf"), text, 0o600)

    def _first_start(self):
        for attempt in range(5):
            try:
                self.start()
                return
            except SandboxError as exc:
                if attempt == 4 or "already in use" not in str(exc):
                    raise
            self.port = self.params["port"] = free_port()
            self._write_conf()
            self._write_properties()

    def _fill_database(self):
        role = "CREATE ROLE alfresco LOGIN %s PASSWORD %s;" % (
            "REPLICATION" if self.params["replication"] else "", sql_literal(self.alfresco_password))
        self.psql(role + "\nCREATE DATABASE alfresco OWNER alfresco ENCODING 'UTF8' TEMPLATE template0;",
                  db="postgres", user="postgres")
        rows = self._pending_rows
        del self._pending_rows
        # Before 10 these functions refuse non-superusers whatever the grants (setup.py makes a helper there).
        grants = ("GRANT EXECUTE ON FUNCTION pg_switch_wal() TO alfresco;\n"
                  "GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO alfresco;\n"
                  if self.server_major >= 100000 and self.params.get("switch_grants", True) else "")
        self.psql(grants + "SET ROLE alfresco;\n" + SCHEMA_SQL + self._rows_sql(rows, 1), user="postgres")

    @staticmethod
    def _rows_sql(files, first_id):
        if not files:
            return ""
        urls, data, nodes = [], [], []
        for offset, (relpath, size, ident, date) in enumerate(files):
            i = first_id + offset
            urls.append("(%d, %s, %d, NULL)" % (i, sql_literal("store://" + relpath), size))
            data.append("(%d, %d, 1, 1, 1)" % (i, i))
            nodes.append("(%d, '%s', 1, '%04d-%02d-%02dT%02d:%02d:00.000Z')" % ((i, ident) + tuple(date)))
        return ("BEGIN;\nINSERT INTO alf_content_url VALUES %s;\nINSERT INTO alf_content_data VALUES %s;\n"
                "INSERT INTO alf_node VALUES %s;\nCOMMIT;\n" % (",\n".join(urls), ",\n".join(data), ",\n".join(nodes)))

    # ---- server ---------------------------------------------------------------------------------------
    def _check(self, argv, what, timeout=120, **kw):
        proc = self.run_as_service_user(argv, timeout=timeout, **kw)
        if proc.returncode != 0:
            raise SandboxError("%s failed (exit %d):\n%s%s" % (what, proc.returncode, proc.stdout, proc.stderr))
        return proc

    def _log_tail(self, lines=15):
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""

    def start(self, timeout=60):
        """Start the server and wait until it accepts connections. Raises SandboxError with the log's tail."""
        proc = self.run_as_service_user([self.pg_bin + "/pg_ctl", "-D", self.pgdata, "-w", "-t", str(timeout),
                                         "-l", self.log_file, "start"], timeout=timeout + 30)
        if proc.returncode != 0:
            raise SandboxError("pg_ctl start failed (exit %d): %s\nlog:\n%s"
                               % (proc.returncode, proc.stderr.strip(), self._log_tail()))

    def stop(self, mode="fast"):
        """Stop the server (``mode``: smart, fast, immediate) and wait. Raises SandboxError."""
        self._check([self.pg_bin + "/pg_ctl", "-D", self.pgdata, "-w", "-t", "60", "stop", "-m", mode],
                    "pg_ctl stop", timeout=90)

    def restart(self):
        """Stop (fast) and start again."""
        self.stop()
        self.start()

    def reload(self):
        """Make the server re-read its configuration files."""
        self._check([self.pg_bin + "/pg_ctl", "-D", self.pgdata, "reload"], "pg_ctl reload")

    def is_running(self):
        """True when pg_ctl status finds a live server for pgdata."""
        proc = self.run_as_service_user([self.pg_bin + "/pg_ctl", "-D", self.pgdata, "status"], timeout=30)
        return proc.returncode == 0

    def postmaster_pid(self):
        """The PID in postmaster.pid if that process is alive and is postgres, else None."""
        try:
            with open(os.path.join(self.pgdata, "postmaster.pid")) as handle:
                pid = int(handle.readline().strip())
            with open("/proc/%d/comm" % pid) as handle:
                return pid if handle.read().strip() in ("postgres", "postmaster") else None
        except (OSError, ValueError):
            return None

    def append_conf(self, settings):
        """Append a dict (name -> value) or raw text to postgresql.conf; takes effect on reload/restart."""
        text = settings if isinstance(settings, str) else "".join(
            "%s = %s\n" % (k, conf_value(v)) for k, v in settings.items())
        path = os.path.join(self.pgdata, "postgresql.conf")
        with open(path, encoding="utf-8") as handle:
            current = handle.read()
        self._write(path, current + text.rstrip("\n") + "\n", 0o600)

    def _password_for(self, user, password):
        if password is not None:
            return password
        return {"alfresco": self.alfresco_password, "postgres": self.superuser_password}.get(user, "")

    def psql(self, sql, db="alfresco", user="alfresco", password=None):
        """Run ``sql`` (sent on stdin) with psql as the service user. Returns stdout stripped; SandboxError."""
        proc = self.run_as_service_user(
            [self.pg_bin + "/psql", "-X", "-A", "-t", "-q", "--no-password", "-v", "ON_ERROR_STOP=1",
             "-h", self.socket_dir, "-p", str(self.port), "-U", user, "-d", db],
            extra_env={"PGPASSWORD": self._password_for(user, password)}, input=sql, timeout=120)
        if proc.returncode != 0:
            raise SandboxError("psql as %s on %s failed (exit %d): %s" % (user, db, proc.returncode,
                                                                          proc.stderr.strip()))
        return proc.stdout.strip()

    def connect(self, db="alfresco", user="alfresco", password=None):
        """A psycopg2 connection over the Unix socket (psycopg2 errors propagate)."""
        import psycopg2

        return psycopg2.connect(host=self.socket_dir, port=self.port, dbname=db, user=user,
                                password=self._password_for(user, password), connect_timeout=10)

    # ---- content --------------------------------------------------------------------------------------
    def add_content(self, n=1, date=(2024, 5, 1, 10, 30), size=None):
        """Write ``n`` new .bin files under ``date`` and their rows. Returns their paths relative to
        contentstore_dir. Raises SandboxError when the rows cannot be inserted (server down)."""
        files = [self._new_file(date, size) for _ in range(n)]
        first = int(self.psql("SELECT coalesce(max(id), 0) + 1 FROM alf_content_url"))
        self.psql(self._rows_sql(files, first))
        return [f[0] for f in files]

    def content_files(self):
        """{path relative to contentstore_dir: size} of every file in the contentstore."""
        result = {}
        for dirpath, _dirs, names in os.walk(self.contentstore_dir):
            for name in names:
                full = os.path.join(dirpath, name)
                result[os.path.relpath(full, self.contentstore_dir)] = os.lstat(full).st_size
        return result

    # ---- running the project's programs ---------------------------------------------------------------
    def write_env(self, path=None, **overrides):
        """Write a .env for backup.py (see module docstring). Returns its path. ValueError for a ``${``."""
        values = collections.OrderedDict([
            ("PGHOST", self.socket_dir), ("PGPORT", self.port), ("PGUSER", "alfresco"),
            ("PGPASSWORD", self.alfresco_password), ("PGDATABASE", "alfresco"), ("BACKUP_DIR", self.backup_dir),
            ("ALF_BASE_DIR", self.alf_base_dir), ("RETENTION_DAYS", 7)])
        for key, value in overrides.items():
            if value is None:
                values.pop(key, None)
            else:
                values[key] = value
        path = path or os.path.join(self.root, "backup.env")
        self._write(path, "".join("%s=%s\n" % (k, dotenv_quote(v)) for k, v in values.items()), 0o600)
        return path

    def run_as_service_user(self, argv, extra_env=None, **kw):
        """subprocess.run(argv) as the service user: minimal env (PATH, HOME, LANG=C.UTF-8) + ``extra_env``,
        cwd R, text output captured, no check. Other keyword arguments go to subprocess.run."""
        kw.setdefault("cwd", self.root if os.path.isdir(self.root) else "/")
        return _run_as(self.user, argv, extra_env=extra_env, **kw)

    def run_cli(self, script, args=(), env_path=None, timeout=600, extra_env=None, input=None):
        """Run ``python project_dir/script [--env env_path] *args`` as the service user (an absolute
        ``script`` is used as is). Returns the CompletedProcess (text); subprocess.TimeoutExpired after
        ``timeout`` s; SandboxError when no usable interpreter exists."""
        argv = [self.python, os.path.join(self.project_dir, script)]
        if env_path:
            argv += ["--env", env_path]
        return self.run_as_service_user(argv + [str(a) for a in args], extra_env=extra_env, input=input,
                                        timeout=timeout)

    def chown_to_service_user(self, path):
        """Give ``path`` (recursively, symlinks not followed) to the service user; no-op unless root."""
        if not _i_am_root():
            return
        os.lchown(path, self.uid, self.gid)
        if os.path.isdir(path) and not os.path.islink(path):
            for dirpath, dirs, names in os.walk(path):
                for name in dirs + names:
                    os.lchown(os.path.join(dirpath, name), self.uid, self.gid)

    # ---- teardown -------------------------------------------------------------------------------------
    def _kill_tomcat(self):
        try:
            with open(os.path.join(self.alf_base_dir, "tomcat/temp/catalina.pid")) as handle:
                pid = int(handle.read().strip())
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                if handle.read().split(b"\0")[:2] == [b"sleep", b"infinity"]:
                    os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass

    def destroy(self):
        """Kill the server (immediate stop, then SIGKILL by postmaster.pid) and fake Tomcat, remove R.

        Never raises for a half-built or already destroyed sandbox. ALFSANDBOX_KEEP=1 keeps the files.
        """
        self._kill_tomcat()
        if os.path.exists(os.path.join(self.pgdata, "postmaster.pid")):
            try:
                self.run_as_service_user([self.pg_bin + "/pg_ctl", "-D", self.pgdata, "-w", "-t", "20", "stop",
                                          "-m", "immediate"], timeout=40)
            except (OSError, subprocess.SubprocessError):
                pass
        pid = self.postmaster_pid()
        if pid:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                    break
                except OSError:
                    continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and pid_alive(pid):
                time.sleep(0.05)
        if not os.environ.get("ALFSANDBOX_KEEP"):
            if sys.version_info >= (3, 12):
                shutil.rmtree(self.root, onexc=lambda func, path, exc: _force_remove(func, path, (None, exc, None)))
            else:
                shutil.rmtree(self.root, onerror=_force_remove)


CRONTAB_LOCK = "/tmp/alfsandbox-crontab.lock"


def crontab(user_name):
    """The crontab text of ``user_name`` ('' when it has none)."""
    argv = ["crontab", "-u", user_name, "-l"] if _i_am_root() else ["crontab", "-l"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return proc.stdout if proc.returncode == 0 else ""


class CrontabGuard:
    """Holds an exclusive lock on CRONTAB_LOCK (test runs in other checkouts wait for it: the wizard writes the
    service user's real crontab) and puts that crontab back as it was on release."""

    def __init__(self, user_name):
        self.user_name = user_name
        self._lock = open(CRONTAB_LOCK, "a")
        try:
            os.chmod(CRONTAB_LOCK, 0o666)
        except OSError:
            pass
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.before = crontab(user_name)

    def release(self):
        argv = ["crontab", "-u", self.user_name] if _i_am_root() else ["crontab"]
        if self.before:
            subprocess.run(argv + ["-"], input=self.before, text=True, check=True)
        else:
            subprocess.run(argv + ["-r"], capture_output=True, check=False)
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()


def _sh_quote(text):
    return "'" + text.replace("'", "'\\''") + "'"


def _force_remove(func, path, exc_info):
    # A test may leave a read-only directory behind; make its parent writable and retry once.
    if isinstance(exc_info[1], FileNotFoundError):
        return
    if isinstance(exc_info[1], OSError) and exc_info[1].errno in (errno.EACCES, errno.EPERM):
        parent = os.path.dirname(path)
        try:
            os.chmod(parent, stat.S_IRWXU)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, stat.S_IRWXU)
            func(path)
            return
        except OSError:
            pass
    sys.stderr.write("sandbox: cannot remove %s: %s\n" % (path, exc_info[1]))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Alfresco + PostgreSQL test sandbox")
    parser.add_argument("action", choices=["create", "start", "stop", "destroy"])
    parser.add_argument("--root", help="sandbox directory (create: must be empty or absent)")
    parser.add_argument("--n-files", type=int, default=40)
    parser.add_argument("--no-archive", action="store_true", help="leave archive_mode off")
    args = parser.parse_args(argv)
    if args.action != "create" and not args.root:
        parser.error("--root is required for %s" % args.action)
    try:
        if args.action == "create":
            sb = Sandbox.create(root=args.root, n_files=args.n_files, archive=not args.no_archive)
            info = {key: getattr(sb, key) for key in (
                "root", "alf_base_dir", "pgdata", "pg_bin", "socket_dir", "port", "backup_dir", "wal_archive_dir",
                "contentstore_dir", "log_file", "service_user", "project_dir")}
            info["env_file"] = sb.write_env()
            info["alfresco_sh"] = os.path.join(sb.alf_base_dir, "alfresco.sh")
            try:
                info["python"] = sb.python
            except SandboxError as exc:
                info["python"], info["python_error"] = None, str(exc)
            info["created_at"] = datetime.datetime.now().isoformat(timespec="seconds")
            print(json.dumps(info, indent=2))
        else:
            sb = Sandbox.load(args.root)
            {"start": sb.start, "stop": sb.stop, "destroy": sb.destroy}[args.action]()
    except SandboxError as exc:
        sys.stderr.write("sandbox: %s\n" % exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
