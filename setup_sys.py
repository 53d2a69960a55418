"""System helpers for the set-up wizard: users, what runs as whom, and which paths only root can change.

When the wizard runs as root (under sudo) every program that acts for the service user or for the
PostgreSQL OS user runs as that user through ``setpriv`` (util-linux), in a new session without a terminal;
a program runs as root only when it and every directory above it are root's and writable by nobody else
(:func:`root_safe_path`). What must happen as another user inside this program (connecting a socket for
peer authentication) happens in a forked child with that user's identity (:func:`in_child_as`). As an
ordinary user the wizard may only act for itself. Files: setup_safefs.py; SQL: setup_db.py. Standard library
only.
"""

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import struct

import subprocess_utils

ROOT_PROGRAM_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


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
    already is that user). As root for root, ``argv[0]`` must be an absolute root_safe_path. Raises
    SetupError when this process cannot act for ``user`` or must not run the program."""
    if user.uid == os.geteuid():
        if i_am_root() and not (os.path.isabs(argv[0]) and root_safe_path(argv[0])):
            raise SetupError("refusing to run %s as root: it, or a directory above it, can be changed by a user "
                             "other than root" % argv[0])
        return list(argv)
    if not i_am_root():
        raise SetupError("cannot run %s as %s while running as %s: run setup.py with sudo, or as %s"
                         % (os.path.basename(argv[0]), user.name, me().name, user.name))
    return [root_program("setpriv"), "--reuid=%d" % user.uid, "--regid=%d" % user.gid, "--init-groups",
            "--"] + list(argv)


def run_as(user, argv, timeout=120, extra_env=None, secrets=(), ok_codes=(0,), stdin=None, what=None, cwd="/",
           daemon=False):
    """subprocess_utils.run of ``argv`` as ``user`` (``daemon``: it leaves a server running, see
    subprocess_utils.run). Run by root as another user, it starts in a new session without a terminal (stdin
    is /dev/null or a pipe): it can neither type into the admin's root shell (TIOCSTI) nor read from it.
    Returns the CommandResult; raises CommandError (SetupError when it may not run, see as_user)."""
    return subprocess_utils.run(as_user(user, argv), user_env(user, extra_env), timeout=timeout, secrets=secrets,
                                ok_codes=ok_codes, cwd=cwd, what=what, daemon=daemon,
                                new_session=user.uid != os.geteuid(),
                                stdin_data=stdin.encode("utf-8") if isinstance(stdin, str) else stdin)


def user_can(user, test, path):
    """True when ``user`` passes ``test -<test> path`` (e.g. 'w', 'r', 'x')."""
    try:
        run_as(user, ["test", "-" + test, path], timeout=30, what="test -%s" % test)
        return True
    except subprocess_utils.CommandError:
        return False


# ---- what only root can change --------------------------------------------------------------------------
def _root_only(info):
    writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    return info.st_uid == 0 and (not writable or (stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX))


def root_safe_path(path, _depth=0):
    """True when nobody but root can change what ``path`` names: it and every directory above it belong to
    root and are writable by nobody else (a sticky directory such as /tmp counts: others cannot rename what
    root put there); a symbolic link on the way must be root's, and its target is checked the same way.
    The path is walked as written, so a directory another user owns anywhere on it makes it unsafe."""
    if _depth > 16:
        return False
    current = "/"
    try:
        if not _root_only(os.lstat(current)):
            return False
        for part in [p for p in os.path.abspath(path).split("/") if p]:
            candidate = os.path.join(current, part)
            info = os.lstat(candidate)
            if stat.S_ISLNK(info.st_mode):
                if info.st_uid != 0 or not root_safe_path(os.path.join(current, os.readlink(candidate)),
                                                          _depth + 1):
                    return False
                current = os.path.realpath(candidate)
                continue
            if not _root_only(info):
                return False
            current = candidate
    except OSError:
        return False
    return True


def root_program(name):
    """Absolute path of the system program ``name`` (in ROOT_PROGRAM_DIRS, never from PATH: a PATH entry the
    service user can write would hand it root), checked root_safe_path. Raises SetupError."""
    for directory in ROOT_PROGRAM_DIRS:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            if not root_safe_path(candidate):
                raise SetupError("refusing to run %s as root: it, or a directory above it, can be changed by a "
                                 "user other than root (fix its owner and mode)" % candidate)
            return candidate
    raise SetupError("%s not found in %s" % (name, ", ".join(ROOT_PROGRAM_DIRS)))


# ---- acting as another user inside this program --------------------------------------------------------------
def in_child_as(user, work, timeout=60):
    """``work()`` run with the identity of ``user`` (uid, gid, supplementary groups); returns what it
    returns: None or an open file descriptor (which comes back over a Unix socket, SCM_RIGHTS). When this
    process is ``user`` already, ``work()`` simply runs here; otherwise (root only) in a forked child: no
    program is executed, and the child, whose credentials changed, is not dumpable (``user`` cannot read its
    memory, which holds what this process holds). ``work`` raises OSError or SetupError for a failure; the
    message is raised here as SetupError."""
    if user.uid == os.geteuid():
        return work()
    if not i_am_root():
        raise SetupError("cannot act as %s while running as %s: run setup.py with sudo" % (user.name, me().name))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the child: it must never return into the caller's code
        status = 1
        try:
            ours.close()
            os.setgroups(os.getgrouplist(user.name, user.gid))
            os.setgid(user.gid)
            os.setuid(user.uid)
            try:
                fd = work()
            except (OSError, SetupError) as exc:
                theirs.sendall(b"E" + str(exc).encode("utf-8", "replace")[:4000])
            else:
                if fd is None:
                    theirs.sendall(b"K")
                else:
                    theirs.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
            status = 0
        finally:
            os._exit(status)
    theirs.close()
    try:
        ours.settimeout(timeout)
        data, ancillary, _flags, _address = ours.recvmsg(8192, socket.CMSG_SPACE(struct.calcsize("i")))
    except OSError as exc:
        data, ancillary = ("Eno answer within %s s (%s)" % (timeout, exc)).encode(), []
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    finally:
        ours.close()
        os.waitpid(pid, 0)
    fds = [struct.unpack("i", payload[:4])[0] for level, kind, payload in ancillary
           if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS]
    if data[:1] == b"F" and fds:
        return fds[0]
    for fd in fds:
        os.close(fd)
    if data[:1] == b"K":
        return None
    raise SetupError("as %s: %s" % (user.name, data[1:].decode("utf-8", "replace") or "the child process failed"))


def connect_unix_as(user, path, timeout=30):
    """A socket connected to the Unix socket ``path`` by ``user`` (so that PostgreSQL's peer authentication
    sees that user), for use in this process. Raises SetupError."""
    def work():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, "cannot connect to %s: %s" % (path, exc.strerror or exc))
        return sock.detach()
    return socket.socket(fileno=in_child_as(user, work, timeout + 5))


_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text):
    """``text`` (output of a program another user controls) safe for the admin's terminal: control characters
    (escape sequences) shown as '?'."""
    return _UNPRINTABLE.sub("?", text)


def give_to(path, user, group_gid=None):
    """chown ``path`` (not following symlinks) to ``user`` when running as root; no-op otherwise."""
    if i_am_root() and user is not None:
        os.lchown(path, user.uid, user.gid if group_gid is None else group_gid)


def dir_state(path):
    """(owner uid, group gid, mode bits, is a symbolic link) of ``path`` (of its target for a link), or None
    when missing."""
    try:
        link = stat.S_ISLNK(os.lstat(path).st_mode)
        info = os.stat(path)
    except OSError:
        return None
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode), link


def group_name(gid):
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)

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
