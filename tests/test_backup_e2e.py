"""End to end: ``backup.py`` as a subprocess against a real PostgreSQL laid out like an Alfresco bundle."""

import datetime
import fcntl
import glob
import json
import os
import subprocess
import time

import pytest
from mailserver import MailServer
from sandbox import free_port

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED = 0, 1, 2, 3


def run_backup(sb, env_path=None, args=(), timeout=300):
    env_path = env_path or sb.write_env()
    return sb.run_cli("backup.py", args=args, env_path=env_path, timeout=timeout)


def kind_dirs(sb, kind, prefix):
    folder = os.path.join(sb.backup_dir, kind)
    return sorted(p for p in glob.glob(os.path.join(folder, prefix + "-*")) if os.path.isdir(p))


def info(path):
    with open(path + ".json") as handle:
        return json.load(handle)


def inode(path):
    return os.stat(path).st_ino


def test_two_nights_make_restorable_linked_backups(sandbox):
    sb = sandbox
    env_path = sb.write_env(PG_COMPRESSION="gzip")  # so that plain `tar -tzf` lists it
    first = run_backup(sb, env_path)
    assert first.returncode == EXIT_OK, first.stdout + first.stderr
    assert "Backup summary (OK)" in first.stdout

    files = sb.content_files()
    unchanged, changed = sorted(files)[:2]
    with open(os.path.join(sb.contentstore_dir, changed), "ab") as handle:
        handle.write(b"changed tonight")
    added = sb.add_content(1, date=(2025, 1, 2, 3, 4))[0]
    time.sleep(1)
    second = run_backup(sb, env_path)
    assert second.returncode == EXIT_OK, second.stdout + second.stderr

    bases = kind_dirs(sb, "postgres", "base")
    snaps = kind_dirs(sb, "contentstore", "contentstore")
    configs = kind_dirs(sb, "config", "config")
    assert len(bases) == 2 and len(snaps) == 2 and len(configs) == 2
    assert not glob.glob(os.path.join(sb.backup_dir, "*", "*.partial"))

    # The base backup: DONE, readable by tar, backup_label naming the start WAL segment.
    meta = info(bases[-1])
    assert meta["status"] == "DONE"
    assert sorted(meta["files"]) == ["backup_manifest", "base.tar.gz", "pg_wal.tar.gz"]
    listing = subprocess.run(["tar", "-tzf", os.path.join(bases[-1], "base.tar.gz")], capture_output=True,
                             text=True, check=True).stdout.split()
    assert "backup_label" in listing
    label = subprocess.run(["tar", "-xzOf", os.path.join(bases[-1], "base.tar.gz"), "backup_label"],
                           capture_output=True, text=True, check=True).stdout
    assert "START WAL LOCATION" in label and meta["start_wal_file"] in label
    assert os.path.exists(os.path.join(sb.wal_archive_dir, meta["stop_wal_file"]))

    # The snapshots: unchanged files are the same inode, the changed one is a new copy, the new one is there.
    old, new = snaps
    assert inode(os.path.join(old, unchanged)) == inode(os.path.join(new, unchanged))
    assert inode(os.path.join(old, changed)) != inode(os.path.join(new, changed))
    with open(os.path.join(new, changed), "rb") as handle:
        assert handle.read().endswith(b"changed tonight")
    assert os.path.isfile(os.path.join(new, added)) and not os.path.exists(os.path.join(old, added))
    snap_meta = info(new)
    assert snap_meta["status"] == "DONE" and snap_meta["link_dest"] == os.path.basename(old)
    assert snap_meta["files_copied"] == 2

    # Keystore and configuration: private plain copies.
    cfg_dir = configs[-1]
    for rel in ("keystore/keystore", "alfresco-global.properties", "extension/custom-context.xml"):
        path = os.path.join(cfg_dir, rel)
        assert os.path.isfile(path), rel
        assert os.stat(path).st_mode & 0o077 == 0, rel
    assert os.stat(os.path.join(cfg_dir, "keystore")).st_mode & 0o777 == 0o700

    # Everything in BACKUP_DIR is private; the log exists; the password is nowhere in it.
    log_path = os.path.join(sb.backup_dir, "backup-%s.log" % datetime.date.today().isoformat())
    assert os.path.isfile(log_path)
    for top in ("postgres", "contentstore", "config", "pg_wal"):
        assert os.stat(os.path.join(sb.backup_dir, top)).st_mode & 0o077 == 0, top
    assert os.stat(log_path).st_mode & 0o777 == 0o600
    with open(log_path) as handle:
        log_text = handle.read()
    assert sb.alfresco_password not in log_text + first.stdout + second.stdout + first.stderr
    assert "pg_basebackup" in log_text and "rsync" in log_text

    # The WAL chain from the oldest kept backup is whole: --status agrees.
    status = sb.run_cli("backup.py", args=["--status", "--json"], env_path=sb.write_env())
    report = json.loads(status.stdout)
    assert report["facts"]["chain"]["ok"], report
    assert status.returncode == 0, status.stdout


def test_base_backup_starts_as_a_server(sandbox, tmp_path):
    """With the default compression (zstd, pg_wal.tar compressed too): extract with tar, start, count rows."""
    sb = sandbox
    result = run_backup(sb)
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    base = kind_dirs(sb, "postgres", "base")[-1]
    assert sorted(info(base)["files"]) == ["backup_manifest", "base.tar.zst", "pg_wal.tar.zst"]
    expected = sb.psql("SELECT count(*) FROM alf_node")
    restored = os.path.join(sb.root, "restored")
    sockets = os.path.join(sb.root, "restored-run")
    for path in (restored, sockets):
        os.mkdir(path, 0o700)
        sb.chown_to_service_user(path)
    for tar_name, target in (("base.tar.zst", restored), ("pg_wal.tar.zst", os.path.join(restored, "pg_wal"))):
        out = sb.run_as_service_user(["tar", "--zstd", "-xf", os.path.join(base, tar_name), "-C", target])
        assert out.returncode == 0, out.stderr
    port = free_port()
    pg_ctl = os.path.join(sb.pg_bin, "pg_ctl")
    options = "-p %d -k %s -c archive_mode=off -c listen_addresses=''" % (port, sockets)
    start = sb.run_as_service_user([pg_ctl, "-D", restored, "-o", options, "-w", "-t", "60", "-l",
                                    os.path.join(sb.root, "restored.log"), "start"])
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        count = sb.run_as_service_user(
            [os.path.join(sb.pg_bin, "psql"), "-X", "-A", "-t", "-h", sockets, "-p", str(port), "-U", "alfresco",
             "-d", "alfresco", "--no-password", "-c", "SELECT count(*) FROM alf_node"],
            extra_env={"PGPASSWORD": sb.alfresco_password})
        assert count.returncode == 0, count.stderr
        assert count.stdout.strip() == expected and int(expected) > 0
    finally:
        sb.run_as_service_user([pg_ctl, "-D", restored, "-m", "immediate", "-w", "stop"])


def test_postgres_down_fails_alerts_and_leaves_no_backup(sandbox):
    sb = sandbox
    sb.stop()
    with MailServer() as mail:
        result = run_backup(sb, sb.write_env(**mail.env()))
        messages = mail.wait(1)
    assert result.returncode == EXIT_FAILED, result.stdout
    assert len(messages) == 1
    msg = messages[0]
    assert "FAILED" in msg["subject"] and "postgres" in msg["subject"] + msg["body"]
    assert "cannot connect to PostgreSQL" in msg["body"]
    assert sb.alfresco_password not in msg["raw"]
    leftovers = [p for p in glob.glob(os.path.join(sb.backup_dir, "postgres", "base-*"))]
    assert not [p for p in leftovers if not p.endswith(".partial")], leftovers
    # The contentstore is still snapshotted: a database outage does not cost the content backup.
    assert len(kind_dirs(sb, "contentstore", "contentstore")) == 1


def test_lock_held_exits_at_once_and_writes_nothing(sandbox):
    sb = sandbox
    lock_path = os.path.join(sb.backup_dir, "backup.lock")
    open(lock_path, "a").close()
    sb.chown_to_service_user(lock_path)
    with open(lock_path, "r+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.truncate(0)
        holder.write("%d\n" % os.getpid())
        holder.flush()
        before = sorted(os.listdir(sb.backup_dir))
        started = time.monotonic()
        result = run_backup(sb)
        elapsed = time.monotonic() - started
    assert result.returncode == EXIT_LOCKED
    assert "another backup is running (pid %d)" % os.getpid() in result.stderr
    assert sorted(os.listdir(sb.backup_dir)) == before
    assert elapsed < 30


def test_bad_env_names_every_bad_key(sandbox):
    sb = sandbox
    env_path = sb.write_env(PGPORT="five", RETENTION_DAYS="-3", BACKUP_DIR="relative/dir", ALF_BASE_DIR=None,
                            SMTP_SECURITY="tls", ALERT_EMAIL="not-an-address")
    result = run_backup(sb, env_path)
    assert result.returncode == EXIT_CONFIG
    for key in ("PGPORT", "RETENTION_DAYS", "BACKUP_DIR", "ALF_BASE_DIR", "SMTP_SECURITY", "ALERT_EMAIL"):
        assert key in result.stderr, key
    assert not os.path.exists(os.path.join(sb.backup_dir, "postgres"))


def test_config_error_alerts_when_mail_settings_are_usable(sandbox):
    sb = sandbox
    with MailServer() as mail:
        env_path = sb.write_env(PGPORT="five", **mail.env())
        result = run_backup(sb, env_path)
        messages = mail.wait(1)
    assert result.returncode == EXIT_CONFIG
    assert len(messages) == 1 and "PGPORT" in messages[0]["body"]


@pytest.mark.skipif(os.geteuid() != 0, reason="reading other users' /proc/*/cmdline needs root")
def test_password_never_on_a_command_line(sandbox):
    sb = sandbox
    sb.add_content(300)  # a longer run, to be seen while it works
    env_path = sb.write_env()
    argv = [sb.python, os.path.join(sb.project_dir, "backup.py"), "--env", env_path]
    proc = subprocess.Popen(argv, cwd=sb.root, user=sb.uid, group=sb.gid, extra_groups=[],
                            env={"PATH": "/usr/bin:/bin", "HOME": sb.home, "LANG": "C.UTF-8"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen, secret = set(), sb.alfresco_password.encode()
    try:
        while proc.poll() is None:
            for path in glob.glob("/proc/[0-9]*/cmdline"):
                try:
                    with open(path, "rb") as handle:
                        cmdline = handle.read()
                except OSError:
                    continue
                if b"pg_basebackup" in cmdline or b"rsync" in cmdline or b"backup.py" in cmdline:
                    seen.add(cmdline.split(b"\0")[0])
                assert secret not in cmdline, cmdline
            time.sleep(0.01)
    finally:
        output = proc.communicate(timeout=300)[0]
    assert proc.returncode == EXIT_OK, output.decode()
    assert secret not in output
    assert any(b"python" in s for s in seen), seen


def test_dry_run_prints_the_commands_and_changes_nothing(sandbox):
    sb = sandbox
    before = sorted(os.listdir(sb.backup_dir))
    result = run_backup(sb, args=["--dry-run"])
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert "would run:" in result.stdout and "pg_basebackup" in result.stdout and "rsync" in result.stdout
    assert "-X stream" in result.stdout and "--link-dest" not in result.stdout
    assert sorted(os.listdir(sb.backup_dir)) == before
    assert sb.alfresco_password not in result.stdout


def test_help_documents_exit_codes(sandbox):
    result = sandbox.run_cli("backup.py", args=["--help"])
    assert result.returncode == 0
    assert "Exit codes" in result.stdout and "3 another backup" in result.stdout


def test_nightly_restore_drill_reports_in_the_mail(sandbox):
    sb = sandbox
    with MailServer() as mail:
        result = run_backup(sb, sb.write_env(VERIFY_AFTER_BACKUP="true", ALERT_ON="always", **mail.env()))
        messages = mail.wait(1)
    assert result.returncode == EXIT_OK, result.stdout
    assert "verify" in result.stdout and "Backup summary (OK)" in result.stdout
    assert len(messages) == 1 and "OK" in messages[0]["subject"]
    assert "Restore drill" in messages[0]["body"]
    assert not glob.glob(os.path.join(sb.backup_dir, ".verify-*"))  # the drill cleans up after itself
