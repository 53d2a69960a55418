"""Fault-injection helpers for the fault, hostile-input and security tests (tests/test_faults_*.py,
tests/test_hostile_input.py, tests/test_security.py).

Processes
    ``Run(sb, env_path, script="backup.py", args=(), extra_env=None)`` starts a project CLI as the sandbox's
    service user in its own session, output to a file. ``run.stop_when(predicate, timeout)`` freezes the
    run's whole process tree (SIGSTOP on every descendant, found through /proc parent links, so children in
    their own sessions such as pg_basebackup and rsync are included) at short intervals until
    ``predicate(run, procs)`` holds -- a kill point hit exactly, whatever the machine's speed -- and
    returns True with the tree frozen (False when the run ended first). ``run.kill_tree()`` SIGKILLs every
    process of the tree at once (what a reboot does); ``run.kill_group()`` only the session's process
    group (what ``kill -9 -PGID`` or a group-wide timeout does). ``run.thaw()``, ``run.wait()``,
    ``run.output()``.

Files
    ``tree_state(path)`` {relative bytes path: entry} for comparing a snapshot with its source (bytes paths:
    non-UTF-8 names work); ``backup_log(sb)`` the text of every backup-*.log; ``entries(sb, kind)`` the
    catalog's view; ``age_backup(sb, kind, name, days)`` renames a backup as if taken earlier;
    ``path_without(sb, *programs)`` a PATH directory with every program but those.

Everything here is test code: it may signal only processes it started (and their descendants).
"""

import contextlib
import datetime
import glob
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time

import catalog
import pytest

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
KINDS = {"postgres": "base", "contentstore": "contentstore", "config": "config"}


# ------------------------------------------------------------------------------------------- /proc

def proc_stat(pid):
    """{'pid', 'comm', 'state', 'ppid', 'pgrp', 'session'} of a live process, or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            raw = handle.read().decode("utf-8", "replace")
    except OSError:
        return None
    left, right = raw.find("("), raw.rfind(")")
    fields = raw[right + 2:].split()
    if len(fields) < 4:
        return None
    return {"pid": pid, "comm": raw[left + 1:right], "state": fields[0], "ppid": int(fields[1]),
            "pgrp": int(fields[2]), "session": int(fields[3])}


def all_procs():
    """{pid: proc_stat} of every process (zombies included, with state 'Z')."""
    result = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = proc_stat(int(name))
            if info:
                result[int(name)] = info
    return result


def descendants(root, procs=None):
    """{pid: proc_stat} of ``root`` and every live (non-zombie) process below it."""
    procs = all_procs() if procs is None else procs
    children = {}
    for pid, info in procs.items():
        children.setdefault(info["ppid"], []).append(pid)
    found, stack = {}, [root]
    while stack:
        pid = stack.pop()
        info = procs.get(pid)
        if info is None or info["state"] in ("Z", "X"):
            continue
        found[pid] = info
        stack.extend(children.get(pid, ()))
    return found


def alive(pid):
    info = proc_stat(pid)
    return info is not None and info["state"] not in ("Z", "X")


def cmdline(pid):
    """argv of ``pid`` as a list of bytes ([] when gone)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return [part for part in handle.read().split(b"\0") if part]
    except OSError:
        return []


def procs_mentioning(text):
    """PIDs of live processes whose command line contains ``text`` (str or bytes)."""
    needle = text.encode() if isinstance(text, str) else text
    found = []
    for pid, info in all_procs().items():
        if info["state"] not in ("Z", "X") and pid != os.getpid() and needle in b"\0".join(cmdline(pid)):
            found.append(pid)
    return found


def wait_gone(pids, timeout=30):
    """Wait until none of ``pids`` is alive. Returns the ones still alive (empty on success)."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    return left


def signal_pid(pid, sig):
    """os.kill that returns False instead of raising when ``pid`` is gone."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


# ------------------------------------------------------------------------------------------- runs

class Run:
    """A project CLI started as the sandbox's service user, in a new session; see the module docstring."""

    def __init__(self, sb, env_path, script="backup.py", args=(), extra_env=None):
        self.sb = sb
        fd, self.out_path = tempfile.mkstemp(prefix="faultrun-", suffix=".out", dir=sb.root)
        argv = [sb.python, os.path.join(sb.project_dir, script), "--env", env_path] + [str(a) for a in args]
        env = {"PATH": SAFE_PATH, "HOME": sb.home, "LANG": "C.UTF-8"}
        if "TZ" in os.environ:
            env["TZ"] = os.environ["TZ"]
        env.update({k: str(v) for k, v in (extra_env or {}).items()})
        kwargs = {}
        if os.geteuid() == 0:
            kwargs = {"user": sb.uid, "group": sb.gid, "extra_groups": []}
        with os.fdopen(fd, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=sb.root, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        self.pid = self.proc.pid
        self.frozen = {}
        self.killed = {}

    def tree(self):
        return descendants(self.pid)

    def freeze(self):
        """SIGSTOP every process of the tree (repeating until no new one appears) and wait until all are
        stopped. Returns {pid: proc_stat} of the frozen tree (empty when the run has ended)."""
        stopped = {}
        for _round in range(50):
            procs = self.tree()
            new = [pid for pid in procs if pid not in stopped]
            if not new:
                break
            for pid in new:
                if signal_pid(pid, signal.SIGSTOP):
                    stopped[pid] = procs[pid]
        deadline = time.monotonic() + 5
        for pid in list(stopped):
            while time.monotonic() < deadline:
                info = proc_stat(pid)
                if info is None or info["state"] in ("T", "t", "Z", "X"):
                    break
                time.sleep(0.0005)
        self.frozen = {pid: info for pid, info in stopped.items() if alive(pid)}
        return dict(self.frozen)

    def thaw(self):
        for pid in list(self.frozen):
            signal_pid(pid, signal.SIGCONT)
        self.frozen = {}

    def stop_when(self, predicate, timeout=180, step=0.002, pre=None):
        """Freeze the tree at the first check where ``predicate(run, procs)`` is true; True then (tree
        frozen), False when the run ended or ``timeout`` passed first (tree running). ``pre(run)``: a cheap
        check made without freezing; the tree is only frozen once it holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if pre is None or pre(self):
                procs = self.freeze()
                if procs and self.pid in procs and predicate(self, procs):
                    return True
                self.thaw()
            time.sleep(step)
        return False

    def kill_tree(self):
        """SIGKILL the run's process and every descendant at once (as a reboot would); wait until gone.
        Returns the {pid: proc_stat} killed."""
        procs = self.freeze()
        for pid in procs:
            signal_pid(pid, signal.SIGKILL)
        self.frozen = {}
        self.killed = procs
        self.proc.wait(timeout=60)
        left = wait_gone(list(procs))
        assert not left, "still alive after SIGKILL: %s" % left
        return procs

    def kill_group(self):
        """SIGKILL only the run's process group (os.killpg); returns the tree as it was just before."""
        procs = self.tree()
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in self.frozen:  # stopped processes outside the group must not stay stopped forever
            signal_pid(pid, signal.SIGCONT)
        self.frozen = {}
        self.proc.wait(timeout=60)
        return procs

    def wait(self, timeout=600):
        return self.proc.wait(timeout=timeout)

    def output(self):
        with open(self.out_path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def cleanup(self):
        """Kill whatever is left of the tree (for a finally: block)."""
        if self.proc.poll() is None or self.frozen:
            try:
                self.kill_tree()
            except (AssertionError, subprocess.TimeoutExpired):
                pass


def comms(procs):
    return sorted(info["comm"] for info in procs.values())


def has_comm(procs, name):
    return any(info["comm"] == name for info in procs.values())


# ------------------------------------------------------------------------------------------- files

def tree_state(root, with_mtime=False):
    """{relative path (bytes): entry} below ``root`` (root itself excluded). Entries: ('d', mode),
    ('f', mode, size, sha256[, mtime_ns]), ('l', target bytes), ('?', type). Never follows symlinks."""
    root = os.fsencode(root)
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                state[rel] = ("l", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                state[rel] = ("d", stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256()
                with open(path, "rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(chunk)
                entry = ("f", stat.S_IMODE(st.st_mode), st.st_size, digest.hexdigest())
                state[rel] = entry + ((st.st_mtime_ns,) if with_mtime else ())
            else:
                state[rel] = ("?", stat.S_IFMT(st.st_mode))
        # os.walk lists symlinks to directories in dirnames but does not descend into them: good.
    return state


def diff_trees(expected, actual, limit=10):
    """A short description of how two tree_state dicts differ ('' when equal)."""
    lines = []
    for rel in sorted(set(expected) | set(actual)):
        if expected.get(rel) != actual.get(rel):
            lines.append("%r: expected %r, got %r" % (rel, expected.get(rel), actual.get(rel)))
    more = " (and %d more)" % (len(lines) - limit) if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


def stage_line(output, stage):
    """The summary row of ``stage`` (its last occurrence), e.g. 'postgres FAILED 0.1s - ...'."""
    rows = [line.split("backup: ", 1)[-1] for line in output.splitlines()
            if line.split("backup: ", 1)[-1].startswith(stage + " ")]
    assert rows, "no summary row for %s in:\n%s" % (stage, output[-3000:])
    return rows[-1]


def count_files(root):
    """Number of regular files below ``root`` (0 when it does not exist)."""
    total = 0
    for _dirpath, _dirs, files in os.walk(os.fsencode(root)):
        total += len(files)
    return total


def dir_bytes(root):
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def backup_log(sb, backup_dir=None):
    """The text of every BACKUP_DIR/backup-*.log (empty when none)."""
    text = []
    for path in sorted(glob.glob(os.path.join(backup_dir or sb.backup_dir, "backup-*.log"))):
        with open(path, "rb") as handle:
            text.append(handle.read().decode("utf-8", "replace"))
    return "".join(text)


def entries(sb, kind, backup_dir=None):
    """catalog.list_backups for ``kind`` (postgres, contentstore, config)."""
    return catalog.list_backups(backup_dir or sb.backup_dir, kind)


def partials(backup_dir):
    """Every ``*.partial`` directory under BACKUP_DIR's kind folders."""
    return sorted(glob.glob(os.path.join(backup_dir, "*", "*.partial")))


def age_backup(sb, kind, name, days, backup_dir=None):
    """Rename backup ``name`` of ``kind`` (directory + metadata) as if taken ``days`` earlier. Returns the
    new name."""
    prefix, stamp = name.split("-", 1)
    when = datetime.datetime.strptime(stamp, "%Y-%m-%d_%H-%M-%S") - datetime.timedelta(days=days)
    new = "%s-%s" % (prefix, when.strftime("%Y-%m-%d_%H-%M-%S"))
    folder = os.path.join(backup_dir or sb.backup_dir, kind)
    os.rename(os.path.join(folder, name), os.path.join(folder, new))
    os.rename(os.path.join(folder, name + ".json"), os.path.join(folder, new + ".json"))
    return new


def path_without(sb, *programs):
    """A directory (under the sandbox root, readable by the service user) holding symlinks to every program
    on the usual PATH except ``programs``. Returns its path, for PATH=."""
    target = tempfile.mkdtemp(prefix="path-without-", dir=sb.root)
    os.chmod(target, 0o755)
    for directory in SAFE_PATH.split(":"):
        if not os.path.isdir(directory) or os.path.islink(directory):
            continue
        for name in os.listdir(directory):
            link = os.path.join(target, name)
            full = os.path.join(directory, name)
            if name in programs or os.path.lexists(link):
                continue
            if os.path.isfile(full) and os.access(full, os.X_OK):
                os.symlink(full, link)
    for name in programs:
        assert shutil.which(name, path=target) is None, name
    return target


def restore_verify(sb, env_path, timeout=600):
    """``restore.py verify`` as the service user (CompletedProcess), or None when restore.py is absent."""
    if not os.path.isfile(os.path.join(sb.project_dir, "restore.py")):
        return None
    return sb.run_cli("restore.py", args=["verify"], env_path=env_path, timeout=timeout)


@contextlib.contextmanager
def small_fs(path, size, uid, gid):
    """A tmpfs of ``size`` (bytes, or a mount size such as '2m') mounted at ``path`` for the block (root only);
    skips the test when it cannot be mounted. Lazily unmounted afterwards."""
    os.makedirs(path, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0700,uid=%d,gid=%d" % (size, uid, gid),
                             "tmpfs", path], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % result.stderr.strip())
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)
