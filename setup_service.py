"""Step 8 of the wizard: restart PostgreSQL (with Alfresco stopped around it) so that wal_level,
archive_mode and max_wal_senders take effect, or print the exact commands for a maintenance window.

Alfresco is stopped through its own ``alfresco.sh stop tomcat`` with a timeout; if Tomcat is still alive
then, only the exact PID from ``tomcat/temp/catalina.pid`` is signalled (never "any java process"). It is
started again only if it was running, and waited for until catalina.out says "Server startup in".
"""

import os
import signal
import time

import setup_safefs
import setup_sys
import subprocess_utils
from setup_steps import CHANGED, PENDING, UNCHANGED, WOULD
from setup_sys import SetupError

STARTED_MARK = b"Server startup in"


class Alfresco:
    """The install's control script and Tomcat. ``base`` is ALF_BASE_DIR; ``say`` prints progress; ``grace``
    seconds Tomcat may take to exit after the script returned, before its PID is signalled."""

    def __init__(self, base, say, grace=20):
        self.base = base
        self.grace = grace
        self.say = say
        self.script = os.path.join(base, "alfresco.sh")
        self.pid_file = os.path.join(base, "tomcat", "temp", "catalina.pid")
        self.catalina_out = os.path.join(base, "tomcat", "logs", "catalina.out")

    def has_script(self):
        return os.path.isfile(self.script) and os.access(self.script, os.X_OK)

    def script_user(self):
        """The script's owner (it runs as the install owner); SetupError if we cannot act as it, or when it is
        root's but a directory above it can be changed by another user (root would run that user's code)."""
        owner = setup_sys.owner_of(self.script)
        if owner is None or not setup_sys.can_act_as(owner):
            raise SetupError("%s belongs to %s: run setup.py with sudo or as that user"
                             % (self.script, owner.name if owner else "?"))
        if owner.uid == 0 and not setup_sys.root_safe_path(self.script):
            raise SetupError("%s belongs to root, but it or a directory above it can be changed by another user: "
                             "setup.py does not run it as root; stop and start Alfresco yourself" % self.script)
        return owner

    def _owners(self):
        owner = setup_sys.owner_of(self.script)
        return {owner.uid} - {0} if owner is not None else set()

    def run_script(self, args, timeout):
        """Run alfresco.sh ``args`` as its owner. Returns (exit code or None on timeout, output tail)."""
        user = self.script_user()
        try:
            result = setup_sys.run_as(user, [self.script] + list(args), timeout=timeout, ok_codes=range(256),
                                      what="alfresco.sh %s" % " ".join(args), cwd=self.base,
                                      daemon=args[0] in ("start", "restart"))
            return result.returncode, setup_sys.printable((result.stdout + result.stderr).strip()[-500:])
        except subprocess_utils.CommandError as exc:
            return None, setup_sys.printable(str(exc))

    def tomcat_pid(self):
        """Tomcat's PID from catalina.pid when that process is alive and belongs to the pid file's owner,
        else None. The pid file is not followed through a link and must be the install owner's (root's only on
        a root-safe path): a link to another program's pid file never gets that program signalled."""
        try:
            fd = setup_safefs.open_checked(self.pid_file, self._owners())
            with os.fdopen(fd) as handle:
                owner = os.fstat(handle.fileno()).st_uid
                pid = int(handle.read(64).strip())
        except (OSError, ValueError, SetupError):
            return None
        if pid <= 1 or pid == os.getpid():
            return None
        try:
            with open("/proc/%d/status" % pid) as handle:
                status = dict(line.split(":", 1) for line in handle if ":" in line)
        except OSError:
            return None
        if status.get("State", "").strip().startswith(("Z", "X")):
            return None
        if int(status.get("Uid", "-1").split()[0]) != owner:
            return None
        return pid

    def stop_tomcat(self, timeout):
        """Stop Tomcat: alfresco.sh stop tomcat (``timeout`` s), then SIGTERM/SIGKILL of the pid-file PID.
        Raises SetupError when it is still alive."""
        pid = self.tomcat_pid()
        if pid is None:
            return
        self.say("  stopping Alfresco (Tomcat pid %d): %s stop tomcat" % (pid, self.script))
        code, output = self.run_script(["stop", "tomcat"], timeout)
        if _wait(lambda: not _alive(pid), self.grace):
            return
        self.say("  alfresco.sh stop %s; Tomcat pid %d is still alive: sending it SIGTERM"
                 % ("timed out" if code is None else "returned %s" % code, pid))
        for sig, grace in ((signal.SIGTERM, 60), (signal.SIGKILL, 15)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            except PermissionError as exc:
                raise SetupError("cannot signal Tomcat pid %d: %s" % (pid, exc))
            if _wait(lambda: not _alive(pid), grace):
                return
        raise SetupError("Tomcat pid %d did not stop (alfresco.sh said: %s)" % (pid, output))

    def start_tomcat(self, timeout):
        """alfresco.sh start tomcat, then wait until catalina.out has a new "Server startup in" line (the
        script's exit code is not trusted: old bundles return non-zero on success). Raises SetupError."""
        offset = _size(self.catalina_out)
        self.say("  starting Alfresco: %s start tomcat (waiting up to %d s for 'Server startup in')"
                 % (self.script, timeout))
        code, output = self.run_script(["start", "tomcat"], min(timeout, 300))
        if not _wait(lambda: self._started_since(offset), timeout):
            raise SetupError("Alfresco did not report 'Server startup in' in %s within %d s (alfresco.sh exit %s: "
                             "%s)" % (self.catalina_out, timeout, code, output))

    def _started_since(self, offset):
        try:
            with os.fdopen(setup_safefs.open_checked(self.catalina_out, self._owners()), "rb") as handle:
                if os.fstat(handle.fileno()).st_size < offset:
                    offset = 0  # rotated or truncated at start
                handle.seek(offset)
                return STARTED_MARK in handle.read(setup_safefs.MAX_TEXT)
        except (OSError, SetupError):
            return False


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _wait(condition, timeout, poll=0.5):
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def _sudo(user):
    return "" if user is None or user.uid == os.geteuid() and not setup_sys.i_am_root() else \
        "sudo -u %s " % user.name


def restart_commands(ctx, alfresco):
    """The exact commands an admin runs in a maintenance window (list of lines)."""
    if alfresco.has_script():
        who = _sudo(setup_sys.owner_of(alfresco.script))
        lines = ["%s%s %s" % (who, alfresco.script, args) for args in (
            "stop tomcat", "stop postgresql", "start postgresql", "start tomcat")]
    else:
        lines = ["# stop Alfresco first", "%s%s -D %s -m fast -w restart" % (
            _sudo(ctx.pg_os_user), os.path.join(ctx.bin_dir, "pg_ctl"), ctx.pgdata), "# start Alfresco again"]
    return lines + ["python3 %s --env %s   # then: verifies the settings, finishes the set-up" % (
        os.path.join(ctx.project_dir, "setup.py"), os.path.abspath(ctx.env_path))]


def restart_step(ctx, stop_timeout, start_timeout):
    """Returns True when no restart is pending afterwards."""
    if not ctx.restart_needed:
        ctx.record("restart", UNCHANGED, "no restart needed")
        return True
    alfresco = Alfresco(ctx.values["ALF_BASE_DIR"], ctx.say)
    commands = restart_commands(ctx, alfresco)
    ctx.say("  wal_level, archive_mode and max_wal_senders take effect only when PostgreSQL restarts. Alfresco is "
            "stopped first and started again afterwards: the repository is unavailable meanwhile (usually a "
            "few minutes, mostly Alfresco's own start-up).")
    if ctx.dry_run:
        ctx.say("  would run:\n    " + "\n    ".join(commands[:-1]))
        ctx.record("restart", WOULD, "PostgreSQL restart")
        return False
    if not alfresco.has_script() or not ctx.ui.confirm("RESTART_POSTGRES", "Restart now? (no: print the "
                                                       "commands for a maintenance window)", default=False):
        if not alfresco.has_script():
            ctx.say("  %s not found: not restarting anything myself" % alfresco.script)
        ctx.say("  Restart in a maintenance window with:\n    " + "\n    ".join(commands))
        ctx.record("restart", PENDING, "PostgreSQL must be restarted (commands above)")
        return False
    was_running = alfresco.tomcat_pid() is not None
    if was_running:
        alfresco.stop_tomcat(stop_timeout)
    try:
        _restart_postgres(ctx, alfresco)
    finally:
        if was_running:
            alfresco.start_tomcat(start_timeout)
    ctx.record("restart", CHANGED, "PostgreSQL restarted%s" % (", Alfresco stopped and started again"
                                                               if was_running else ""))
    return True


def _ready(ctx):
    try:
        ctx.user_psql.run("SELECT 1", timeout=20)
        return True
    except SetupError:
        return False


def _down(ctx):
    try:
        text = setup_safefs.read_checked(os.path.join(ctx.pgdata, "postmaster.pid"), {ctx.pg_os_user.uid})
        return text is None or not _alive(int(text.splitlines()[0].strip()))
    except (OSError, ValueError, IndexError, SetupError):
        return not _ready(ctx)


def _restart_postgres(ctx, alfresco, timeout=300):
    ctx.say("  restarting PostgreSQL: %s stop postgresql; %s start postgresql" % (alfresco.script, alfresco.script))
    code, output = alfresco.run_script(["stop", "postgresql"], timeout)
    if not _wait(lambda: _down(ctx), 30):
        raise SetupError("PostgreSQL did not stop (alfresco.sh exit %s: %s); nothing was restarted; the new "
                         "settings are configured and wait for a restart" % (code, output))
    _start_and_wait(ctx, alfresco, timeout)
    if _ready(ctx):
        return
    log = _tail(os.path.join(ctx.values["ALF_BASE_DIR"], "postgresql", "postgresql.log"),
                {ctx.pg_os_user.uid} | alfresco._owners())
    restored = _restore_config(ctx)
    back = _start_and_wait(ctx, alfresco, timeout)
    raise SetupError("PostgreSQL did not start with the new settings. Server log:\n%s\n%s; PostgreSQL %s"
                     % (log, restored, "is running again with its previous settings" if back else
                        "is STILL DOWN: start it with %s start postgresql" % alfresco.script))


def _start_and_wait(ctx, alfresco, timeout):
    """alfresco.sh start postgresql, then wait until it accepts connections; give up early when 10 s after
    the script no server process exists (it failed to start). Returns True when it is up."""
    alfresco.run_script(["start", "postgresql"], timeout)
    returned = time.monotonic()
    _wait(lambda: _ready(ctx) or (time.monotonic() - returned > 10 and _down(ctx)), timeout, poll=1)
    return _ready(ctx)


def _restore_config(ctx):
    """Put back the configuration files saved before this run changed them (server stopped), from the text
    kept in memory: the copy in setup-backups/ is the service user's and is not read back as root."""
    done = []
    for saved in (ctx.auto_conf_copy, ctx.conf_copy):
        if not saved:
            continue
        target, copy, text = saved
        try:
            setup_safefs.rewrite_in_place(target, text, ctx.pg_os_user.uid)
            done.append("%s restored (its copy: %s)" % (target, copy))
        except SetupError as exc:
            done.append("could not restore %s (its copy: %s): %s" % (target, copy, exc))
    ctx.applied = [a for a in ctx.applied if "pg_hba" in a or a.startswith("ALTER ROLE") or a.startswith("GRANT")]
    return "; ".join(done) or "no saved configuration to restore"


def _tail(path, owners, lines=15):
    text = None
    try:
        text = setup_safefs.read_checked(path, owners)
    except SetupError:
        pass
    return setup_sys.printable("".join((text or "(log not readable)").splitlines(True)[-lines:]))
