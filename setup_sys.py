"""System helpers for the set-up wizard: users, commands run as another user, psql, private files.

When the wizard runs as root (under sudo) every program that acts for the service user or for the
PostgreSQL OS user runs as that user through ``setpriv`` (util-linux), and every file it creates is given
to the service user; as an ordinary user it may only act for itself. Standard library only.
"""

import grp
import json
import os
import pwd
import shutil
import stat
import tempfile

import subprocess_utils

SETPRIV = "setpriv"


class SetupError(Exception):
    """A step could not be done. The message says what failed, what was already applied and how to fix."""


class AnswerError(SetupError):
    """An answer is wrong (missing directory, wrong password, ...); nothing has been changed yet."""


class User:
    """An OS user: ``name``, ``uid``, ``gid``, ``home``."""

    def __init__(self, entry):
        self.name, self.uid, self.gid, self.home = entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir

    def __eq__(self, other):
        return isinstance(other, User) and other.uid == self.uid

    def __hash__(self):
        return self.uid

    def __repr__(self):
        return "User(%s)" % self.name

    @classmethod
    def named(cls, name):
        """The user called ``name`` (or with that numeric uid). Raises AnswerError when there is none."""
        try:
            return cls(pwd.getpwnam(name))
        except KeyError:
            if name.isdigit():
                try:
                    return cls(pwd.getpwuid(int(name)))
                except KeyError:
                    pass
        raise AnswerError("there is no OS user %r" % name)

    @classmethod
    def by_uid(cls, uid):
        return cls(pwd.getpwuid(uid))


def i_am_root():
    return os.geteuid() == 0


def me():
    return User.by_uid(os.geteuid())


def owner_of(path):
    """The User owning ``path`` (None when it cannot be stat'ed or the uid has no name)."""
    try:
        return User.by_uid(os.stat(path).st_uid)
    except (OSError, KeyError):
        return None


def can_act_as(user):
    """True when this process may run programs and own files as ``user`` (root, or that user itself)."""
    return i_am_root() or user.uid == os.geteuid()


def user_env(user, extra=None):
    """A minimal environment for ``user`` (see subprocess_utils.base_env) with its HOME/USER/LOGNAME."""
    env = subprocess_utils.base_env(extra)
    env.update({"HOME": user.home or "/", "USER": user.name, "LOGNAME": user.name})
    if not env.get("PATH") or "/usr/bin" not in env["PATH"].split(":"):
        env["PATH"] = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    return env


def as_user(user, argv):
    """``argv`` prefixed so that it runs as ``user`` (setpriv when root and another user; unchanged when it
    already is that user). Raises SetupError when this process cannot act for ``user``."""
    if user.uid == os.geteuid():
        return list(argv)
    if not i_am_root():
        raise SetupError("cannot run %s as %s while running as %s: run setup.py with sudo, or as %s"
                         % (os.path.basename(argv[0]), user.name, me().name, user.name))
    return [SETPRIV, "--reuid=%d" % user.uid, "--regid=%d" % user.gid, "--init-groups", "--"] + list(argv)


def run_as(user, argv, timeout=120, extra_env=None, secrets=(), ok_codes=(0,), stdin=None, what=None, cwd="/",
           daemon=False):
    """subprocess_utils.run of ``argv`` as ``user`` (``daemon``: it leaves a server running, see
    subprocess_utils.run). Returns the CommandResult; raises CommandError."""
    return subprocess_utils.run(as_user(user, argv), user_env(user, extra_env), timeout=timeout, secrets=secrets,
                                ok_codes=ok_codes, cwd=cwd, what=what, daemon=daemon,
                                stdin_data=stdin.encode("utf-8") if isinstance(stdin, str) else stdin)


def user_can(user, test, path):
    """True when ``user`` passes ``test -<test> path`` (e.g. 'w', 'r', 'x')."""
    try:
        run_as(user, ["test", "-" + test, path], timeout=30, what="test -%s" % test)
        return True
    except subprocess_utils.CommandError:
        return False


# ---- files -----------------------------------------------------------------------------------------------
def read_text(path):
    """The text of ``path``, or None when it does not exist. Raises SetupError when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SetupError("cannot read %s: %s" % (path, exc.strerror))


def give_to(path, user, group_gid=None):
    """chown ``path`` (not following symlinks) to ``user`` when running as root; no-op otherwise."""
    if i_am_root() and user is not None:
        os.lchown(path, user.uid, user.gid if group_gid is None else group_gid)


def write_private(path, text, owner, mode=0o600):
    """Write ``text`` to ``path`` atomically (temporary file beside it, fsync, rename), mode ``mode``, owned
    by ``owner`` (when root). Raises SetupError."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    except OSError as exc:
        raise SetupError("cannot write in %s: %s" % (directory, exc.strerror))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        give_to(tmp, owner)
        os.rename(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise SetupError("cannot write %s: %s" % (path, exc.strerror))


def rewrite_in_place(path, text):
    """Replace the content of an existing file keeping its inode, owner and mode (PostgreSQL's own files:
    no temporary file ever appears in the data directory). Raises SetupError."""
    try:
        with open(path, "r+", encoding="utf-8") as handle:
            handle.write(text)
            handle.truncate()
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise SetupError("cannot write %s: %s" % (path, exc.strerror))


def make_private_dir(path, owner, mode=0o700, group_gid=None):
    """Create ``path`` (and missing parents, which get ``owner`` too) with ``mode``. Returns True when it was
    created. Raises SetupError."""
    missing = []
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
            give_to(directory, owner, group_gid if directory == os.path.abspath(path) else None)
            os.chmod(directory, mode if directory == os.path.abspath(path) else 0o700)
        except OSError as exc:
            raise SetupError("cannot create %s: %s" % (directory, exc.strerror))
    return bool(missing)


def dir_state(path):
    """(owner uid, group gid, mode bits) of ``path`` or None when missing."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


def group_name(gid):
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# ---- psql -------------------------------------------------------------------------------------------------
def conninfo_quote(value):
    """A libpq conninfo value, single-quoted with backslash escapes."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


class Psql:
    """Runs SQL through the server's own ``psql`` (no psycopg2 here: the venv may not exist yet).

    The password travels only in PGPASSWORD; SQL goes on stdin; values go as psql variables (``-v``, on the
    command line, so never a secret) used as :'name' (literal) or :"name" (identifier).
    """

    def __init__(self, bin_dir, host, port, database, user, password, os_user):
        self.psql = os.path.join(bin_dir, "psql")
        self.host, self.port, self.database = host, str(port), database
        self.user, self.password, self.os_user = user, password or "", os_user

    def _env(self):
        extra = {"PGCONNECT_TIMEOUT": "10", "PGAPPNAME": "alfresco-backup-setup"}
        if self.password:
            extra["PGPASSWORD"] = self.password
        return extra

    def run(self, sql, variables=None, timeout=60, replication=False):
        """stdout of ``sql`` (trailing newline removed). Raises SetupError naming the role and server."""
        conn = ["-h", self.host, "-p", self.port, "-U", self.user, "-d", self.database]
        if replication:
            conn = ["-d", "host=%s port=%s user=%s dbname=%s replication=true" % tuple(
                conninfo_quote(v) for v in (self.host, self.port, self.user, self.database))]
        argv = [self.psql, "-X", "-A", "-t", "-q", "--no-password", "-v", "ON_ERROR_STOP=1"] + conn
        for name, value in sorted((variables or {}).items()):
            argv += ["-v", "%s=%s" % (name, value)]
        try:
            result = run_as(self.os_user, argv, timeout=timeout, extra_env=self._env(), secrets=[self.password],
                            stdin=sql, what="psql as %s" % self.user)
        except subprocess_utils.CommandError as exc:
            detail = (exc.stderr_tail or str(exc)).strip().replace("psql: ", "")
            raise SetupError("psql as role %s on %s:%s failed: %s" % (self.user, self.host, self.port, detail))
        return result.stdout.rstrip("\n")

    def json(self, sql, variables=None):
        """The single JSON value ``sql`` returns, decoded."""
        out = self.run(sql, variables).strip()
        try:
            return json.loads(out) if out else None
        except ValueError:
            raise SetupError("unexpected psql output: %r" % out[:200])

    def bool_row(self, sql, variables=None):
        """The single row of booleans ``sql`` returns, as a tuple (raises SetupError unless exactly one row of
        't'/'f' fields: never guessed from a header or a substring)."""
        return parse_bool_row(self.run(sql, variables))


def parse_bool_row(text):
    """(bool, ...) from psql -A -t output that must be exactly one row of 't'/'f' fields separated by '|'.
    Raises SetupError for anything else (no row, several rows, a header, other values)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise SetupError("expected one row, psql returned %d: %r" % (len(lines), lines[:3]))
    fields = lines[0].split("|")
    if any(f not in ("t", "f") for f in fields):
        raise SetupError("expected t/f values, psql returned %r" % lines[0])
    return tuple(f == "t" for f in fields)


def find_program(name, extra_dirs=()):
    """Absolute path of ``name`` in ``extra_dirs`` or on PATH (plus the sbin dirs), or None."""
    for directory in extra_dirs:
        if directory and os.access(os.path.join(directory, name), os.X_OK):
            return os.path.join(directory, name)
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(name, path=path)
