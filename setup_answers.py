"""The wizard's questions: the answers file, the prompts (:class:`Ui`), the .env values (step 3) and the
checks of every answer before anything changes (:func:`preflight`, which also opens the psql connections).
Standard library only.
"""

import getpass
import os
import socket
import stat
import sys

import config
import setup_db
import setup_files
import setup_finish
import setup_safefs
import setup_steps
import setup_sys
from setup_sys import AnswerError, SetupError

# Answers only the wizard uses (never written to .env): key -> (default, description).
WIZARD_KEYS = {
    "SERVICE_USER": ("", "OS user that runs the backups and owns their files (default: SUDO_USER, else the "
                         "data directory's owner, else you)"),
    "PGSUPERUSER": ("postgres", "PostgreSQL superuser for ALTER SYSTEM/ALTER ROLE ('-': none; then "
                                "postgresql.conf is edited and the role must already replicate)"),
    "PGSUPERPASSWORD": ("", "its password (empty: ~/.pgpass or peer authentication, under sudo as the OS "
                            "user of that name when it exists); never passed to any program"),
    "RESTART_POSTGRES": ("no", "yes: restart PostgreSQL (and Alfresco around it) now when needed; no: print "
                               "the commands for a maintenance window"),
    "CRON_SCHEDULE": ("0 2 * * *", "when the nightly backup runs (cron syntax; '-': no cron entry)"),
    "CRON_LOG_DIR": ("", "directory for the cron job's dated logs (default: BACKUP_DIR/logs)"),
    "VENV_DIR": ("", "virtual environment to create or reuse (default: .venv in the project); an existing "
                     "one that imports dotenv and psycopg2 is used as it is"),
    "ALFRESCO_STOP_TIMEOUT": ("300", "seconds to wait for alfresco.sh stop tomcat before signalling its PID"),
    "ALFRESCO_START_TIMEOUT": ("900", "seconds to wait for 'Server startup in' in catalina.out"),
}
CONFIRM_KEYS = ("KEEP_ENV", "CHANGE_OTHER_SETTINGS", "APPLY_ENV", "APPLY_DIRS", "APPLY_PG_SETTINGS", "APPLY_HBA",
                "APPLY_ROLE", "APPLY_VENV", "APPLY_CRON")
BASIC_KEYS = ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "BACKUP_DIR", "PG_BIN_DIR", "PGDATA",
              "CONTENTSTORE_DIR", "WAL_ARCHIVE_DIR", "INSTALLATION_NAME")
YES, NO = ("y", "yes", "true", "on", "1"), ("n", "no", "false", "off", "0")


class Ui:
    """Prompts (interactive) or answers from the answers file (non-interactive). Interactive prompts all
    look like ``? KEY text [default]: ``; Enter keeps the default, ``-`` clears it; secrets use getpass."""

    def __init__(self, interactive, answers, out=None):
        self.interactive, self.answers, self.out = interactive, answers, out or sys.stdout

    def ask(self, key, text, default="", secret=False, check=None):
        default = self.answers.get(key, default)
        if not self.interactive:
            problem = check(default) if check else None
            if problem:
                raise AnswerError("%s: %s" % (key, problem))
            return default
        while True:
            if secret:
                shown = "Enter keeps the current one" if default else "empty: none"
                raw = self._read("? %s %s (hidden) [%s]: " % (key, text, shown), secret=True)
            else:
                raw = self._read("? %s %s [%s]: " % (key, text, default))
            value = "" if raw.strip() == "-" else (raw.strip() or default)
            problem = check(value) if check else None
            if not problem:
                return value
            self.out.write("  %s\n" % problem)

    def confirm(self, key, question, default=True):
        if key in self.answers and not self.interactive:
            return self.answers[key].strip().lower() in YES
        if not self.interactive:
            return default
        default_word = "yes" if (self.answers.get(key, "yes" if default else "no").lower() in YES) else "no"
        while True:
            raw = self._read("? %s %s [%s]: " % (key, question, default_word)).strip().lower() or default_word
            if raw in YES or raw in NO:
                return raw in YES
            self.out.write("  please answer yes or no\n")

    def _read(self, prompt, secret=False):
        try:
            if secret:
                return getpass.getpass(prompt)
            self.out.write(prompt)
            self.out.flush()
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line.rstrip("\n")
        except EOFError:
            raise AnswerError("input ended before the wizard finished (use --non-interactive --answers FILE "
                              "to script it)")


def load_answers(path):
    """{key: value} from an answers file (.env format: .env keys plus WIZARD_KEYS and CONFIRM_KEYS).
    Raises AnswerError for an unreadable file or an unknown key."""
    try:
        text = setup_safefs.read_text(path)  # never through a link, never a FIFO
        mode = os.stat(path).st_mode
    except (OSError, SetupError) as exc:
        raise AnswerError("cannot read the answers file %s: %s" % (path, getattr(exc, "strerror", None) or exc))
    if text is None:
        raise AnswerError("cannot read the answers file %s: No such file or directory" % path)
    try:
        answers = setup_files.parse_env(text, os.environ)
    except setup_files.TextError as exc:
        raise AnswerError("answers file %s: %s" % (path, exc))
    known = set(config.OPTION_NAMES) | set(WIZARD_KEYS) | set(CONFIRM_KEYS) | {"RESTART_POSTGRES"}
    unknown = sorted(set(answers) - known)
    if unknown:
        raise AnswerError("answers file %s: unknown key(s) %s (known: .env keys, %s)" % (
            path, ", ".join(unknown), ", ".join(list(WIZARD_KEYS) + list(CONFIRM_KEYS))))
    secret = [k for k in ["PGSUPERPASSWORD"] + config.SECRET_NAMES if answers.get(k)]
    if secret and mode & (stat.S_IRWXG | stat.S_IRWXO):
        sys.stderr.write("warning: %s holds %s and is readable by other users: chmod 600 %s\n"
                         % (path, ", ".join(secret), path))
    return answers


def default_service_user(pgdata):
    if not setup_sys.i_am_root():
        return setup_sys.me().name
    sudo_user = os.environ.get("SUDO_USER", "")
    if sudo_user and sudo_user != "root":
        return sudo_user
    owner = setup_sys.owner_of(pgdata) if pgdata else None
    return owner.name if owner and owner.uid != 0 else ""


def _check_user(name):
    if not name:
        return "give the OS user that runs the backups"
    try:
        user = setup_sys.User.named(name)
    except AnswerError as exc:
        return str(exc)
    if user.uid == 0:
        return "the backups must not run as root: give the Alfresco service user"
    if not setup_sys.can_act_as(user):
        return "cannot act as %s while running as %s: run setup.py with sudo" % (name, setup_sys.me().name)
    return None


def collect_env(ctx, ui, facts, existing, existing_text):
    """Step 3's questions: ctx.values for the .env (asked, or from answers, detection and the old file)."""
    defaults = {name: default or "" for name, _k, default, _r, _d, _s in config.OPTIONS}
    defaults.update(setup_steps.detected_env(facts))
    defaults["INSTALLATION_NAME"] = socket.gethostname()  # written out, so a later host rename keeps the name
    defaults.update({k: v for k, v in existing.items() if v})
    if not ui.interactive:
        values = dict(defaults)
        values.update({k: v for k, v in ui.answers.items() if k in config.OPTION_NAMES})
        ctx.values = values
        return
    if existing_text is not None:
        ctx.say("  %s exists:" % ctx.env_path)
        for key in config.OPTION_NAMES:
            shown = "********" if key in config.SECRET_NAMES and existing.get(key) else existing.get(key, "")
            ctx.say("    %s=%s" % (key, shown))
        if ui.confirm("KEEP_ENV", "Keep it as it is?"):
            ctx.values = dict(existing)
            return
    ctx.say("  Enter keeps the value in brackets, '-' clears it.")
    values = dict(defaults)
    descriptions = {row[0]: row[4] for row in config.OPTIONS}
    if not values.get("BACKUP_DIR"):
        values["BACKUP_DIR"] = "/var/backups/alfresco"
    for key in BASIC_KEYS:
        values[key] = ui.ask(key, descriptions[key], values.get(key, ""), secret=key in config.SECRET_NAMES)
    others = [k for k in config.OPTION_NAMES if k not in BASIC_KEYS and k != "ALF_BASE_DIR"]
    ctx.say("  Other settings:\n" + "\n".join("    %s=%s" % (k, "********" if k in config.SECRET_NAMES and
                                                         values.get(k) else values.get(k, "")) for k in others))
    if ui.confirm("CHANGE_OTHER_SETTINGS", "Change any of these (retention, timeouts, e-mail)?", default=False):
        for key in others:
            values[key] = ui.ask(key, descriptions[key], values.get(key, ""), secret=key in config.SECRET_NAMES)
    ctx.values = values


def preflight(ctx, ui, facts):
    """Check every answer before anything is changed; open the psql connections. Raises AnswerError."""
    while True:
        try:
            cfg = config.validate(ctx.values, ctx.env_path, check_paths=True)
            break
        except config.ConfigError as exc:
            if not ui.interactive:
                raise AnswerError(str(exc))
            ctx.say("  " + str(exc).replace("\n", "\n  "))
            descriptions = {row[0]: row[4] for row in config.OPTIONS}
            for key, _message in exc.problems:
                if key in descriptions:
                    ctx.values[key] = ui.ask(key, descriptions[key], ctx.values.get(key, ""),
                                             secret=key in config.SECRET_NAMES)
    try:
        setup_files.format_env(ctx.values, config.OPTIONS)
    except ValueError as exc:
        raise AnswerError("a .env value cannot be written: %s" % exc)
    ctx.pgdata = cfg.pgdata
    if not os.path.isdir(ctx.pgdata):
        raise AnswerError("PGDATA: the data directory %s does not exist" % ctx.pgdata)
    ctx.pg_os_user = setup_sys.owner_of(ctx.pgdata)
    if ctx.pg_os_user is None or ctx.pg_os_user.uid == 0:
        raise AnswerError("PGDATA: the data directory %s belongs to %s, but PostgreSQL never runs as root: it "
                          "belongs to the user PostgreSQL runs as" % (ctx.pgdata, ctx.pg_os_user or "an unknown uid"))
    bundled = facts.get("bin_dir")
    ctx.bin_dir = cfg.PG_BIN_DIR or bundled or os.path.dirname(setup_sys.find_program("pg_basebackup") or "/")
    for program in ("pg_basebackup",):  # setup.py itself speaks to the server directly (setup_db.py)
        if not os.access(os.path.join(ctx.bin_dir, program), os.X_OK):
            raise AnswerError("%s not found in %s: set PG_BIN_DIR, or install the client tools of the server's "
                              "version (e.g. sudo apt-get install -y postgresql-client)" % (program, ctx.bin_dir))
    name = ui.ask("SERVICE_USER", WIZARD_KEYS["SERVICE_USER"][1], default_service_user(ctx.pgdata),
                  check=_check_user)
    ctx.service_user = setup_sys.User.named(name)
    _check_places(ctx, cfg)
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else setup_finish.base_python()
    try:
        ctx.archive_command = setup_files.archive_command(python, os.path.join(ctx.project_dir, "wal.py"),
                                                          cfg.wal_archive_dir)
    except setup_files.TextError as exc:
        raise AnswerError(str(exc))
    _connect(ctx, ui)


def _check_places(ctx, cfg):
    user = ctx.service_user
    if setup_sys.i_am_root() and ctx.env_owner not in (None, 0, user.uid):
        # Read before the service user was known: its text must not reach that user's new .env or .bak.
        raise AnswerError("--env: %s belongs to uid %d, not to the service user %s: setup.py does not copy it "
                          "(chown %s %s, or give another --env)" % (ctx.env_path, ctx.env_owner, user.name,
                                                                     user.name, ctx.env_path))
    backup = cfg.BACKUP_DIR
    probe = backup
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe == backup:
        owner = setup_sys.owner_of(backup)
        if owner != user and not (setup_sys.i_am_root() and owner is not None and owner.uid == 0
                                  and not os.listdir(backup)):
            raise AnswerError("BACKUP_DIR %s belongs to %s, not %s: choose another directory or chown it"
                              % (backup, owner.name if owner else "?", user.name))
    elif not setup_sys.i_am_root() and not setup_sys.user_can(user, "w", probe):
        raise AnswerError("BACKUP_DIR %s cannot be created: %s is not writable by %s" % (backup, probe, user.name))
    if setup_sys.i_am_root() and not os.path.isdir(probe):
        raise AnswerError("BACKUP_DIR %s cannot be created: %s is not a directory" % (backup, probe))
    if not setup_sys.user_can(user, "r", os.path.join(ctx.project_dir, "backup.py")):
        raise AnswerError("%s cannot read %s: put the project where the service user can read it"
                          % (user.name, ctx.project_dir))
    if not os.path.isdir(ctx.env_dir) or not (setup_sys.i_am_root() or os.access(ctx.env_dir, os.W_OK)):
        raise AnswerError("--env: cannot write in %s" % ctx.env_dir)
    pg_user = ctx.pg_os_user
    if pg_user is not None and setup_sys.can_act_as(pg_user) and not setup_sys.user_can(
            pg_user, "r", os.path.join(ctx.project_dir, "wal.py")):
        raise AnswerError("PostgreSQL's OS user %s cannot read %s/wal.py (its archive_command)"
                          % (pg_user.name, ctx.project_dir))


def _connect(ctx, ui):
    values = ctx.values
    server_uid = ctx.pg_os_user.uid if ctx.pg_os_user else None
    for attempt in range(3):
        ctx.user_psql = setup_db.Psql(ctx.bin_dir, values["PGHOST"], values["PGPORT"], values["PGDATABASE"],
                                      values["PGUSER"], values.get("PGPASSWORD"), ctx.service_user, server_uid)
        try:
            ctx.server_num = int(ctx.user_psql.run("SHOW server_version_num").strip())
            break
        except SetupError as exc:
            if not ui.interactive or attempt == 2 or "password" not in str(exc):
                raise AnswerError("cannot connect as PGUSER: %s" % exc)
            ctx.say("  %s" % exc)
            values["PGPASSWORD"] = ui.ask("PGPASSWORD", "password of %s" % values["PGUSER"], "", secret=True)
    ctx.say("  connected as %s: PostgreSQL %s" % (values["PGUSER"], ctx.server_num))
    superuser = ui.ask("PGSUPERUSER", WIZARD_KEYS["PGSUPERUSER"][1], "postgres")
    if not superuser:
        return
    for attempt in range(3):
        password = ui.ask("PGSUPERPASSWORD", "password of the superuser %s" % superuser, "", secret=True)
        os_user = ctx.service_user
        if not password and setup_sys.i_am_root():
            try:
                os_user = setup_sys.User.named(superuser)
            except AnswerError:
                pass
        psql = setup_db.Psql(ctx.bin_dir, values["PGHOST"], values["PGPORT"], values["PGDATABASE"], superuser,
                             password, os_user, server_uid)
        try:
            (is_super,) = psql.bool_row("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        except SetupError as exc:
            if not ui.interactive or attempt == 2:
                raise AnswerError("cannot connect as PGSUPERUSER: %s" % exc)
            ctx.say("  %s" % exc)
            ui.answers.pop("PGSUPERPASSWORD", None)
            continue
        if not is_super:
            raise AnswerError("PGSUPERUSER %s is not a superuser" % superuser)
        ctx.super_psql = psql
        return
