"""The wizard's database sessions (as PGUSER and as the superuser), spoken from this process (pgwire.py, pgtext.py).

Why not psql: under sudo the superuser's psql ran as the service user with the password in its environment
(readable in /proc/<pid>/environ by that user), and it was the bundle's psql, a binary that user owns. Here
the password never leaves this process, no program runs, and the database name is only ever a name. Peer
authentication still works: the Unix socket is connected by a child process with the OS user's identity
(setup_sys.connect_unix_as) and the login itself runs here. Before any password is sent, the server must be
run by PostgreSQL's OS user (the data directory's owner) or root: a socket or a local TCP port the service
user opened in its place is refused. Standard library only.
"""

import ipaddress
import json
import os
import socket
import struct

import pgtext
import pgwire
import setup_safefs
import setup_sys
from setup_sys import SetupError, parse_bool_row


DEFAULT_SOCKET_DIRS = ("/tmp", "/var/run/postgresql", "/run/postgresql")  # libpq's compiled-in choices


def default_host(port):
    """libpq's default when PGHOST is empty: the first default socket directory that has the server's socket,
    else localhost."""
    for directory in DEFAULT_SOCKET_DIRS:
        if os.path.exists(socket_path(directory, port)):
            return directory
    return "localhost"


class Psql:
    """SQL as one role on one server, one session per call (the server may restart between calls).

    ``bin_dir`` is unused (kept for callers written for psql); ``password`` None/'' means ~/.pgpass of
    ``os_user`` or a password-less login (peer, as ``os_user``); ``server_uid`` the uid the server must run as
    (the data directory's owner; None: not checked). ``run`` returns what ``psql -A -t`` would print.
    """

    def __init__(self, bin_dir, host, port, database, user, password, os_user, server_uid=None):
        self.port = int(port or 5432)
        self.host = host or default_host(self.port)
        self.database, self.user, self.password = database or user, user, password or ""
        self.os_user, self.server_uid, self.bin_dir = os_user, server_uid, bin_dir

    @property
    def where(self):
        return "%s:%s" % (self.host, self.port)

    def run(self, sql, variables=None, timeout=60, replication=False):
        """The rows ``sql`` returns as ``psql -A -t`` prints them (values of ``variables`` bound to :'name' and
        :"name", statements split as psql splits them). Raises SetupError naming the role and the server."""
        try:
            parts = pgtext.statements(sql, variables)
        except (KeyError, ValueError) as exc:
            raise SetupError("cannot send %r: %s" % (sql[:80], exc))
        session = self._login(replication, timeout)
        results = []
        try:
            for part in parts:
                results += session.query(part)
        except (pgwire.PgError, OSError) as exc:
            raise SetupError("SQL as role %s on %s failed: %s" % (self.user, self.where, exc))
        finally:
            session.close()
        return pgtext.psql_text(results)

    def json(self, sql, variables=None):
        """The single JSON value ``sql`` returns, decoded."""
        out = self.run(sql, variables).strip()
        try:
            return json.loads(out) if out else None
        except ValueError:
            raise SetupError("unexpected output: %r" % out[:200])

    def bool_row(self, sql, variables=None):
        """The single row of booleans ``sql`` returns, as a tuple (SetupError unless exactly one row of
        't'/'f' fields)."""
        return parse_bool_row(self.run(sql, variables))

    def _login(self, replication, timeout):
        try:
            sock = self._connect(timeout)
        except OSError as exc:
            raise SetupError("login as role %s on %s failed: cannot connect: %s" % (
                self.user, self.where, exc.strerror or exc))
        password = self.password or self._pgpass(replication)
        try:
            return pgwire.login(sock, self.user, self.database, password, replication, timeout)
        except (pgwire.PgError, OSError, ValueError) as exc:
            raise SetupError("login as role %s on %s failed: %s" % (self.user, self.where, exc))

    def _connect(self, timeout):
        if self.host.startswith("/"):
            path = socket_path(self.host, self.port)
            sock = setup_sys.connect_unix_as(self.os_user or setup_sys.me(), path, timeout)
            self._check_server(sock, {peer_uid(sock)} - {None}, path)
            return sock
        sock = socket.create_connection((self.host, self.port), timeout)
        try:
            local = ipaddress.ip_address(sock.getpeername()[0].split("%")[0]).is_loopback
        except ValueError:
            local = False
        if local:  # another machine's listeners cannot be seen from here
            self._check_server(sock, listener_uids(self.port), "port %d on this machine" % self.port)
        return sock

    def _check_server(self, sock, uids, where):
        if self.server_uid is None:
            return
        strangers = sorted(uid for uid in uids if uid not in (0, self.server_uid))
        if strangers:
            sock.close()
            raise SetupError("%s is served by a process of uid %s, not by PostgreSQL's OS user (uid %d, the owner of "
                             "the data directory): no login as %s there; check PGHOST and PGPORT" % (
                                 where, ", ".join(map(str, strangers)), self.server_uid, self.user))

    def _pgpass(self, replication):
        """The password ~/.pgpass of os_user gives (libpq's rules; ignored unless private, as libpq does)."""
        user = self.os_user or setup_sys.me()
        path = os.path.join(user.home or "/", ".pgpass")
        try:
            fd = setup_safefs.open_checked(path, {user.uid}, root_ok=False)
        except (FileNotFoundError, SetupError):
            return None
        with os.fdopen(fd, "rb") as handle:
            if os.fstat(handle.fileno()).st_mode & 0o077:
                return None
            text = handle.read(setup_safefs.MAX_TEXT).decode("utf-8", "replace")
        return pgpass_password(text, self.host, self.port, "replication" if replication else self.database,
                                      self.user)


# ---- where to connect, and to whom -----------------------------------------------------------------------------
def socket_path(directory, port):
    """The Unix socket PostgreSQL listens on in ``directory`` for ``port``."""
    return os.path.join(directory, ".s.PGSQL.%d" % int(port))


def pgpass_password(text, host, port, database, user):
    """The password a ~/.pgpass text gives, by libpq's rules (``host:port:database:user:password``, ``*``
    matches anything, backslash escapes ``:`` and itself, the first matching line wins; a socket directory
    that is libpq's default also matches ``localhost``; a replication session matches the database
    ``replication``), or None."""
    hosts = {host or "localhost"}
    if host in DEFAULT_SOCKET_DIRS:
        hosts.add("localhost")
    wanted = (hosts, {str(port)}, {database}, {user})
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields, field, at = [], "", 0
        while at < len(line):
            if line[at] == "\\" and at + 1 < len(line):
                field, at = field + line[at + 1], at + 2
                continue
            if line[at] == ":" and len(fields) < 4:
                fields.append(field)
                field = ""
            else:
                field += line[at]
            at += 1
        fields.append(field)
        if len(fields) == 5 and all(f == "*" or f in w for f, w in zip(fields[:4], wanted)):
            return fields[4]
    return None


def peer_uid(sock):
    """The uid of the process at the other end of a connected Unix socket (SO_PEERCRED), or None."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    return struct.unpack("3i", creds)[1]


def listener_uids(port):
    """The uids owning a listening TCP socket on ``port`` (any address), from /proc/net/tcp{,6}; an empty
    set where that cannot be read."""
    uids = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as handle:
                rows = handle.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 7 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == int(port):
                uids.add(int(fields[7]))
    return uids
