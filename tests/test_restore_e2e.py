"""End to end: ``restore.py`` as a subprocess against real backups of a real PostgreSQL 15 sandbox.

Point in time (by time, restore-point name, immediate), database only, contentstore only, ``full`` in place
and its printed roll-back, and the restore drill passing and failing for each cause."""

import fcntl
import glob
import json
import os
import re
import time

import wal_chain
from sandbox import free_port

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED, EXIT_REFUSED = 0, 1, 2, 3, 4


def backup(sb, env):
    result = sb.run_cli("backup.py", env_path=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    time.sleep(1)  # backup names carry the second they started in
    return result


def restore(sb, env, *args, **kwargs):
    return sb.run_cli("restore.py", args=args, env_path=env, timeout=kwargs.get("timeout", 300),
                      input=kwargs.get("input"))


def switch_wal(sb):
    """Close the current WAL segment (as superuser) and wait until it is archived."""
    segment = sb.psql("SELECT pg_walfile_name(pg_switch_wal())", db="postgres", user="postgres")
    assert wal_chain.wait_for_file(sb.wal_archive_dir, segment, 60), segment
    return segment


def newest(sb, kind, prefix):
    return sorted(p for p in glob.glob(os.path.join(sb.backup_dir, kind, prefix + "-*")) if os.path.isdir(p))


def query(sb, socket_dir, port, sql):
    proc = sb.run_as_service_user([os.path.join(sb.pg_bin, "psql"), "-X", "-A", "-t", "-q", "-h", socket_dir, "-p",
                                   str(port), "-U", "alfresco", "-d", "alfresco", "-c", sql],
                                  extra_env={"PGPASSWORD": sb.alfresco_password})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def stop(sb, data_dir):
    if os.path.exists(os.path.join(data_dir, "postmaster.pid")):
        sb.run_as_service_user([os.path.join(sb.pg_bin, "pg_ctl"), "-D", data_dir, "-m", "immediate", "-w", "stop"])


def sockdir(sb, name):
    path = os.path.join(sb.root, name)
    os.mkdir(path, 0o700)
    sb.chown_to_service_user(path)
    return path


def files_under(root):
    result = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            result[os.path.relpath(full, root)] = os.path.getsize(full)
    return result


def test_point_in_time_by_time_name_and_immediate_into_empty_directories(sandbox):
    sb = sandbox
    env = sb.write_env()
    backup(sb, env)
    original = int(sb.psql("SELECT count(*) FROM alf_node"))
    sb.psql("INSERT INTO alf_node VALUES (9001, 'before', 1, 'x')")
    time.sleep(1)
    moment = sb.psql("SELECT clock_timestamp()")
    sb.psql("SELECT pg_create_restore_point('before-9002')")
    time.sleep(1)
    sb.psql("INSERT INTO alf_node VALUES (9002, 'after', 1, 'x')")
    switch_wal(sb)
    sockets = sockdir(sb, "sock")
    empty = os.path.join(sb.root, "existing-empty")
    os.mkdir(empty)
    sb.chown_to_service_user(empty)
    cases = [("by-time", ["--target-time", moment], "9001"), ("by-name", ["--target-name", "before-9002"], "9001"),
             (empty, ["--immediate"], "")]
    try:
        for name, target, expected in cases:
            dest = os.path.join(sb.root, name)
            port = free_port()
            result = restore(sb, env, "postgres", "--to", dest, "--start", "--port", port, "--socket-dir", sockets,
                             *target)
            assert result.returncode == EXIT_OK, result.stdout + result.stderr
            assert "Recovery finished in" in result.stdout and "could not confirm" not in result.stdout
            assert query(sb, sockets, port, "SELECT string_agg(id::text, ',') FROM alf_node WHERE id > 9000") \
                == expected, name
            assert int(query(sb, sockets, port, "SELECT count(*) FROM alf_node WHERE id < 9000")) == original
            assert query(sb, sockets, port, "SELECT pg_is_in_recovery()") == "f"
            assert query(sb, sockets, port, "SHOW archive_mode") == "off"
            assert os.stat(dest).st_mode & 0o777 == 0o700
            assert not os.path.exists(os.path.join(dest, "recovery.signal"))  # promoted
            stop(sb, dest)
        # Three promotions to timeline 2, none of them archived into the live archive.
        assert not [n for n in os.listdir(sb.wal_archive_dir) if n.startswith("00000002")]
        # Refusals change nothing: a non-empty directory, targets outside the recovery window.
        listing = sorted(os.listdir(os.path.join(sb.root, "by-time")))
        refused = restore(sb, env, "postgres", "--to", os.path.join(sb.root, "by-time"), "--immediate")
        assert refused.returncode == EXIT_REFUSED and "is not empty" in refused.stdout
        assert sorted(os.listdir(os.path.join(sb.root, "by-time"))) == listing
        early = restore(sb, env, "postgres", "--to", os.path.join(sb.root, "x1"), "--target-time", "2001-01-01 00:00Z")
        assert early.returncode == EXIT_REFUSED and "before the oldest complete base backup" in early.stdout
        late = restore(sb, env, "postgres", "--to", os.path.join(sb.root, "x2"), "--target-time", "2999-01-01 00:00Z")
        assert late.returncode == EXIT_REFUSED and "after the newest archived WAL" in late.stdout
        assert not os.path.exists(os.path.join(sb.root, "x1")) and not os.path.exists(os.path.join(sb.root, "x2"))
    finally:
        for name, _target, _expected in cases:
            stop(sb, os.path.join(sb.root, name))


def test_database_only_without_start_prints_how_to_start(sandbox):
    sb = sandbox
    env = sb.write_env()
    backup(sb, env)
    dest = os.path.join(sb.root, "plain")
    result = restore(sb, env, "postgres", "--to", dest)
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert "Start it with: " in result.stdout
    info = json.load(open(newest(sb, "postgres", "base")[-1] + ".json"))
    with open(os.path.join(dest, "postgresql.auto.conf")) as handle:
        auto = handle.read()
    assert "archive_mode = off" in auto
    old = info["server_version_num"] < 120000  # also runs against the version matrix (SANDBOX_PG_BIN)
    with open(os.path.join(dest, "recovery.conf" if old else "postgresql.auto.conf")) as handle:
        recovery = handle.read()
    assert "recovery_target_timeline = 'latest'" in recovery
    assert "restore_command = '\"/usr/bin/python3\" \"%s/wal.py\" archive-get" % sb.project_dir in recovery
    assert os.path.exists(os.path.join(dest, "recovery.signal")) != old
    assert os.path.exists(os.path.join(dest, "recovery.conf")) == old
    assert os.path.isfile(os.path.join(dest, "pg_wal", info["start_wal_file"]))


def test_contentstore_only_pairs_the_first_snapshot_at_or_after_the_point(sandbox):
    sb = sandbox
    env = sb.write_env()
    nothing = restore(sb, env, "verify")
    assert nothing.returncode == EXIT_FAILED and "no complete (DONE) base backup exists" in nothing.stdout
    helped = restore(sb, env, "--help")
    assert helped.returncode == 0 and "4 refused before changing anything" in helped.stdout
    backup(sb, env)
    added = sb.add_content(2, date=(2025, 6, 1, 2, 0))
    moment = sb.psql("SELECT clock_timestamp()")
    time.sleep(1)
    backup(sb, env)
    first, second = newest(sb, "contentstore", "contentstore")
    listing = json.loads(restore(sb, env, "list", "--json").stdout)
    bases = listing["backups"]["postgres"]
    assert [b["pairs_with"] for b in bases] == [os.path.basename(first), os.path.basename(second)]
    assert listing["window"]["from"] and listing["window"]["to"]

    dest = os.path.join(sb.root, "cs")
    result = restore(sb, env, "contentstore", "--to", dest, "--for-time", moment)
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert os.path.basename(second) in result.stdout
    assert files_under(dest) == files_under(second) == sb.content_files()
    assert all(rel in files_under(dest) for rel in added)

    old = os.path.join(sb.root, "cs-old")
    early = json.load(open(first + ".json"))["started_at"]
    assert restore(sb, env, "contentstore", "--to", old, "--for-time", early).returncode == EXIT_OK
    assert files_under(old) == files_under(first) and not any(rel in files_under(old) for rel in added)

    one = os.path.join(sb.root, "one-doc")
    url = "store://" + added[0]
    result = restore(sb, env, "contentstore", "--to", one, "--for-time", moment, "--url", url)
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert files_under(one) == {added[0]: os.path.getsize(os.path.join(second, added[0]))}

    assert restore(sb, env, "contentstore", "--to", dest, "--snapshot", os.path.basename(first)).returncode \
        == EXIT_REFUSED
    late = restore(sb, env, "contentstore", "--to", os.path.join(sb.root, "late"), "--for-time", "2999-01-01 00:00Z")
    assert late.returncode == EXIT_REFUSED and "no complete snapshot started at or after" in late.stdout


def rollback_block(stdout):
    match = re.search(r"# ---- roll-back commands ----\n(.*?)\n# ---- end of roll-back commands ----", stdout, re.S)
    assert match, stdout
    return match.group(1)


def test_full_in_place_and_the_printed_roll_back(sandbox):
    sb = sandbox
    env = sb.write_env()
    backup(sb, env)
    sb.run_as_service_user([os.path.join(sb.alf_base_dir, "alfresco.sh"), "start", "tomcat"])
    sb.psql("INSERT INTO alf_node VALUES (9001, 'kept', 1, 'x')")
    time.sleep(1)
    moment = sb.psql("SELECT clock_timestamp()")
    time.sleep(1)
    lost = sb.add_content(2, date=(2025, 7, 1, 1, 0))
    backup(sb, env)
    later = sb.add_content(1, date=(2025, 8, 1, 1, 0))  # after the last backup: only roll-back brings it back
    switch_wal(sb)
    before_rows = sb.psql("SELECT count(*) FROM alf_node")
    before_files = sb.content_files()

    unconfirmed = restore(sb, env, "full", "--target-time", moment, input="")
    assert unconfirmed.returncode == EXIT_REFUSED and "--yes" in unconfirmed.stdout
    assert sb.is_running() and sb.content_files() == before_files

    result = restore(sb, env, "full", "--target-time", moment, "--yes")
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert sb.is_running()
    assert sb.psql("SELECT string_agg(id::text, ',') FROM alf_node WHERE id > 9000") == "9001"
    assert not sb.psql("SELECT 1 FROM alf_content_url WHERE content_url = 'store://%s'" % lost[0])
    snapshot = newest(sb, "contentstore", "contentstore")[-1]
    assert sb.content_files() == files_under(snapshot)  # the paired snapshot: the second night's
    assert "Alfresco started" in result.stdout
    assert sb.psql("SHOW archive_mode") == "on"  # in place, the server is production and keeps archiving
    aside = glob.glob(sb.pgdata + ".before-restore-*") + glob.glob(sb.contentstore_dir + ".before-restore-*")
    assert len(aside) == 2
    assert glob.glob(os.path.join(sb.backup_dir, "restore-rollback-*.sh"))
    timeline_two = switch_wal(sb)
    assert timeline_two.startswith("00000002")

    block = rollback_block(result.stdout)
    undo = sb.run_as_service_user(["bash", "-e", "-c", block], timeout=300)
    assert undo.returncode == 0, undo.stdout + undo.stderr
    assert sb.is_running()
    assert sb.psql("SELECT count(*) FROM alf_node") == before_rows
    assert sb.psql("SELECT string_agg(id::text, ',') FROM alf_node WHERE id > 9000") == "9001"
    assert sb.content_files() == before_files and later[0] in before_files
    assert not [n for n in os.listdir(sb.wal_archive_dir) if n.startswith("00000002")]
    assert switch_wal(sb).startswith("00000001")
    status = json.loads(sb.run_cli("backup.py", args=["--status", "--json"], env_path=env).stdout)
    assert status["facts"]["chain"]["ok"], status["facts"]["chain"]

    # Latest state in place: the newest snapshot lacks the file added after it; the restore copies it from the
    # moved-aside contentstore (content files never change) instead of leaving a broken document.
    latest = restore(sb, env, "full", "--yes")
    assert latest.returncode == EXIT_OK, latest.stdout + latest.stderr
    assert "1 files newer than the snapshot were copied" in latest.stdout
    assert sb.psql("SELECT count(*) FROM alf_node") == before_rows
    assert sb.content_files() == before_files


def test_verify_passes_refuses_while_locked_and_runs_inside_a_held_lock(sandbox):
    sb = sandbox
    env = sb.write_env()
    backup(sb, env)
    good = restore(sb, env, "verify")
    assert good.returncode == EXIT_OK, good.stdout + good.stderr
    assert "Restore drill OK" in good.stdout and "alf_node 40" in good.stdout
    logs = "".join(open(p).read() for p in glob.glob(os.path.join(sb.backup_dir, "restore-*.log")))
    assert "Restore drill OK" in logs and sb.alfresco_password not in logs + good.stdout + good.stderr
    assert "40 store:// URLs checked, 0 missing" in good.stdout and "recovery" in good.stdout
    assert not glob.glob(os.path.join(sb.backup_dir, ".verify-*"))

    lock_path = os.path.join(sb.backup_dir, "backup.lock")
    with open(lock_path, "r+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.truncate(0)
        holder.write("%d\n" % os.getpid())
        holder.flush()
        locked = restore(sb, env, "verify")
    assert locked.returncode == EXIT_LOCKED
    assert "another backup is running (pid %d)" % os.getpid() in locked.stderr

    # What the nightly run does (VERIFY_AFTER_BACKUP): call verify_backup while it holds the lock.
    code = ("import sys, config, lock, restore_verify\n"
            "cfg = config.load_config(sys.argv[1])\n"
            "with lock.BackupLock(cfg.BACKUP_DIR):\n"
            "    r = restore_verify.verify_backup(cfg)\n"
            "print(r.ok, r.details['counts']['alf_node'])\n")
    nightly = sb.run_as_service_user([sb.python, "-c", code, env], cwd=sb.project_dir)
    assert nightly.stdout.strip().splitlines()[-1] == "True 40", nightly.stdout + nightly.stderr


def test_the_drills_throwaway_server_runs_without_fsync_and_a_restored_one_with_it(sandbox):
    sb = sandbox
    env = sb.write_env()
    backup(sb, env)
    # The drill's server, asked on the connection its checks use: a copy deleted afterwards needs no fsync.
    code = ("import sys, config, restore_verify\n"
            "cfg = config.load_config(sys.argv[1])\n"
            "seen, counts = [], restore_verify.sanity_counts\n"
            "def asking(conn):\n"
            "    with conn.cursor() as cur:\n"
            "        cur.execute('SHOW fsync')\n"
            "        seen.append(cur.fetchone()[0])\n"
            "    return counts(conn)\n"
            "restore_verify.sanity_counts = asking\n"
            "r = restore_verify.verify_backup(cfg)\n"
            "print(r.ok, seen)\n")
    drill = sb.run_as_service_user([sb.python, "-c", code, env], cwd=sb.project_dir)
    assert drill.stdout.strip().splitlines()[-1] == "True ['off']", drill.stdout + drill.stderr
    # A restore that is kept keeps PostgreSQL's fsync.
    sockets, port, dest = sockdir(sb, "sock"), free_port(), os.path.join(sb.root, "kept")
    try:
        result = restore(sb, env, "postgres", "--to", dest, "--start", "--port", port, "--socket-dir", sockets,
                         "--immediate")
        assert result.returncode == EXIT_OK, result.stdout + result.stderr
        assert query(sb, sockets, port, "SHOW fsync") == "on"
        assert "fsync" not in open(os.path.join(dest, "postgresql.auto.conf")).read()
    finally:
        stop(sb, dest)


def test_verify_fails_naming_a_missing_content_file(sandbox):
    sb = sandbox
    env = sb.write_env()
    backup(sb, env)
    snapshot = newest(sb, "contentstore", "contentstore")[-1]
    rel = sorted(files_under(snapshot))[3]
    os.unlink(os.path.join(snapshot, rel))
    result = restore(sb, env, "verify")
    assert result.returncode == EXIT_FAILED, result.stdout
    assert "Restore drill FAILED" in result.stdout
    assert "1 content files referenced by the database are missing" in result.stdout
    assert "store://" + rel in result.stdout
    assert not glob.glob(os.path.join(sb.backup_dir, ".verify-*"))


def test_verify_fails_naming_a_truncated_base_tar(sandbox):
    sb = sandbox
    env = sb.write_env()
    backup(sb, env)
    base = newest(sb, "postgres", "base")[-1]
    tar = [os.path.join(base, n) for n in os.listdir(base) if n.startswith("base.tar")][0]
    with open(tar, "r+b") as handle:
        handle.truncate(os.path.getsize(tar) // 2)
    result = restore(sb, env, "verify")
    assert result.returncode == EXIT_FAILED, result.stdout
    assert "is damaged" in result.stdout and os.path.basename(tar) in result.stdout
    assert "truncated" in result.stdout
    assert not glob.glob(os.path.join(sb.backup_dir, ".verify-*"))


def test_verify_fails_naming_a_wal_segment_missing_from_the_chain(sandbox):
    sb = sandbox
    env = sb.write_env()
    backup(sb, env)
    sb.psql("INSERT INTO alf_node VALUES (9001, 'a', 1, 'x')")
    gone = switch_wal(sb)
    sb.psql("INSERT INTO alf_node VALUES (9002, 'b', 1, 'x')")
    switch_wal(sb)
    os.unlink(os.path.join(sb.wal_archive_dir, gone))
    result = restore(sb, env, "verify")
    assert result.returncode == EXIT_FAILED, result.stdout
    assert "WAL segment %s is missing from the archive" % gone in result.stdout
    # The same gap makes a restore to the latest state refuse instead of stopping silently at it.
    refused = restore(sb, env, "postgres", "--to", os.path.join(sb.root, "gap"))
    assert refused.returncode == EXIT_REFUSED and "stop silently at the gap" in refused.stdout
