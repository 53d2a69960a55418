"""The one place where this project runs external commands.

Every command goes through :func:`run`: an argv list (never a shell), an explicit environment, a
timeout that kills the command's whole process tree, the command line logged with secrets masked,
output streamed line by line to the log, and one exception type, :class:`CommandError`, that carries
the exit code and the tail of stderr.
"""

import fcntl
import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque

LOG = logging.getLogger("subprocess")

# How many trailing stderr lines an error keeps: enough to show pg_basebackup's or rsync's reason.
STDERR_TAIL_LINES = 20
MASK = "********"


class CommandError(Exception):
    """An external command failed: could not start, exited non-zero, or ran past its timeout.

    Attributes: ``argv`` (masked), ``returncode`` (None when it never ran or was killed for a timeout),
    ``stderr_tail`` (last lines of stderr), ``timed_out`` (bool), ``not_found`` (bool).
    """

    def __init__(self, message, argv, returncode=None, stderr_tail="", timed_out=False, not_found=False):
        super().__init__(message)
        self.argv = argv
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.timed_out = timed_out
        self.not_found = not_found


class CommandResult:
    """What a finished command produced: ``returncode``, ``stdout`` and ``stderr`` as text."""

    def __init__(self, argv, returncode, stdout, stderr, duration):
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.duration = duration


def mask(text, secrets):
    """Return ``text`` with every non-empty secret replaced by a mask."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


class MaskingFilter(logging.Filter):
    """A logging filter that masks every one of ``secrets`` in every record, whatever logged it (the entry points
    put it on their handlers)."""

    def __init__(self, secrets):
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record):
        if self.secrets:
            record.msg, record.args = mask(record.getMessage(), self.secrets), None
        return True


def base_env(extra=None):
    """A minimal explicit environment: PATH, HOME, LANG/LC_ALL (C, so tool output parses), plus ``extra``.

    Nothing else from the caller's environment leaks in (no stray PGPASSWORD, no PG* surprises).
    """
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/"),
        "LANG": "C",
        "LC_ALL": "C",
    }
    if "TZ" in os.environ:
        env["TZ"] = os.environ["TZ"]
    for key, value in (extra or {}).items():
        if value is not None:
            env[key] = str(value)
    return env


def _pump(stream, sink, log, level, prefix, secrets):
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        sink.append(line)
        log.log(level, "%s%s", prefix, mask(line, secrets))
    stream.close()


# Most specific first: rsync ends with a generic "rsync error: ... (see previous errors) (code 23)" after
# the line that names the file.
_REASON_WORDS = (("no space", "denied", "failed to", "could not", "cannot", "fatal", "not found"),
                 ("error", "failed"))


def reason_line(stderr):
    """The most telling line of a tool's stderr: the last one naming a specific failure, else the last
    one that reads like an error, else the last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    if not lines:
        return "no error output"
    for words in _REASON_WORDS:
        for line in reversed(lines):
            if any(word in line.lower() for word in words):
                return line
    return lines[-1]


# Linux's F_SETPIPE_SZ (fcntl has the name from Python 3.10) and the default pipe-max-size: a 64 KB pipe
# between zstd -dc and our tar reader makes ~16 reads (and as many wake-ups of zstd) per MB of a 1 GB tar.
_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20


def widen_pipe(stream):
    """Ask for a PIPE_SIZE buffer on the pipe behind ``stream``; where the kernel refuses (a lower
    pipe-max-size, the user's pipe quota) the pipe simply stays as it is."""
    try:
        fcntl.fcntl(stream.fileno(), getattr(fcntl, "F_SETPIPE_SZ", _F_SETPIPE_SZ), PIPE_SIZE)
    except (OSError, ValueError):
        pass


def _watchdog(proc, timeout, label, log):
    """Start a timer that kills ``proc``'s whole tree after ``timeout`` s (none for 0/None). Returns (timer or
    None, fired: a list that gets True once it has fired). A timer, not ``wait(timeout=)``: that polls with
    sleeps of up to 50 ms, so every command would be seen ending late."""
    fired = []

    def on_timeout():
        fired.append(True)
        log.error("%s: still running after %s s, stopping it and every process it started", label, timeout)
        _kill_tree(proc)

    timer = threading.Timer(timeout, on_timeout) if timeout else None
    if timer:
        timer.daemon = True
        timer.start()
    return timer, fired


def _copy_into(source, stream):
    try:
        while True:
            chunk = source.read(1 << 20)
            if not chunk:
                break
            stream.write(chunk)
    except (BrokenPipeError, OSError, ValueError):
        pass
    finally:
        try:
            stream.close()
        except OSError:
            pass


def _feed(stream, data):
    try:
        stream.write(data)
        stream.close()
    except (BrokenPipeError, OSError, ValueError):
        pass


def _descendants(pid):
    """PIDs of every process below ``pid`` (children, grandchildren...), from /proc. Linux only."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc):
    """SIGTERM the command and everything it started, then SIGKILL what is left after 5 seconds.

    Children stay in our process group (no new session), so that a kill of the whole run -- a reboot, an
    admin's ``kill -9 -PGID`` -- takes them along; a timeout therefore kills by tree, not by group.
    """
    targets = []
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        # Once the command is dead its children belong to init: remember every one seen so far.
        targets += [pid for pid in [proc.pid] + _descendants(proc.pid) if pid not in targets]
        for pid in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if not any(_alive(pid) for pid in targets[1:]):
            return


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


_INHERITED_FDS = []


def pass_to_children(fd):
    """Let every command started from now on inherit ``fd`` (the backup lock): while any of them outlives
    a killed run, the lock stays held and the next run is refused instead of racing it."""
    _INHERITED_FDS.append(fd)


def run(argv, env, timeout=None, secrets=(), ok_codes=(0,), cwd=None, log=None, stdout_level=logging.INFO,
        stdin_data=None, what=None, daemon=False, new_session=False):
    """Run ``argv`` and wait for it.

    Inputs: ``argv`` list of strings; ``env`` the complete environment (build it with :func:`base_env`);
    ``timeout`` seconds or None/0 for none; ``secrets`` strings masked wherever the command or its
    output is logged; ``ok_codes`` exit codes that count as success; ``stdin_data`` bytes fed to stdin.
    ``what`` a short phrase ("taking the base backup") used in error messages. ``daemon``: the command
    leaves a server running (pg_ctl start, alfresco.sh start): it gets its own session, so neither a hang-up
    of the admin's terminal nor a kill of our process group reaches the server, and it does not inherit
    the backup lock. ``new_session``: it gets its own session (no controlling terminal) but is otherwise an
    ordinary command (setup.py's commands run as another user: they must not reach the admin's terminal).
    Output: a :class:`CommandResult` (stdout/stderr also kept in memory; do not use for huge output).
    Raises :class:`CommandError` when the program is missing, times out or exits with a code not in
    ``ok_codes``.
    """
    log = log or LOG
    argv = [str(a) for a in argv]
    shown = mask(" ".join(argv), secrets)
    label = what or os.path.basename(argv[0])
    log.info("running: %s", shown)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=() if daemon else tuple(_INHERITED_FDS),
            start_new_session=daemon or new_session)
    except FileNotFoundError:
        raise CommandError("%s: program not found: %s" % (label, argv[0]), shown, not_found=True)
    except PermissionError as exc:
        raise CommandError("%s: cannot execute %s: %s" % (label, argv[0], exc), shown, not_found=True)
    out_lines, err_lines = [], deque(maxlen=5000)
    name = os.path.basename(argv[0])
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, out_lines, log, stdout_level, name + ": ", secrets)),
        threading.Thread(target=_pump, args=(proc.stderr, err_lines, log, logging.INFO, name + ": ", secrets)),
    ]
    for thread in pumps:
        thread.daemon = True
        thread.start()
    if stdin_data is not None:
        # Fed from a thread: a child that never reads stdin must not block us past the timeout.
        feeder = threading.Thread(target=_feed, args=(proc.stdin, stdin_data))
        feeder.daemon = True
        feeder.start()
    timer, fired = _watchdog(proc, timeout, label, log)
    try:
        proc.wait()
    except BaseException:
        # Interrupted (Ctrl-C, our own SIGTERM handler): never leave the child running behind us.
        _kill_tree(proc)
        raise
    finally:
        if timer:
            timer.cancel()
    if fired:
        timer.join()  # the kill of the whole tree is finished before we report it
    timed_out = bool(fired)
    for thread in pumps:
        thread.join(timeout=10)
    duration = time.monotonic() - started
    tail = mask("\n".join(list(err_lines)[-STDERR_TAIL_LINES:]), secrets)
    if timed_out:
        raise CommandError("%s: timed out after %s s" % (label, timeout), shown, None, tail, timed_out=True)
    if proc.returncode not in ok_codes:
        code = proc.returncode
        reason = "killed by signal %d" % -code if code < 0 else "exit code %d" % code
        raise CommandError("%s failed (%s): %s" % (label, reason, reason_line(tail)), shown, code, tail)
    return CommandResult(shown, proc.returncode, "\n".join(out_lines), "\n".join(err_lines), duration)


def read_stream(argv, env, consume, timeout=None, secrets=(), what=None, log=None, feed=None):
    """Run ``argv`` and hand its stdout (a binary file object) to ``consume(stream)``. ``feed``: a binary
    file object copied to the command's stdin from a thread (e.g. ``zstd -dc -`` reading a file still being
    written).

    For output too big to keep in memory (e.g. ``zstd -dc base.tar.zst`` read by tarfile). stderr is
    logged. Returns what ``consume`` returned. Raises CommandError on a non-zero exit or timeout; an
    exception from ``consume`` kills the command and propagates.
    """
    log = log or LOG
    argv = [str(a) for a in argv]
    shown = mask(" ".join(argv), secrets)
    label = what or os.path.basename(argv[0])
    log.info("running: %s", shown)
    try:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE if feed is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=tuple(_INHERITED_FDS))
    except (FileNotFoundError, PermissionError) as exc:
        raise CommandError("%s: cannot run %s: %s" % (label, argv[0], exc), shown, not_found=True)
    err_lines = deque(maxlen=STDERR_TAIL_LINES)
    pump = threading.Thread(target=_pump, args=(proc.stderr, err_lines, log, logging.INFO,
                                                os.path.basename(argv[0]) + ": ", secrets))
    pump.daemon = True
    pump.start()
    widen_pipe(proc.stdout)
    if feed is not None:
        widen_pipe(proc.stdin)
        feeder = threading.Thread(target=_copy_into, args=(feed, proc.stdin))
        feeder.daemon = True
        feeder.start()
    timer, fired = _watchdog(proc, timeout, label, log)
    try:
        result = consume(proc.stdout)
        proc.stdout.read()  # drain, so the producer is not killed by SIGPIPE after a short consumer
    except BaseException:
        _kill_tree(proc)
        if fired:  # the consumer only failed because the timeout cut its input
            raise CommandError("%s: timed out after %s s" % (label, timeout), shown, None, timed_out=True)
        raise
    finally:
        proc.wait()
        if timer:
            timer.cancel()
        pump.join(timeout=10)
    tail = mask("\n".join(err_lines), secrets)
    if fired:
        raise CommandError("%s: timed out after %s s" % (label, timeout), shown, None, tail, timed_out=True)
    if proc.returncode != 0:
        code = proc.returncode
        raise CommandError("%s failed (%s): %s" % (label, "killed by signal %d" % -code if code < 0
                                                    else "exit code %d" % code, reason_line(tail)),
                           shown, code, tail)
    return result
