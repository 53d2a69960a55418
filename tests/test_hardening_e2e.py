"""Data that must never be lost (issue 10, points 6 to 10), end to end against a real PostgreSQL sandbox: WAL the
crashed server had not archived, stale recovery settings, restores against retention, a full disk that heals,
and what reaches the disk before a backup counts (traced with strace)."""

import fcntl
import json
import os
import re
import signal
import subprocess
import time

import catalog
import faultkit
import lock
import pytest

EXIT_OK, EXIT_FAILED = 0, 1
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (tmpfs mount, another user's processes)")


def backup(sb, env, expect=EXIT_OK, timeout=300):
    result = sb.run_cli("backup.py", env_path=env, timeout=timeout)
    assert result.returncode == expect, result.stdout[-4000:] + result.stderr
    time.sleep(1)  # backup names carry the second they started in
    return result


def restore(sb, env, *args, timeout=300):
    return sb.run_cli("restore.py", args=args, env_path=env, timeout=timeout)


def out(proc):
    return "exit %d\n%s\n%s" % (proc.returncode, proc.stdout[-5000:], proc.stderr[-2000:])


def ids(sb):
    return sb.psql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM alf_node WHERE id > 9000")


# ---- 6: restore full to the latest state after a crash -------------------------------------------------

def test_full_restore_after_a_crash_keeps_the_commits_that_were_never_archived(sandbox):
    sb = sandbox
    env = sb.write_env()
    backup(sb, env)
    # Archiving breaks (a full or unmounted archive disk); commits go on, segments pile up as .ready.
    sb.psql("ALTER SYSTEM SET archive_command = 'false'", user="postgres")
    sb.psql("SELECT pg_reload_conf()", user="postgres")
    sb.psql("INSERT INTO alf_node VALUES (9001, 'in-a-ready-segment', 1, 'x')")
    sb.psql("SELECT pg_switch_wal()", user="postgres")
    sb.psql("INSERT INTO alf_node VALUES (9002, 'in-another-ready-segment', 1, 'x')")
    sb.psql("SELECT pg_switch_wal()", user="postgres")
    # Committed durably (the sandbox runs synchronous_commit = off, which a crash may legitimately lose).
    sb.psql("SET synchronous_commit = on; INSERT INTO alf_node VALUES (9003, 'in-the-current-segment', 1, 'x')")
    status_dir = os.path.join(sb.pgdata, "pg_wal", "archive_status")
    ready = sorted(n[:-len(".ready")] for n in os.listdir(status_dir) if n.endswith(".ready"))
    assert len(ready) >= 2, ready
    assert not any(os.path.exists(os.path.join(sb.wal_archive_dir, n)) for n in ready)
    sb.stop(mode="immediate")  # the crash

    result = restore(sb, env, "full", "--yes", timeout=600)
    assert result.returncode == EXIT_OK, out(result)
    assert ids(sb) == "9001,9002,9003", out(result)
    assert "had not archived yet" in result.stdout
    for name in ready:  # archived now, as the old server would have: the archive keeps no gap
        assert any(os.path.exists(os.path.join(sb.wal_archive_dir, name + ext)) for ext in ("", ".gz")), name
    status = json.loads(sb.run_cli("backup.py", args=["--status", "--json"], env_path=env).stdout)
    assert status["facts"]["chain"]["ok"], status["facts"]["chain"]


# ---- 7: no stale recovery settings in production, never stacked --------------------------------------

def test_an_in_place_point_in_time_restore_leaves_no_recovery_settings_behind(sandbox):
    sb = sandbox
    env = sb.write_env()
    backup(sb, env)
    sb.psql("INSERT INTO alf_node VALUES (9001, 'kept', 1, 'x')")
    time.sleep(1.1)
    moment = sb.psql("SELECT clock_timestamp()")
    time.sleep(1.1)
    sb.psql("INSERT INTO alf_node VALUES (9002, 'undone', 1, 'x')")
    backup(sb, env)  # its snapshot pairs with the moment
    sb.psql("SELECT pg_walfile_name(pg_switch_wal())", user="postgres")
    result = restore(sb, env, "full", "--target-time", moment, "--yes", timeout=600)
    assert result.returncode == EXIT_OK, out(result)
    assert ids(sb) == "9001"
    with open(os.path.join(sb.pgdata, "postgresql.auto.conf")) as handle:
        auto = handle.read()
    assert "recovery_target" not in auto and "restore_command" not in auto, auto

    # Tonight's backup of the restored server, then the drill (immediate target) and a restore of it.
    backup(sb, env)
    drill = restore(sb, env, "verify", timeout=600)
    assert drill.returncode == EXIT_OK, out(drill)
    dest = os.path.join(sb.root, "again")
    sockets = os.path.join(sb.root, "again-run")
    os.mkdir(sockets, 0o700)
    sb.chown_to_service_user(sockets)
    again = restore(sb, env, "postgres", "--to", dest, "--immediate", "--start", "--port", str(sb.port + 1),
                    "--socket-dir", sockets, timeout=600)
    try:
        assert again.returncode == EXIT_OK, out(again)
        with open(os.path.join(dest, "postgresql.auto.conf")) as handle:
            text = handle.read()
        assert text.count("begin restore.py") == 1, text  # one block, never stacked
        assert "recovery_target" not in text, text  # removed once promoted
    finally:
        if os.path.exists(os.path.join(dest, "postmaster.pid")):
            sb.run_as_service_user([os.path.join(sb.pg_bin, "pg_ctl"), "-D", dest, "-m", "immediate", "-w", "stop"])


# ---- 8: a restore holds the backups against retention --------------------------------------------------

def _restore_lock_held(sb):
    """True while another process holds restore.lock (probed with flock directly: the file is the service
    user's, and lock.BackupLock, rightly, refuses another user's lock file)."""
    try:
        fd = os.open(os.path.join(sb.backup_dir, lock.RESTORE_LOCK_NAME), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_retention_never_deletes_what_a_running_restore_reads(sandbox):
    sb = sandbox
    env = sb.write_env(RETENTION_DAYS=0, RETENTION_MIN_COUNT=1)
    backup(sb, env)
    old = [e.name for e in catalog.done_backups(sb.backup_dir, "postgres")][0]
    dest = os.path.join(sb.root, "slow-restore")
    argv = [sb.python, os.path.join(sb.project_dir, "restore.py"), "--env", env, "postgres", "--to", dest,
            "--backup", old]
    proc = subprocess.Popen(argv, cwd=sb.root, user=sb.uid, group=sb.gid, extra_groups=[],
                            env={"PATH": "/usr/bin:/bin", "HOME": sb.home, "LANG": "C.UTF-8"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _restore_lock_held(sb):
            assert proc.poll() is None and time.monotonic() < deadline, "the restore never took restore.lock"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGSTOP)  # a restore that takes a while, frozen while it holds the lock
        night = backup(sb, env)
        line = faultkit.stage_line(night.stdout, "retention")
        assert "a restore is reading the backups" in line and "nothing is deleted" in line, line
        assert os.path.isdir(os.path.join(sb.backup_dir, "postgres", old))
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        output = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == EXIT_OK, output
    assert os.path.isfile(os.path.join(dest, "PG_VERSION"))
    # Once the restore is done, the next night's retention deletes the old backup as usual.
    backup(sb, env)
    assert not os.path.exists(os.path.join(sb.backup_dir, "postgres", old))


# ---- 9: a full disk heals itself ----------------------------------------------------------------------

@root_only
def test_after_a_no_space_night_retention_still_runs_and_the_next_night_succeeds(sandbox):
    sb = sandbox
    # Incompressible-ish database bulk, so that one base backup is most of what the disk holds.
    sb.psql("CREATE TABLE bulk AS SELECT g, md5(random()::text) || md5(random()::text) AS h "
            "FROM generate_series(1, 300000) g")
    backup_dir = os.path.join(sb.root, "small-disk")
    with faultkit.small_fs(backup_dir, 1 << 30, sb.uid, sb.gid):
        env = sb.write_env(BACKUP_DIR=backup_dir, WAL_ARCHIVE_DIR=sb.wal_archive_dir, RETENTION_DAYS=7,
                           PG_COMPRESSION="none")
        backup(sb, env)
        backup(sb, env)
        # Two old nights: the older one is past the window, the newer one is the newest of its kind.
        for kind in ("postgres", "contentstore", "config"):
            first, second = [e.name for e in catalog.done_backups(backup_dir, kind)]
            faultkit.age_backup(sb, kind, first, 20, backup_dir)
            faultkit.age_backup(sb, kind, second, 10, backup_dir)
        bases = catalog.done_backups(backup_dir, "postgres")
        older, newer = bases[0].info["size_bytes"], bases[1].info["size_bytes"]
        st = os.statvfs(backup_dir)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        need = int(newer * 1.25) + 64 * 1024
        # Too small for tonight, big enough once the oldest night is gone (see space.check's rule).
        size = int((need + used - older // 2) / 0.98)
        subprocess.run(["mount", "-o", "remount,size=%d" % size, backup_dir], check=True)

        full = backup(sb, env, expect=EXIT_FAILED)
        assert "not enough space in" in full.stdout
        line = faultkit.stage_line(full.stdout, "retention")
        assert " OK " in line or " WARN " in line, line
        freed = re.search(r"deleted (\d+) backups, \d+ WAL files; freed (\S+ \S+)", line)
        assert freed and int(freed.group(1)) >= 3 and freed.group(2) != "0 B", line
        for kind in ("postgres", "contentstore", "config"):
            assert len(catalog.done_backups(backup_dir, kind)) == 1, kind  # the newest of each kind stays

        healed = backup(sb, env)
        assert "Backup summary (OK)" in healed.stdout, out(healed)


# ---- 10: on disk before it counts -----------------------------------------------------------------------

TRACED = "fsync,fdatasync,syncfs,rename,renameat,renameat2"


def traced(sb, argv, trace_file, **kwargs):
    return sb.run_as_service_user(["strace", "-f", "-y", "-qq", "-e", "trace=" + TRACED, "-o", trace_file] + argv,
                                  **kwargs)


def _events(trace_file):
    with open(trace_file, encoding="utf-8", errors="replace") as handle:
        return [line.split(None, 1)[1] for line in handle if " = 0" in line and "resumed" not in line]


def _synced(event):
    match = re.match(r"(fsync|fdatasync|syncfs)\(\d+<([^>]*)>\)", event)
    return match and (match.group(1), match.group(2))


def _renamed(event):
    match = re.match(r'rename(?:at2?)?\((?:[^,]*, )?"([^"]+)", (?:[^,]*, )?"([^"]+)"', event)
    return match and (match.group(1), match.group(2))


@pytest.mark.skipif(not os.path.exists("/usr/bin/strace"), reason="needs strace")
def test_every_backup_reaches_the_disk_before_it_is_renamed_or_counted(sandbox):
    sb = sandbox
    env = sb.write_env()
    backup(sb, env)  # the first night copies with rsync; the second (traced) links and copies what is new
    sb.add_content(3, date=(2025, 9, 1, 1, 1))
    trace = os.path.join(sb.root, "backup.strace")
    night = traced(sb, [sb.python, os.path.join(sb.project_dir, "backup.py"), "--env", env], trace, timeout=300)
    assert night.returncode == EXIT_OK, out(night)
    events = _events(trace)
    for kind in catalog.KINDS:
        entry = catalog.done_backups(sb.backup_dir, kind)[-1]
        partial = entry.path + catalog.PARTIAL_SUFFIX
        renames = [i for i, e in enumerate(events) if _renamed(e) == (partial, entry.path)]
        assert renames, (kind, [e for e in events if "rename" in e][-5:])
        before = [_synced(e) for e in events[:renames[0]] if _synced(e)]
        synced_paths = {path for _call, path in before}
        if kind == "contentstore":
            assert any(call == "syncfs" and path.startswith(partial) for call, path in before) or \
                all(os.path.join(partial, rel) in synced_paths for rel in files_under(entry.path)), kind
        else:
            for rel in files_under(entry.path):
                assert os.path.join(partial, rel) in synced_paths, (kind, rel, sorted(synced_paths)[:20])
        # The metadata is written (and fsynced) before the rename, never after it as a DONE-looking last step.
        meta = catalog.info_path(entry.path)
        assert any(_renamed(e) == (meta + ".tmp", meta) for e in events[:renames[0]]), kind


def files_under(root):
    result = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            result.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(result)


@pytest.mark.skipif(not os.path.exists("/usr/bin/strace"), reason="needs strace")
def test_archive_push_of_an_identical_file_makes_it_durable_before_exit_0(sandbox, tmp_path):
    sb = sandbox
    segment = os.path.join(sb.root, "000000010000000000000042")
    with open(segment, "wb") as handle:
        handle.write(os.urandom(1 << 20))
    archive = os.path.join(sb.root, "archive")
    os.mkdir(archive, 0o700)
    sb.chown_to_service_user(sb.root)
    wal_py = os.path.join(sb.project_dir, "wal.py")
    first = sb.run_as_service_user(["/usr/bin/python3", wal_py, "archive-push", segment, archive])
    assert first.returncode == 0, first.stderr
    trace = os.path.join(sb.root, "push.strace")
    again = traced(sb, ["/usr/bin/python3", wal_py, "archive-push", segment, archive], trace)
    assert again.returncode == 0 and "identical" in again.stderr, again.stderr
    synced = {s for s in map(_synced, _events(trace)) if s}
    assert ("fsync", os.path.join(archive, "000000010000000000000042")) in synced, synced
    assert ("fsync", archive) in synced, synced
