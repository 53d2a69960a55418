"""Who may run what (issue 10, points 2 and 3): backup.py and restore.py refuse root before they read or write
anything; lock files are never followed through a symlink."""

import os
import subprocess
import sys

import lock
import pytest

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the rule is about runs as root")


@pytest.fixture
def planted(tmp_path, service_user):
    """A service user's .env that is a symlink to a root-only secret, in a directory the service user owns."""
    home = tmp_path / "svc"
    home.mkdir()
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$very-secret-hash:19000:0:99999:7:::\nPGUSER=x\n")
    os.chmod(secret, 0o600)
    env = home / ".env"
    os.symlink(str(secret), str(env))
    backups = home / "backups"
    backups.mkdir()
    for path in (home, backups):
        os.chown(str(path), service_user.uid, service_user.gid)
    os.lchown(str(env), service_user.uid, service_user.gid)
    return env, secret, backups


@root_only
@pytest.mark.parametrize("argv", [["backup.py"], ["backup.py", "--status"], ["backup.py", "--check"],
                                  ["restore.py", "list"], ["restore.py", "verify"],
                                  ["restore.py", "postgres", "--to", "/tmp/nowhere-restore"]])
def test_root_is_refused_before_anything_is_read_with_the_command_to_use(planted, service_user, argv):
    env, secret, backups = planted
    before = secret.read_bytes()
    proc = subprocess.run([sys.executable, os.path.join(PROJECT, argv[0]), "--env", str(env)] + argv[1:],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refusing to run as root" in proc.stderr
    assert "sudo -u %s " % service_user.name in proc.stderr
    assert "--env %s" % env in proc.stderr  # the same command, to paste
    # Nothing of the file the .env points at was read into the output, nothing was written anywhere.
    assert "very-secret-hash" not in proc.stdout + proc.stderr
    assert secret.read_bytes() == before
    assert os.listdir(str(backups)) == []
    assert not os.path.exists("/tmp/nowhere-restore")


def test_a_symlinked_lock_file_is_never_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    directory = tmp_path / "backups"
    directory.mkdir()
    for name in (lock.LOCK_NAME, lock.RESTORE_LOCK_NAME, lock.OFFSITE_LOCK_NAME):
        os.symlink(str(victim), str(directory / name))
        with pytest.raises(OSError, match="symbolic link"):
            lock.BackupLock(str(directory), name).acquire()
        assert lock.read_holder(str(directory / name)) is None
    assert victim.read_text() == "precious\n"


def test_a_lock_file_of_another_user_is_refused(tmp_path, service_user):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file of another user")
    path = tmp_path / lock.LOCK_NAME
    path.write_text("")
    os.chmod(str(path), 0o666)
    os.chown(str(path), service_user.uid, service_user.gid)
    with pytest.raises(PermissionError, match="belongs to another user|not writable by this user"):
        lock.BackupLock(str(tmp_path)).acquire()
    assert path.read_text() == ""


def test_shared_locks_coexist_and_exclude_an_exclusive_one(tmp_path):
    first = lock.BackupLock(str(tmp_path), lock.RESTORE_LOCK_NAME, shared=True).acquire()
    second = lock.BackupLock(str(tmp_path), lock.RESTORE_LOCK_NAME, shared=True).acquire()
    try:
        with pytest.raises(lock.LockHeld, match="a restore is reading the backups"):
            lock.BackupLock(str(tmp_path), lock.RESTORE_LOCK_NAME).acquire()
    finally:
        first.release()
        second.release()
    exclusive = lock.BackupLock(str(tmp_path), lock.RESTORE_LOCK_NAME).acquire()
    try:
        with pytest.raises(lock.LockHeld):
            lock.BackupLock(str(tmp_path), lock.RESTORE_LOCK_NAME, shared=True).acquire()
    finally:
        exclusive.release()


def test_recovery_files_are_never_written_through_a_planted_symlink(tmp_path):
    import restore_db
    import restore_settings

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    files = restore_settings.RecoveryFiles("restore_command = 'x'\n", "recovery.signal", "port = 5433\n")
    for name in ("postgresql.auto.conf", "recovery.signal", "recovery.conf"):
        data = tmp_path / ("data-" + name)
        data.mkdir()
        os.symlink(str(victim), str(data / name))
        with pytest.raises(OSError, match="symbolic link"):
            restore_db.write_recovery(str(data), files)
    assert victim.read_text() == "precious\n"
