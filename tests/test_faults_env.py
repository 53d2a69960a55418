"""Environment faults around a real ``backup.py`` run: the mail server down, refusing or hanging; rsync or
pg_basebackup missing; the contentstore missing or unreadable; BACKUP_DIR read-only; a tool hanging past its
timeout (stopped with its whole process tree); two runs at once; a restore while a backup runs.

Each: a clear message naming what is wrong, the right exit code (0 ok, 1 stage failed, 2 config error, 3 lock
held), an alert where the run can send one, and nothing lost."""

import contextlib
import fcntl
import glob
import os
import re
import signal
import socket
import threading
import time

import catalog
import faultkit
import lock
import pytest
from aiosmtpd.controller import Controller
from mailserver import MailServer
from sandbox import free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs backup.py as the service user (needs root)")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED = 0, 1, 2, 3
MAIL_TO = "admin@example.org"


def backup(sb, env_path, extra_env=None):
    result = sb.run_cli("backup.py", env_path=env_path, timeout=600, extra_env=extra_env)
    return result


def mail_env(port, **extra):
    values = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": port, "SMTP_SECURITY": "none", "ALERT_EMAIL": MAIL_TO,
              "ALERT_FROM": "backup@example.org", "SMTP_TIMEOUT": 2}
    values.update(extra)
    return values


# ------------------------------------------------------------------------------------------- SMTP

class _Refuser:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        return "550 5.7.1 relaying denied"


@contextlib.contextmanager
def smtp_refusing():
    port = free_port()
    controller = Controller(_Refuser(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


@contextlib.contextmanager
def smtp_hanging():
    """A socket that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


@contextlib.contextmanager
def smtp_down():
    yield free_port()  # nothing listens there


SMTP_FAULTS = {"down": (smtp_down, "connection refused"),
               "refusing": (smtp_refusing, "550 5.7.1 relaying denied"),
               "hanging": (smtp_hanging, "timed out after 2 s")}


@pytest.mark.parametrize("fault", sorted(SMTP_FAULTS))
def test_smtp_fault_changes_neither_the_result_nor_the_exit_code(sandbox, fault):
    sb = sandbox
    make, reason = SMTP_FAULTS[fault]
    with make() as port:
        env_path = sb.write_env(ALERT_ON="always", **mail_env(port))
        started = time.monotonic()
        good = backup(sb, env_path)
        good_seconds = time.monotonic() - started
        sb.stop()
        try:
            started = time.monotonic()
            bad = backup(sb, env_path)
            bad_seconds = time.monotonic() - started
        finally:
            sb.start()
    assert good.returncode == EXIT_OK, good.stdout[-3000:]
    assert "Backup summary (OK)" in good.stdout
    assert bad.returncode == EXIT_FAILED, bad.stdout[-3000:]
    assert "Backup summary (FAILED)" in bad.stdout
    for result in (good, bad):
        assert "cannot send alert e-mail via 127.0.0.1:%d" % port in result.stdout, result.stdout[-2000:]
        assert reason in result.stdout, result.stdout[-2000:]
    # Bounded: SMTP_TIMEOUT=2 per attempt; generous limits for a loaded machine.
    assert good_seconds < 120 and bad_seconds < 120, (good_seconds, bad_seconds)
    assert [e.status for e in faultkit.entries(sb, "postgres")] == [catalog.DONE]


# ------------------------------------------------------------------------------------------- tools

def test_rsync_missing(sandbox):
    sb = sandbox
    no_rsync = {"PATH": faultkit.path_without(sb, "rsync")}
    with MailServer() as mail:
        env_path = sb.write_env(**mail.env())
        first = backup(sb, env_path, extra_env=no_rsync)
        messages = mail.wait(1)
    # The first copy needs rsync: the contentstore stage fails naming it; the database backup is kept.
    assert first.returncode == EXIT_FAILED, first.stdout[-3000:]
    row = faultkit.stage_line(first.stdout, "contentstore")
    assert "FAILED" in row and "program not found: rsync" in row, row
    assert "OK" in faultkit.stage_line(first.stdout, "postgres")
    assert len(messages) == 1 and "program not found: rsync" in messages[0]["body"]
    # With rsync back, the first snapshot is made (reusing the empty partial).
    assert backup(sb, env_path).returncode == EXIT_OK
    # Nightly, the in-process engine needs no rsync ...
    sb.add_content(3)
    nightly = backup(sb, env_path, extra_env=no_rsync)
    assert nightly.returncode == EXIT_OK, nightly.stdout[-3000:]
    assert "snapshot engine: linktree" in nightly.stdout
    # ... unless CONTENTSTORE_METHOD=rsync asks for it.
    forced = backup(sb, sb.write_env(CONTENTSTORE_METHOD="rsync"), extra_env=no_rsync)
    assert forced.returncode == EXIT_FAILED
    assert "program not found: rsync" in faultkit.stage_line(forced.stdout, "contentstore")
    assert len([e for e in faultkit.entries(sb, "contentstore") if e.status == catalog.DONE]) == 2


def test_pg_basebackup_missing(sandbox):
    sb = sandbox
    empty = os.path.join(sb.root, "no-tools")
    os.mkdir(empty, 0o755)
    result = backup(sb, sb.write_env(PG_BIN_DIR=empty))
    assert result.returncode == EXIT_FAILED, result.stdout[-3000:]
    row = faultkit.stage_line(result.stdout, "postgres")
    assert "FAILED" in row and "PG_BIN_DIR=%s has no executable pg_basebackup" % empty in row, row
    # Not configured anywhere: neither in the bundle nor on PATH.
    os.unlink(os.path.join(sb.pg_bin, "pg_basebackup"))
    path = faultkit.path_without(sb, "pg_basebackup")
    result = backup(sb, sb.write_env(), extra_env={"PATH": path})
    assert result.returncode == EXIT_FAILED
    row = faultkit.stage_line(result.stdout, "postgres")
    assert "pg_basebackup not found" in row and "PG_BIN_DIR" in row, row
    assert not glob.glob(os.path.join(sb.backup_dir, "postgres", "base-*"))
    # The contentstore was still backed up.
    assert [e.status for e in faultkit.entries(sb, "contentstore")] == [catalog.DONE, catalog.DONE]
    os.symlink(os.path.join(sb.real_pg_bin, "pg_basebackup"), os.path.join(sb.pg_bin, "pg_basebackup"))
    assert backup(sb, sb.write_env()).returncode == EXIT_OK


# ------------------------------------------------------------------------------------------- contentstore

def test_contentstore_dir_missing_is_a_config_error(sandbox):
    sb = sandbox
    missing = os.path.join(sb.root, "no", "contentstore")
    with MailServer() as mail:
        result = backup(sb, sb.write_env(CONTENTSTORE_DIR=missing, **mail.env()))
        messages = mail.wait(1)
    assert result.returncode == EXIT_CONFIG
    assert "CONTENTSTORE_DIR: directory does not exist: %s" % missing in result.stderr
    assert len(messages) == 1 and "CONTENTSTORE_DIR" in messages[0]["body"]
    assert not os.path.exists(os.path.join(sb.backup_dir, "postgres"))


def test_default_contentstore_missing_fails_the_stage_then_recovers(sandbox):
    sb = sandbox
    env_path = sb.write_env()
    moved = sb.contentstore_dir + ".away"
    os.rename(sb.contentstore_dir, moved)
    try:
        result = backup(sb, env_path)
    finally:
        os.rename(moved, sb.contentstore_dir)
    assert result.returncode == EXIT_FAILED
    row = faultkit.stage_line(result.stdout, "contentstore")
    assert "FAILED" in row and "contentstore not found: %s" % sb.contentstore_dir in row, row
    assert "SKIPPED" in faultkit.stage_line(result.stdout, "retention")
    assert backup(sb, env_path).returncode == EXIT_OK


def _unreadable(sb, rel):
    path = os.path.join(sb.contentstore_dir, rel)
    os.chown(path, 0, 0)
    os.chmod(path, 0o600)  # the service user cannot read it
    return path


def test_unreadable_file_fails_the_nightly_snapshot_naming_it(sandbox):
    """The in-process engine: the contentstore stage FAILS (no silently incomplete snapshot), naming the
    file; the partial is kept for the next run, which succeeds once the file is readable."""
    sb = sandbox
    env_path = sb.write_env()
    assert backup(sb, env_path).returncode == EXIT_OK
    rel = sb.add_content(1, date=(2025, 3, 3, 3, 3))[0]
    path = _unreadable(sb, rel)
    with MailServer() as mail:
        result = backup(sb, sb.write_env(**mail.env()))
        messages = mail.wait(1)
    assert result.returncode == EXIT_FAILED
    row = faultkit.stage_line(result.stdout, "contentstore")
    assert "FAILED" in row and path in row and "Permission denied" in row, row
    assert len(messages) == 1 and path in messages[0]["body"]
    assert "SKIPPED" in faultkit.stage_line(result.stdout, "retention")
    sb.chown_to_service_user(path)
    again = backup(sb, env_path)
    assert again.returncode == EXIT_OK, again.stdout[-3000:]
    assert "reusing" in again.stdout


def test_unreadable_file_fails_the_first_rsync_copy(sandbox):
    """The first copy (rsync): the stage FAILS and rsync's own line naming the file is in the log."""
    sb = sandbox
    path = _unreadable(sb, sorted(sb.content_files())[3])
    with MailServer() as mail:
        result = backup(sb, sb.write_env(**mail.env()))
        messages = mail.wait(1)
    assert result.returncode == EXIT_FAILED
    assert "FAILED" in faultkit.stage_line(result.stdout, "contentstore")
    assert 'failed to open "%s": Permission denied' % path in result.stdout
    assert 'failed to open "%s"' % path in faultkit.backup_log(sb)
    assert len(messages) == 1 and "contentstore" in messages[0]["subject"] + messages[0]["body"]
    assert not [e for e in faultkit.entries(sb, "contentstore") if e.status == catalog.DONE]
    sb.chown_to_service_user(path)
    again = backup(sb, sb.write_env())
    assert again.returncode == EXIT_OK and "reusing" in again.stdout, again.stdout[-3000:]


def test_unreadable_file_is_named_in_the_rsync_alert(sandbox):
    sb = sandbox
    path = _unreadable(sb, sorted(sb.content_files())[3])
    with MailServer() as mail:
        result = backup(sb, sb.write_env(**mail.env()))
        messages = mail.wait(1)
    assert result.returncode == EXIT_FAILED
    assert len(messages) == 1
    assert path in messages[0]["body"] or path in faultkit.stage_line(result.stdout, "contentstore")


# ------------------------------------------------------------------------------------------- BACKUP_DIR

def test_backup_dir_read_only_is_refused_naming_it(sandbox):
    sb = sandbox
    target = os.path.join(sb.root, "readonly-backups")
    os.mkdir(target, 0o755)  # owned by root: the service user cannot write
    with MailServer() as mail:
        result = backup(sb, sb.write_env(BACKUP_DIR=target, WAL_ARCHIVE_DIR=sb.wal_archive_dir, **mail.env()))
        messages = mail.wait(1)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert "BACKUP_DIR: %s is not writable by this user" % target in result.stderr
    assert len(messages) == 1 and "BACKUP_DIR" in messages[0]["body"]
    assert os.listdir(target) == []
    # A BACKUP_DIR that does not exist under a directory the user cannot write: "cannot create".
    nested = os.path.join(target, "sub")
    result = backup(sb, sb.write_env(BACKUP_DIR=nested, WAL_ARCHIVE_DIR=sb.wal_archive_dir))
    assert result.returncode == EXIT_CONFIG
    assert "BACKUP_DIR: cannot create %s: Permission denied" % nested in result.stderr


def test_kind_folder_owned_by_root_fails_the_stage_naming_it(sandbox):
    """After someone ran backup.py once as root, postgres/ may belong to root."""
    sb = sandbox
    folder = os.path.join(sb.backup_dir, "postgres")
    os.mkdir(folder, 0o755)
    result = backup(sb, sb.write_env())
    assert result.returncode == EXIT_FAILED
    row = faultkit.stage_line(result.stdout, "postgres")
    assert "FAILED" in row and "Permission denied" in row and folder in row, row


def test_log_file_owned_by_root_is_a_clean_error(sandbox):
    sb = sandbox
    env_path = sb.write_env()
    assert backup(sb, env_path).returncode == EXIT_OK
    for path in glob.glob(os.path.join(sb.backup_dir, "backup-*.log")):
        os.chown(path, 0, 0)  # as if root had run backup.py by hand today
    with MailServer() as mail:
        result = backup(sb, sb.write_env(**mail.env()))
        messages = mail.wait(1, timeout=1)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (EXIT_FAILED, EXIT_CONFIG)
    assert "backup-" in result.stdout + result.stderr and len(messages) == 1


# ------------------------------------------------------------------------------------------- timeouts

def _server_pids(sb):
    pid = sb.postmaster_pid()
    assert pid, "server not running"
    return list(faultkit.descendants(pid))


def _tool_pids(sb, comm):
    """Live processes named ``comm`` working on this sandbox's backups."""
    return [pid for pid in faultkit.procs_mentioning(sb.backup_dir)
            if (faultkit.proc_stat(pid) or {}).get("comm") == comm]


@pytest.mark.slow
def test_pg_basebackup_hanging_past_its_timeout_is_stopped_with_its_tree(sandbox):
    sb = sandbox
    sb.psql("CREATE TABLE big AS SELECT g, repeat(md5(g::text), 20) AS t FROM generate_series(1, 300000) g")
    env_path = sb.write_env(PG_BACKUP_TIMEOUT=5)
    run = faultkit.Run(sb, env_path)
    paused = []
    try:
        def streaming(run, procs):
            return faultkit.has_comm(procs, "pg_basebackup") and glob.glob(
                os.path.join(sb.backup_dir, "postgres", "base-*.partial", "*"))

        assert run.stop_when(streaming), run.output()[-3000:]
        tools = _tool_pids(sb, "pg_basebackup")
        assert tools
        paused = _server_pids(sb)  # the whole server hangs (a stuck disk, a frozen VM)
        for pid in paused:
            faultkit.signal_pid(pid, signal.SIGSTOP)
        run.thaw()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and [p for p in tools if faultkit.alive(p)]:
            time.sleep(0.1)
        left = [p for p in tools if faultkit.alive(p)]
        for pid in paused:
            faultkit.signal_pid(pid, signal.SIGCONT)
        paused = []
        assert not left, "pg_basebackup still running past its timeout: %s" % left
        code = run.wait(600)
    finally:
        for pid in paused:
            faultkit.signal_pid(pid, signal.SIGCONT)
        run.cleanup()
    output = run.output()
    assert code == EXIT_FAILED, output[-3000:]
    row = faultkit.stage_line(output, "postgres")
    assert "FAILED" in row and "pg_basebackup: timed out after 5 s" in row, row
    assert "stopping it and every process it started" in output
    assert not _tool_pids(sb, "pg_basebackup")
    assert not glob.glob(os.path.join(sb.backup_dir, "postgres", "base-*"))
    assert backup(sb, sb.write_env()).returncode == EXIT_OK  # the next run, without the short limit


@pytest.mark.slow
def test_rsync_hanging_past_its_timeout_is_stopped_with_its_tree(sandbox):
    sb = sandbox
    sb.add_content(1500, size=16 * 1024)
    env_path = sb.write_env(RSYNC_TIMEOUT=3)
    run = faultkit.Run(sb, env_path)
    try:
        def copying(run, procs):
            return faultkit.has_comm(procs, "rsync") and faultkit.count_files(
                (glob.glob(os.path.join(sb.backup_dir, "contentstore", "*.partial")) or ["/nonexistent"])[0]) > 0

        assert run.stop_when(copying), run.output()[-3000:]
        rsyncs = [pid for pid, info in run.frozen.items() if info["comm"] == "rsync"]
        # Everything resumes but rsync, which hangs (as on a dead NFS server).
        for pid, info in list(run.frozen.items()):
            if info["comm"] != "rsync":
                faultkit.signal_pid(pid, signal.SIGCONT)
        run.frozen = {}
        code = run.wait(600)
    finally:
        run.cleanup()
    output = run.output()
    assert code == EXIT_FAILED, output[-3000:]
    row = faultkit.stage_line(output, "contentstore")
    assert "FAILED" in row and "timed out after 3 s" in row, row
    assert not [p for p in rsyncs if faultkit.alive(p)], "rsync outlived its timeout"
    assert "OK" in faultkit.stage_line(output, "postgres")


# ------------------------------------------------------------------------------------------- concurrency

def test_two_runs_started_together_exactly_one_runs(sandbox):
    sb = sandbox
    sb.add_content(300)
    env_path = sb.write_env()
    runs = [faultkit.Run(sb, env_path), faultkit.Run(sb, env_path)]
    lock_path = os.path.join(sb.backup_dir, lock.LOCK_NAME)
    holder = None
    try:
        # Whichever takes the lock is held there until the other has given up, so they surely overlap.
        deadline = time.monotonic() + 120
        while holder is None and time.monotonic() < deadline:
            pid = lock.read_holder(lock_path) if os.path.exists(lock_path) else None
            holder = next((r for r in runs if r.pid == pid), None)
            if holder is None and all(r.proc.poll() is not None for r in runs):
                break
            time.sleep(0.005)
        assert holder is not None, [r.output()[-1000:] for r in runs]
        holder.freeze()
        other = runs[1] if holder is runs[0] else runs[0]
        other_code = other.wait(300)
        holder.thaw()
        holder_code = holder.wait(600)
    finally:
        for run in runs:
            run.cleanup()
    assert holder_code == EXIT_OK, holder.output()[-3000:]
    assert other_code == EXIT_LOCKED, other.output()[-3000:]
    # The PID may read "unknown" when the loser looked in the instant between the winner's flock and its PID
    # write (see test_lock_holder_pid_is_read_after_the_winner_wrote_it).
    named = re.search(r"another backup is running \(pid (\d+|unknown)\)", other.output())
    assert named, other.output()[-2000:]
    assert named.group(1) in (str(holder.pid), "unknown")
    assert len([e for e in faultkit.entries(sb, "postgres") if e.status == catalog.DONE]) == 1


def test_a_run_while_another_holds_the_lock_names_its_pid(sandbox):
    sb = sandbox
    env_path = sb.write_env()
    lock_path = os.path.join(sb.backup_dir, lock.LOCK_NAME)
    holder = faultkit.Run(sb, env_path)
    try:
        assert holder.stop_when(lambda run, procs: lock.read_holder(lock_path) == run.pid), holder.output()[-2000:]
        other = backup(sb, env_path)
        holder.thaw()
        code = holder.wait(600)
    finally:
        holder.cleanup()
    assert other.returncode == EXIT_LOCKED
    assert "another backup is running (pid %d)" % holder.pid in other.stderr
    assert code == EXIT_OK, holder.output()[-3000:]


def test_lock_holder_pid_is_read_after_the_winner_wrote_it(tmp_path):
    path = str(tmp_path / lock.LOCK_NAME)
    with open(path, "w") as winner:
        fcntl.flock(winner, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the winner, between flock() and writing its PID

        def write_pid():
            time.sleep(0.3)
            winner.write("%d\n" % os.getpid())
            winner.flush()

        writer = threading.Thread(target=write_pid)
        writer.start()
        try:
            with pytest.raises(lock.LockHeld) as held:
                lock.BackupLock(str(tmp_path)).acquire()
        finally:
            writer.join()
    assert held.value.pid == os.getpid(), str(held.value)


def test_restore_while_a_backup_runs_is_refused(sandbox):
    sb = sandbox
    if not os.path.isfile(os.path.join(sb.project_dir, "restore.py")):
        pytest.skip("restore.py not yet written")
    env_path = sb.write_env()
    assert backup(sb, env_path).returncode == EXIT_OK
    lock_path = os.path.join(sb.backup_dir, lock.LOCK_NAME)
    run = faultkit.Run(sb, env_path)
    try:
        assert run.stop_when(lambda run, procs: lock.read_holder(lock_path) == run.pid), run.output()[-2000:]
        refused = sb.run_cli("restore.py", args=["verify"], env_path=env_path, timeout=300)
        run.thaw()
        code = run.wait(600)
    finally:
        run.cleanup()
    assert refused.returncode == EXIT_LOCKED, refused.stdout[-2000:] + refused.stderr
    assert "another backup is running (pid %d)" % run.pid in refused.stderr
    assert code == EXIT_OK, run.output()[-3000:]
