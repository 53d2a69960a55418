"""A restored data directory as a running server: started with ``pg_ctl`` as the current user, waited for
until recovery has ended (promotion), stopped. Also the liveness and log helpers the in-place restore uses.

Raises restore_db.RestoreError with the server log's tail when the server stops or refuses the login.
"""

import os
import re
import socket
import time
import types

import postgres
import restore_settings
import subprocess_utils
from restore_db import RestoreError

STOPPED_RE = re.compile(r"shutting down due to startup process failure|startup process .* exited with exit code|"
                        r"FATAL: .*could not (create|bind)|database system is shut down")
# How often a starting server is asked whether it accepts logins and has left recovery: often enough not to
# add to the restore time (a refused local connection costs well under a millisecond).
POLL_S = 0.05
FATAL_CONNECT = ("password authentication failed", "no pg_hba.conf entry", "does not exist",
                 "peer authentication failed")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def conn_settings(cfg, host, port):
    """A config-like object for postgres.connect() aimed at another host/port, same role and database."""
    return types.SimpleNamespace(PGHOST=host, PGPORT=port, PGUSER=cfg.PGUSER, PGPASSWORD=cfg.PGPASSWORD,
                                 PGDATABASE=cfg.PGDATABASE)


def postmaster_alive(data_dir):
    """True when ``data_dir``/postmaster.pid names a live process, None when there is no such file."""
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as handle:
            pid = int(handle.readline().strip())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return True  # unreadable (another user's) or being written: treat as running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_from(path, offset):
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            handle.seek(offset)
            return handle.read()
    except OSError:
        return ""


def file_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def wait_promoted(conns, data_dir, timeout, log_path=None, log_offset=0):
    """Wait until a server accepts ``conns`` (tried in order) and ``pg_is_in_recovery()`` is false.

    Returns seconds waited. Raises RestoreError when the server stops (with its log's tail), refuses the
    login, or ``timeout`` passes."""
    started = time.monotonic()
    last, seen = "", False
    while True:
        waited = time.monotonic() - started
        for settings in conns:
            try:
                conn = postgres.connect(settings)
            except postgres.PostgresError as exc:
                last = str(exc)
                if any(text in last for text in FATAL_CONNECT):
                    raise RestoreError("the restored server refuses the login: %s" % last)
                continue
            try:
                if not postgres.query(conn, "SELECT pg_is_in_recovery()")[0][0]:
                    return time.monotonic() - started
                last = "still in recovery"
            finally:
                conn.close()
            break
        alive = postmaster_alive(data_dir)
        seen = seen or bool(alive)
        stopped = STOPPED_RE.search(read_from(log_path, log_offset)) if log_path else None
        if alive is False or stopped or (alive is None and (seen or waited > 15)):
            tail = "\n".join(read_from(log_path, log_offset).strip().splitlines()[-15:]) if log_path else ""
            reached, line = restore_settings.recovery_outcome(read_from(log_path, log_offset) if log_path else "")
            raise RestoreError("the restored server stopped during recovery%s%s" % (
                ": " + line if line else "", "\nits log (%s) ends with:\n%s" % (log_path, tail) if tail else ""))
        if waited > timeout:
            raise RestoreError("recovery did not finish within %d s (%s)" % (timeout, last))
        time.sleep(POLL_S)


class Server:
    """A restored data directory run with pg_ctl as the current user; ``log_file`` takes its output."""

    def __init__(self, pg_ctl, data_dir, log_file, log):
        self.pg_ctl = pg_ctl
        self.data_dir = data_dir
        self.log_file = log_file
        self.log = log
        self.env = subprocess_utils.base_env()
        self.log_offset = file_size(log_file)

    def start(self):
        """Start without waiting (recovery may take longer than pg_ctl's own timeout). Raises RestoreError."""
        if os.geteuid() == 0:
            raise RestoreError("PostgreSQL refuses to run as root: run restore.py as the OS user that owns "
                               "the restored directory")
        for path in (self.data_dir, self.log_file):
            # pg_ctl hands both paths to /bin/sh inside double quotes, where $( ), ` and \ still act.
            if restore_settings.SHELL_UNSAFE.search(path):
                raise RestoreError("refusing to start PostgreSQL on %r: pg_ctl passes it through /bin/sh, and it "
                                   "holds a quote, $, backquote or backslash. Restore to a plain path (--to, or "
                                   "VERIFY_SCRATCH_DIR for the drill; BACKUP_DIR is the default)" % path)
        try:
            subprocess_utils.run([self.pg_ctl, "-D", self.data_dir, "-l", self.log_file, "-W", "start"], self.env,
                                 timeout=120, what="pg_ctl start", log=self.log, daemon=True)
        except subprocess_utils.CommandError as exc:
            raise RestoreError("%s\nlog %s:\n%s" % (exc, self.log_file, self.log_tail()))

    def log_tail(self, lines=15):
        return "\n".join(read_from(self.log_file, self.log_offset).strip().splitlines()[-lines:])

    def outcome(self):
        return restore_settings.recovery_outcome(read_from(self.log_file, self.log_offset))

    def stop(self, modes=("fast", "immediate")):
        """Stop (fast, then immediate; a throwaway copy may go straight to ``("immediate",)``: no shutdown
        checkpoint). Never raises: a failure is logged."""
        if not postmaster_alive(self.data_dir):
            return
        for mode in modes:
            try:
                subprocess_utils.run([self.pg_ctl, "-D", self.data_dir, "-m", mode, "-w", "-t", "60", "stop"],
                                     self.env, timeout=90, what="pg_ctl stop", log=self.log)
                return
            except subprocess_utils.CommandError as exc:
                self.log.warning("could not stop the server in %s (%s): %s", self.data_dir, mode, exc)
