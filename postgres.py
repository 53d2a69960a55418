"""PostgreSQL: the server's tools and versions, the pg_basebackup flags for a client/server pair, connections.

:func:`find_bin_dir` → :func:`client_version` → :func:`basebackup_plan` (pure: flags for this client/server
pair, compression and its fallbacks). Taking and checking the backup is :mod:`base_backup`'s job;
:func:`connect`, :func:`query` and :func:`server_facts` talk to the running server.
"""

import os
import shutil

import pg_versions
import subprocess_utils
import tar_io

MIN_TAR_SERVER_FOR_NEW_CLIENT = pg_versions.MIN_TAR_SERVER_FOR_NEW_CLIENT


class PostgresError(Exception):
    """The base backup could not be taken or failed its checks. The message says what and how to fix."""


def find_bin_dir(pg_bin_dir, alf_base_dir):
    """Directory of the client tools: PG_BIN_DIR, else ALF_BASE_DIR/postgresql/bin when it holds
    pg_basebackup, else the directory of pg_basebackup on PATH. Raises PostgresError when none has it."""
    if pg_bin_dir:
        if not os.access(os.path.join(pg_bin_dir, "pg_basebackup"), os.X_OK):
            raise PostgresError("PG_BIN_DIR=%s has no executable pg_basebackup" % pg_bin_dir)
        return pg_bin_dir
    bundled = os.path.join(alf_base_dir or "", "postgresql", "bin")
    if alf_base_dir and os.access(os.path.join(bundled, "pg_basebackup"), os.X_OK):
        return bundled
    found = shutil.which("pg_basebackup")
    if not found:
        raise PostgresError("pg_basebackup not found in %s nor on PATH: install the PostgreSQL client tools "
                            "of the server's version or set PG_BIN_DIR" % bundled)
    return os.path.dirname(found)


def parse_version_num(text):
    """'pg_basebackup (PostgreSQL) 15.18 (Debian ...)' → 150018 (pg_versions.parse_version_num). Raises
    PostgresError."""
    try:
        return pg_versions.parse_version_num(text)
    except ValueError as exc:
        raise PostgresError(str(exc))


# Kept under their old names: the rules live in pg_versions.
version_label = pg_versions.version_label
major_of = pg_versions.major_of


def client_version(bin_dir, env):
    """(path of pg_basebackup, version_num). Raises PostgresError."""
    path = os.path.join(bin_dir, "pg_basebackup")
    try:
        result = subprocess_utils.run([path, "--version"], env, timeout=30, what="pg_basebackup --version")
    except subprocess_utils.CommandError as exc:
        raise PostgresError(str(exc))
    return path, parse_version_num(result.stdout)


class BasebackupPlan:
    """What :func:`basebackup_plan` decided: ``args`` (flags after -D DIR), ``wal_method``,
    ``compression`` (method actually used), ``level``, ``extension``, ``notes`` (warnings to log),
    ``location`` ('client' or 'server')."""

    @property
    def spec(self):
        return "%s-%s%s" % (self.location, self.compression, ":%d" % self.level if self.level is not None else "")

    def __init__(self, args, wal_method, compression, level, extension, notes, location="client"):
        self.location = location
        self.args = args
        self.wal_method = wal_method
        self.compression = compression
        self.level = level
        self.extension = extension
        self.notes = notes


def basebackup_plan(client_num, server_num, compression, label):
    """Flags for ``pg_basebackup`` (pure). ``compression`` is PG_COMPRESSION ('zstd:3', 'gzip', ...).

    Raises PostgresError when this client cannot back up this server at all.
    """
    refusal = pg_versions.tar_backup_refusal(client_num, server_num)
    if refusal == "older than the server":
        raise PostgresError(
            "pg_basebackup %s is older than the server (%s): use the server's own tools (PG_BIN_DIR, or "
            "ALF_BASE_DIR/postgresql/bin)" % (version_label(client_num), version_label(server_num)))
    if refusal:
        raise PostgresError(
            "pg_basebackup %s cannot take tar-format backups of a %s server: set PG_BIN_DIR to the bundle's "
            "postgresql/bin" % (version_label(client_num), version_label(server_num)))
    notes = []
    new_syntax = pg_versions.compress_syntax_new(client_num)
    server_side = pg_versions.server_compression_possible(client_num, server_num)
    location, method, level = parse_compression(compression)
    if location is None:
        # Measured here: server-side zstd 0.56-0.75 s vs client-side 0.79-0.99 s for the same 450 MB cluster.
        location = "server" if server_side else "client"
    if not new_syntax and method in ("zstd", "lz4"):
        notes.append("pg_basebackup %s supports only gzip; using gzip instead of %s"
                     % (version_label(client_num), method))
        method, level = "gzip", None
    if location == "server" and (not server_side or method == "none"):
        if method != "none":
            notes.append("server-side compression needs PostgreSQL 15+ on both ends; compressing on the client")
        location = "client"
    wal_method = pg_versions.basebackup_wal_method(client_num)
    args = ["-F", "t", "-X", wal_method, "--checkpoint=fast", "--label=%s" % label, "--no-password",
            "--verbose"]
    if method != "none":
        if new_syntax:
            spec = "%s-%s" % (location, method) + (":level=%d" % level if level is not None else "")
            args.append("--compress=%s" % spec)
        elif level is not None:
            args.append("--compress=%d" % level)
        else:
            args.append("--gzip")
    if pg_versions.writes_manifest(client_num, server_num):
        args.append("--manifest-checksums=SHA256")
    return BasebackupPlan(args, wal_method, method, level, tar_io.EXTENSIONS[method], notes, location)


def parse_compression(text):
    """'server-zstd:5' → ('server', 'zstd', 5); 'gzip' → (None, 'gzip', None): no location means "the
    fastest that works", see :func:`basebackup_plan` (pure)."""
    location, _, rest = text.partition("-") if text.startswith(("client-", "server-")) else (None, "", text)
    method, _, level = rest.partition(":")
    return location, method, int(level) if level else None


def unsupported_compression(stderr):
    """True when pg_basebackup (or the server) was built without the requested compression library."""
    text = stderr.lower()
    return ("not supported" in text or "does not support" in text) and \
        any(m in text for m in ("zstd", "lz4", "compression"))


def hint_for(stderr):
    """A fix for the errors admins meet most often, appended to the message."""
    text = stderr.lower()
    if "no pg_hba.conf entry for replication" in text:
        return " (add a 'replication' line for this role to pg_hba.conf and reload, or run setup.py)"
    if "must be superuser or replication role" in text or "permission denied to start" in text:
        return " (grant it: ALTER ROLE <PGUSER> REPLICATION; or run setup.py)"
    if "password authentication failed" in text:
        return " (check PGPASSWORD in .env)"
    if "number of requested standby connections exceeds" in text or "max_wal_senders" in text:
        return " (raise max_wal_senders to at least 3 and restart PostgreSQL)"
    if "no space left on device" in text:
        return " (BACKUP_DIR is full: free space or lower RETENTION_DAYS)"
    if "permission denied" in text:
        return " (a file in the data directory is not readable by the server's user; see the log)"
    return ""


def connect(cfg, dbname=None):
    """A psycopg2 connection to the running server (autocommit). Raises PostgresError with a hint."""
    import psycopg2  # imported late: wal.py's environment has no psycopg2, and setup.py may lack it

    try:
        conn = psycopg2.connect(host=cfg.PGHOST, port=cfg.PGPORT, user=cfg.PGUSER,
                                password=cfg.PGPASSWORD or None, dbname=dbname or cfg.PGDATABASE,
                                connect_timeout=15, application_name="alfresco-backup")
    except psycopg2.Error as exc:
        message = str(exc).strip().replace(cfg.PGPASSWORD or "\0", "********")
        raise PostgresError("cannot connect to PostgreSQL at %s:%s as %s: %s%s" % (
            cfg.PGHOST, cfg.PGPORT, cfg.PGUSER, message, hint_for(message)))
    conn.autocommit = True
    return conn


def query(conn, sql, params=None):
    """All rows of ``sql``."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else []


def server_facts(conn):
    """{'version_num', 'wal_segment_size', 'database_size' (Alfresco's), 'cluster_size' (all we can see)}."""
    num = int(query(conn, "SHOW server_version_num")[0][0])
    seg = query(conn, "SELECT setting, unit FROM pg_settings WHERE name = 'wal_segment_size'")
    seg_size = pg_versions.wal_segment_bytes(seg[0][0], seg[0][1]) if seg else 16 * 1024 * 1024
    size = query(conn, "SELECT pg_database_size(current_database())")[0][0]
    # Databases this role may not connect to cannot be measured; they are small in an Alfresco cluster.
    cluster = query(conn, "SELECT sum(pg_database_size(oid)) FROM pg_database "
                          "WHERE has_database_privilege(oid, 'CONNECT')")[0][0]
    return {"version_num": num, "wal_segment_size": seg_size, "database_size": int(size),
            "cluster_size": int(cluster or size)}
