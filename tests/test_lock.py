"""Tests for lock.py: flock on BACKUP_DIR/backup.lock, in this process and against real child processes."""

import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

import pytest

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT_DIR)

import lock  # noqa: E402
from lock import BackupLock, LockHeld  # noqa: E402

HOLDER = """
import sys, time
sys.path.insert(0, %r)
import lock
held = lock.BackupLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
""" % PROJECT_DIR


def start_holder(directory):
    """A child python process that takes the lock and sleeps; returns the Popen once it holds the lock."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, directory], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    line = proc.stdout.readline() if ready else b""
    if line.strip() != b"locked":
        proc.kill()
        raise AssertionError("holder did not lock: %r %r" % (line, proc.stderr.read()))
    return proc


def test_second_lock_in_same_process_is_refused_with_pid(tmp_path):
    first = BackupLock(str(tmp_path)).acquire()
    try:
        assert first.held
        with pytest.raises(LockHeld) as info:
            BackupLock(str(tmp_path)).acquire()
        assert info.value.pid == os.getpid()
        assert info.value.path == os.path.join(str(tmp_path), "backup.lock")
        assert str(os.getpid()) in str(info.value)
        assert lock.is_locked(str(tmp_path))
    finally:
        first.release()
    assert not first.held


def test_release_then_acquire_and_file_is_kept(tmp_path):
    path = os.path.join(str(tmp_path), lock.LOCK_NAME)
    first = BackupLock(str(tmp_path)).acquire()
    with open(path) as handle:
        assert handle.read() == "%d\n" % os.getpid()
    inode = os.stat(path).st_ino
    first.release()
    first.release()  # idempotent
    assert os.path.exists(path)
    assert os.stat(path).st_ino == inode
    assert lock.read_holder(path) is None  # emptied on release: nobody is blamed
    assert not lock.is_locked(str(tmp_path))
    second = BackupLock(str(tmp_path)).acquire()
    try:
        assert os.stat(path).st_ino == inode
        assert lock.read_holder(path) == os.getpid()
    finally:
        second.release()


def test_lock_file_is_private(tmp_path):
    old = os.umask(0)
    try:
        with BackupLock(str(tmp_path)):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(os.path.join(str(tmp_path), lock.LOCK_NAME)).st_mode) == 0o600


def test_context_manager_releases_on_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with BackupLock(str(tmp_path)) as held:
            assert held.held
            raise RuntimeError("boom")
    assert not lock.is_locked(str(tmp_path))


def test_stale_pid_in_file_does_not_block(tmp_path):
    # A file holding some PID but no flock (e.g. after a reboot) is free.
    path = os.path.join(str(tmp_path), lock.LOCK_NAME)
    with open(path, "w") as handle:
        handle.write("999999\n")
    with BackupLock(str(tmp_path)):
        assert lock.read_holder(path) == os.getpid()


def test_read_holder_garbage_and_missing(tmp_path):
    path = os.path.join(str(tmp_path), lock.LOCK_NAME)
    assert lock.read_holder(path) is None
    with open(path, "w") as handle:
        handle.write("not a pid")
    assert lock.read_holder(path) is None


def test_is_locked_missing_directory(tmp_path):
    assert lock.is_locked(str(tmp_path / "nope")) is False


def test_acquire_in_missing_directory_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        BackupLock(str(tmp_path / "nope")).acquire()


def test_child_holder_killed_with_sigkill_releases_the_lock(tmp_path):
    proc = start_holder(str(tmp_path))
    try:
        with pytest.raises(LockHeld) as info:
            BackupLock(str(tmp_path)).acquire()
        assert info.value.pid == proc.pid
        assert lock.is_locked(str(tmp_path))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    # The dead holder's PID is still in the file, but the kernel dropped its flock.
    assert lock.read_holder(os.path.join(str(tmp_path), lock.LOCK_NAME)) == proc.pid
    with BackupLock(str(tmp_path)) as held:
        assert held.held
        assert lock.read_holder(held.path) == os.getpid()


@pytest.fixture
def shared_dir():
    """A directory any user can enter (pytest's tmp_path is private to root)."""
    path = tempfile.mkdtemp(prefix="locktest-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


NOBODY_TRY = """
import sys
sys.path.insert(0, %r)
import lock
try:
    lock.BackupLock(sys.argv[1]).acquire()
    print("ACQUIRED")
except Exception as exc:
    print(type(exc).__name__, exc)
""" % PROJECT_DIR


def run_as_nobody(directory):
    def drop():
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    out = subprocess.run([sys.executable, "-c", NOBODY_TRY, directory], capture_output=True,
                         preexec_fn=drop, timeout=30, cwd="/")
    return out.stdout.decode() + out.stderr.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create another user's lock file")
def test_someone_elses_lock_file_gives_a_helpful_error(shared_dir):
    with BackupLock(shared_dir):
        pass  # root leaves a 0600 root-owned backup.lock behind
    output = run_as_nobody(shared_dir)
    assert "PermissionError" in output
    assert "chown" in output


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create another user's lock file")
def test_someone_elses_lock_file_is_not_usable(shared_dir):
    with BackupLock(shared_dir):
        pass
    output = run_as_nobody(shared_dir)
    assert output.startswith("PermissionError"), output
    assert "ACQUIRED" not in output
