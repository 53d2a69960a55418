"""The set-up wizard's steps apart from PostgreSQL's own (those are in setup_pg.py): prerequisites, install
detection, ``.env``, directories, venv, cron and the final check.

Each step function takes the :class:`Context`, says what it would change, asks (``ctx.decide``), applies
and records the outcome (``ctx.record``). Steps raise SetupError/AnswerError; setup.py catches them.
"""

import datetime
import glob
import os
import re
import sys

import config
import setup_files
import setup_formats
import setup_safefs
import setup_sys
from setup_sys import AnswerError, SetupError

INSTALL_HINT = "sudo apt-get install -y %s    (Debian/Ubuntu; on RHEL-like systems: sudo dnf install -y %s)"
LIKELY_BASES = ("/opt/alfresco", "/opt/alfresco-community", "/opt/alfresco-content-services",
                "/opt/alfresco-one", "/usr/local/alfresco")
CHANGED, UNCHANGED, SKIPPED, WOULD, FAILED, PENDING, PASSED = "changed", "unchanged", "skipped", \
    "would change", "FAILED", "pending", "ok"


class Context:
    """Everything the steps share: ``ui`` (prompts), ``dry_run``, ``project_dir``, ``env_path``, the .env
    ``values``, ``service_user``, ``pg_os_user`` (owner of the data directory), ``pgdata``, ``bin_dir``,
    ``archive_command``, ``user_psql``/``super_psql`` (setup_db.Psql, the latter None without a
    superuser), ``server_num``, ``restart_needed``, ``auto_conf_copy``/``conf_copy`` ((file, copy, original
    text) saved before a change, for a rollback), ``env_owner`` (uid of the .env read at the start),
    ``applied`` (what changed on the server, for failure messages) and ``results`` [(step, status, detail)]."""

    def __init__(self, ui, project_dir, env_path, dry_run, out=None):
        self.ui, self.project_dir, self.env_path, self.dry_run = ui, project_dir, env_path, dry_run
        self.out = out or sys.stdout
        self.values, self.results, self.applied = {}, [], []
        self.service_user = self.pg_os_user = self.user_psql = self.super_psql = None
        self.server_num = 0
        self.pgdata = self.bin_dir = self.archive_command = None
        self.auto_conf_copy = self.conf_copy = self.env_owner = None
        self.restart_needed = False
        self.stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        self._backup_dir = None

    def say(self, text=""):
        self.out.write(text + "\n")
        self.out.flush()

    def header(self, number, title):
        self.say("\n== %s. %s ==" % (number, title))

    def record(self, step, status, detail=""):
        self.results.append((step, status, detail))
        if detail and status in (UNCHANGED, SKIPPED, PENDING, FAILED):
            self.say("  %s: %s" % (status, detail))

    def decide(self, key, changes, diffs=()):
        """Show ``changes`` (lines) and ``diffs`` (unified diffs); return True when they are to be applied
        (never in a dry run; asked as ``key`` otherwise)."""
        self.say("  This step will:")
        for change in changes:
            self.say("    - " + change)
        for diff in diffs:
            if diff:
                self.say("".join("    " + line + "\n" for line in diff.rstrip("\n").split("\n")).rstrip("\n"))
        if self.dry_run:
            self.say("  (dry run: nothing changed)")
            return False
        return self.ui.confirm(key, "Apply?")

    @property
    def env_dir(self):
        return os.path.dirname(os.path.abspath(self.env_path))

    def save_copy(self, name, text):
        """Keep ``text`` (an original file) in setup-backups/<time>/ next to the .env, private to the
        service user, never inside the data directory. Returns the path."""
        if self._backup_dir is None:
            directory = os.path.join(self.env_dir, "setup-backups", self.stamp)
            setup_safefs.ensure_dir(directory, self.service_user)
            self._backup_dir = directory
        path = os.path.join(self._backup_dir, name)
        setup_safefs.write_private(path, text, self.service_user)
        return path

    def server_path(self, path):
        """True when this process may edit ``path`` (a PostgreSQL file): root, or its owner."""
        owner = setup_sys.owner_of(path)
        return owner is not None and setup_sys.can_act_as(owner)


# ---- 1. prerequisites -----------------------------------------------------------------------------------
def prerequisites(ctx):
    """Python venv support, rsync, crontab (and setpriv when root). Raises AnswerError with the install
    command for what is missing."""
    missing = []
    if not (_importable("venv") and _importable("ensurepip")):
        missing.append(("python3-venv", "python3", "the venv module (python3 -m venv)"))
    for program, deb, rpm in (("rsync", "rsync", "rsync"), ("crontab", "cron", "cronie")):
        if not setup_sys.find_program(program):
            missing.append((deb, rpm, program))
    if setup_sys.i_am_root():
        if not setup_sys.find_program("setpriv"):
            missing.append(("util-linux", "util-linux", "setpriv"))
        for program in ("setpriv", "crontab"):  # what this process runs as root: root's own binaries only
            if setup_sys.find_program(program):
                setup_sys.root_program(program)
    for _deb, _rpm, what in missing:
        ctx.say("  missing: %s" % what)
    if missing:
        raise AnswerError("missing prerequisites; install them with:\n  " + INSTALL_HINT % (
            " ".join(m[0] for m in missing), " ".join(m[1] for m in missing)))
    ctx.say("  python3 %s with venv, rsync and crontab are present" % sys.version.split()[0])
    ctx.record("prerequisites", PASSED, "")


def _importable(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---- 2. detect the install ------------------------------------------------------------------------------
def guess_base(existing):
    """A likely ALF_BASE_DIR: the existing .env's, else the first likely directory that exists."""
    if existing.get("ALF_BASE_DIR"):
        return existing["ALF_BASE_DIR"]
    for candidate in LIKELY_BASES + tuple(sorted(glob.glob("/opt/alfresco*"))):
        if os.path.isdir(candidate):
            return candidate
    return ""


def find_pgdata(base):
    """The data directory under ``base`` (alf_data/postgresql, else any dir holding PG_VERSION within two
    levels of alf_data/ or base/), or None."""
    first = os.path.join(base, "alf_data", "postgresql")
    if os.path.isfile(os.path.join(first, "PG_VERSION")) or os.path.isdir(first):
        return first
    for pattern in ("alf_data/*/PG_VERSION", "alf_data/*/*/PG_VERSION", "*/PG_VERSION", "*/*/PG_VERSION"):
        hits = sorted(glob.glob(os.path.join(base, pattern)))
        if hits:
            return os.path.dirname(hits[0])
    return None


def _read_quietly(path, owners, warnings):
    """The text of a file of the install (None when missing or refused: the reason goes to ``warnings``)."""
    try:
        return setup_safefs.read_checked(path, owners)
    except SetupError as exc:
        warnings.append("not read: %s" % exc)
        return None


def _owners(*paths):
    """The uids (never root's) owning ``paths``: who may own the install's files found there."""
    uids = {owner.uid for owner in (setup_sys.owner_of(p) for p in paths if p) if owner is not None}
    return uids - {0}


def _plain_name(value, what, warnings):
    """``value`` unless it looks like a connection string (psql would read 'host=... dbname=...' from it)."""
    if value and "=" in value:
        warnings.append("%s %r looks like a connection string, not a database name: not used (answer PGDATABASE)"
                        % (what, value))
        return None
    return value


def detect(ctx, base, pgdata=None):
    """Facts about the install under ``base`` (a dict; nothing is asked or changed): pgdata, pg_version,
    bin_dir, script (alfresco.sh or None), socket_dir, port, properties, db_* values, contentstore, warnings.
    Raises AnswerError when ``base`` is not a directory."""
    if not base or not os.path.isdir(base):
        raise AnswerError("ALF_BASE_DIR %r is not a directory: give the Alfresco install directory (the one "
                          "holding alf_data, tomcat and postgresql)" % base)
    facts = {"base": base, "warnings": []}
    warnings = facts["warnings"]
    facts["pgdata"] = pgdata or find_pgdata(base)
    pg_owners = _owners(facts["pgdata"])
    bundled = os.path.join(base, "postgresql", "bin")
    facts["bin_dir"] = bundled if os.access(os.path.join(bundled, "pg_basebackup"), os.X_OK) else None
    script = os.path.join(base, "alfresco.sh")
    facts["script"] = script if os.path.isfile(script) else None
    if facts["pgdata"]:
        version = _read_quietly(os.path.join(facts["pgdata"], "PG_VERSION"), pg_owners, warnings)
        facts["pg_version"] = version.strip() if version else None
        pid = _read_quietly(os.path.join(facts["pgdata"], "postmaster.pid"), pg_owners, warnings)
        lines = pid.splitlines() if pid else []
        if len(lines) >= 5:
            facts["port"], facts["socket_dir"] = lines[3].strip(), lines[4].strip() or None
        conf = _read_quietly(os.path.join(facts["pgdata"], "postgresql.conf"), pg_owners, warnings)
        if conf:
            parsed = setup_files.parse_conf(conf)
            facts.setdefault("port", parsed.get("port"))
            sockets = parsed.get("unix_socket_directories") or parsed.get("unix_socket_directory")
            if sockets and not facts.get("socket_dir"):
                facts["socket_dir"] = sockets.split(",")[0].strip()
    props_path = os.path.join(base, "tomcat", "shared", "classes", "alfresco-global.properties")
    props = setup_formats.parse_properties(_read_quietly(props_path, pg_owners | _owners(base), warnings) or "")
    facts["properties"] = props_path if props else None
    url = setup_formats.parse_jdbc_url(props.get("db.url"))
    facts["db_user"], facts["db_password"] = props.get("db.username"), props.get("db.password")
    facts["db_name"] = (_plain_name(props.get("db.name"), "db.name", warnings)
                        or _plain_name(url.get("database"), "the database of db.url", warnings))
    if not facts.get("port"):
        facts["port"] = url.get("port") or props.get("db.port")
    facts["db_host"] = url.get("host") or props.get("db.host")
    if props.get("dir.root"):
        facts["contentstore"] = os.path.join(props["dir.root"], "contentstore")
    if props.get("system.content.eagerOrphanCleanup", "").strip().lower() == "true":
        warnings.append(
            "system.content.eagerOrphanCleanup=true in %s: deleted content is removed at once, so a hot backup "
            "can miss files the database still pointed at; set it to false (the default) and let "
            "system.content.orphanProtectDays (14) protect orphans" % props_path)
    return facts


def show_detected(ctx, facts):
    for label, key in (("data directory", "pgdata"), ("PostgreSQL version (PG_VERSION)", "pg_version"),
                       ("client tools", "bin_dir"), ("control script", "script"), ("socket directory",
                       "socket_dir"), ("port", "port"), ("alfresco-global.properties", "properties"),
                       ("database role (db.username)", "db_user"), ("database (db.name)", "db_name")):
        ctx.say("  %-34s %s" % (label + ":", facts.get(key) or "not found"))
    for warning in facts["warnings"]:
        ctx.say("  WARNING: " + warning)


def detected_env(facts):
    """.env values suggested by the install (only keys something was found for)."""
    base = facts["base"]
    values = {"ALF_BASE_DIR": base}
    host = facts.get("socket_dir") or facts.get("db_host")
    for key, value in (("PGHOST", host), ("PGPORT", facts.get("port")), ("PGUSER", facts.get("db_user")),
                       ("PGPASSWORD", facts.get("db_password")), ("PGDATABASE", facts.get("db_name"))):
        if value:
            values[key] = value
    if facts.get("pgdata") and facts["pgdata"] != os.path.join(base, "alf_data", "postgresql"):
        values["PGDATA"] = facts["pgdata"]
    if facts.get("contentstore") and os.path.normpath(facts["contentstore"]) != os.path.join(
            base, "alf_data", "contentstore"):
        values["CONTENTSTORE_DIR"] = os.path.normpath(facts["contentstore"])
    return values


# ---- 3. .env --------------------------------------------------------------------------------------------
def write_env(ctx, existing_text):
    """Write ctx.values to ctx.env_path (0600, owned by the service user) unless it already says the same;
    an earlier file is kept beside it as .env.<time>.bak."""
    new_text = setup_files.format_env(ctx.values, config.OPTIONS)
    if existing_text is not None:
        old = setup_files.effective_env(setup_files.parse_env(existing_text), config.OPTIONS)
        if old == setup_files.effective_env(ctx.values, config.OPTIONS):
            _fix_env_mode(ctx)
            return
    old_values = setup_files.parse_env(existing_text) if existing_text is not None else {}
    masked = _mask_secrets(new_text, {
        k: "'********'" if existing_text is None or old_values.get(k) == ctx.values.get(k) else
        "'******** (new value)'" for k in config.SECRET_NAMES if ctx.values.get(k)})
    old_masked = None if existing_text is None else _mask_secrets(
        existing_text, {k: "'********'" for k in config.SECRET_NAMES if old_values.get(k)})
    changes = ["write %s (mode 0600, owner %s)" % (ctx.env_path, ctx.service_user.name)]
    if existing_text is not None:
        changes.append("keep the current one as %s.%s.bak" % (ctx.env_path, ctx.stamp))
    if not ctx.decide("APPLY_ENV", changes, [setup_files.unified_diff(old_masked, masked, ".env")]):
        ctx.record(".env", WOULD if ctx.dry_run else SKIPPED, ctx.env_path)
        return
    if existing_text is not None:
        setup_safefs.write_private("%s.%s.bak" % (ctx.env_path, ctx.stamp), existing_text, ctx.service_user)
    setup_safefs.write_private(ctx.env_path, new_text, ctx.service_user)
    ctx.record(".env", CHANGED, "wrote %s" % ctx.env_path)


def _fix_env_mode(ctx):
    info = os.lstat(ctx.env_path)
    wrong = info.st_mode & 0o077 or (setup_sys.i_am_root() and info.st_uid != ctx.service_user.uid)
    if not wrong:
        ctx.record(".env", UNCHANGED, "%s already holds these values" % ctx.env_path)
        return
    if ctx.decide("APPLY_ENV", ["make %s mode 0600, owner %s" % (ctx.env_path, ctx.service_user.name)]):
        setup_safefs.fix_file(ctx.env_path, ctx.service_user, 0o600)
        ctx.record(".env", CHANGED, "made %s private" % ctx.env_path)
    else:
        ctx.record(".env", WOULD if ctx.dry_run else SKIPPED, "mode of %s" % ctx.env_path)


def _mask_secrets(text, shown):
    """``text`` with the value of each secret key in ``shown`` replaced by what ``shown`` says for it."""
    for key, label in shown.items():
        text = re.sub(r"(?m)^([ \t]*(?:export[ \t]+)?%s[ \t]*=).*$" % re.escape(key),
                      lambda m, label=label: m.group(1) + label, text)
    return text


# ---- 4. directories -------------------------------------------------------------------------------------
def directories(ctx, log_dir):
    """BACKUP_DIR, its postgres/ contentstore/ config/, the WAL archive and the cron log directory: 0700 and
    the service user's; when PostgreSQL runs as another OS user the WAL directory is group-writable by that
    user's group (setgid) and BACKUP_DIR traversable by it."""
    backup = ctx.values["BACKUP_DIR"]
    wal_dir = ctx.values.get("WAL_ARCHIVE_DIR") or os.path.join(backup, "pg_wal")
    pg_gid = None
    if ctx.pg_os_user and ctx.pg_os_user != ctx.service_user:
        pg_gid = ctx.pg_os_user.gid
    plan = [(backup, 0o710 if pg_gid is not None else 0o700, pg_gid)]
    plan += [(os.path.join(backup, sub), 0o700, None) for sub in ("postgres", "contentstore", "config")]
    plan += [(wal_dir, 0o2770 if pg_gid is not None else 0o700, pg_gid), (log_dir, 0o700, None)]
    todo = []
    for path, mode, gid in plan:
        state = setup_sys.dir_state(path)
        want_gid = gid if gid is not None else (ctx.service_user.gid if state is None else state[1])
        if state is not None and state[3] and state[:3] != (ctx.service_user.uid, want_gid, mode):
            raise SetupError("%s is a symbolic link to a directory that needs another owner or mode: setup.py "
                             "changes only real directories (a link could point anywhere); give the real path "
                             "(%s) or remove the link" % (path, os.path.realpath(path)))
        if state is None:
            todo.append((path, mode, gid, "create %s (mode %04o, owner %s%s)" % (
                path, mode, ctx.service_user.name, ", group %s" % setup_sys.group_name(gid) if gid else "")))
        elif state[0] != ctx.service_user.uid or state[2] != mode or state[1] != want_gid:
            todo.append((path, mode, gid, "set %s to mode %04o, owner %s%s (now %04o, uid %d)" % (
                path, mode, ctx.service_user.name, ", group %s" % setup_sys.group_name(gid) if gid else "",
                state[2], state[0])))
    if not todo:
        ctx.record("directories", UNCHANGED, "%s and its subdirectories are in place" % backup)
        return
    if pg_gid is not None and not setup_sys.i_am_root():
        raise SetupError("PostgreSQL runs as %s, the backups as %s: the WAL directory must be writable by both; "
                         "run setup.py with sudo" % (ctx.pg_os_user.name, ctx.service_user.name))
    if not ctx.decide("APPLY_DIRS", [t[3] for t in todo]):
        ctx.record("directories", WOULD if ctx.dry_run else SKIPPED, backup)
        return
    for path, mode, gid, _text in todo:
        setup_safefs.ensure_dir(path, ctx.service_user, mode, gid, adopt_root=path == backup)
    ctx.record("directories", CHANGED, "; ".join(t[3] for t in todo))
