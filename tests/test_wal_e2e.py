"""End to end: the WAL chain with a real server — completeness, --check, --status, retention over a month."""

import datetime
import glob
import json
import os
import shutil
import time

import wal
import wal_chain
from mailserver import MailServer

EXIT_OK, EXIT_FAILED = 0, 1


def backup(sb, env_path, args=()):
    return sb.run_cli("backup.py", args=args, env_path=env_path, timeout=300)


def metadata(sb, kind):
    paths = sorted(glob.glob(os.path.join(sb.backup_dir, kind, "*.json")))
    result = []
    for path in paths:
        with open(path) as handle:
            result.append(json.load(handle))
    return result


def test_backup_while_archiving_is_broken_ends_failed_and_alerts(sandbox_factory):
    sb = sandbox_factory(archive_command="/bin/false")
    with MailServer() as mail:
        result = backup(sb, sb.write_env(WAL_WAIT_TIMEOUT=5, **mail.env()))
        messages = mail.wait(1)
    assert result.returncode == EXIT_FAILED, result.stdout
    infos = metadata(sb, "postgres")
    assert [i["status"] for i in infos] == ["FAILED"]
    assert "archive_command is failing" in infos[0]["error"], infos[0]["error"]
    assert len(messages) == 1 and "wal_archive" in messages[0]["body"]
    assert "archive_command is failing" in messages[0]["body"]
    # Nothing FAILED is ever a restore source or counted by status.
    status = sb.run_cli("backup.py", args=["--status"], env_path=sb.write_env())
    assert status.returncode == 2 and "CRITICAL" in status.stdout


def test_check_passes_when_archiving_works(sandbox):
    sb = sandbox
    result = backup(sb, sb.write_env(), ["--check"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wal_archived" in result.stdout and "OK" in result.stdout


def test_check_fails_within_its_timeout_when_the_archive_is_not_writable(sandbox):
    sb = sandbox
    os.chmod(sb.wal_archive_dir, 0o500)
    try:
        started = time.monotonic()
        result = backup(sb, sb.write_env(WAL_WAIT_TIMEOUT=5), ["--check"])
        elapsed = time.monotonic() - started
    finally:
        os.chmod(sb.wal_archive_dir, 0o700)
    assert result.returncode == 1, result.stdout
    assert "did not reach" in result.stdout and "archive_command is failing" in result.stdout
    assert elapsed < 40


def test_old_cp_archive_command_keeps_working(sandbox_factory):
    sb = sandbox_factory(archive_command="test ! -f '{archive_dir}/%f' && cp %p '{archive_dir}/%f'")
    env_path = sb.write_env()
    assert backup(sb, env_path).returncode == EXIT_OK
    sb.add_content(2)
    result = backup(sb, env_path)
    assert result.returncode == EXIT_OK, result.stdout
    status = json.loads(backup(sb, env_path, ["--status", "--json"]).stdout)
    assert status["facts"]["chain"]["ok"] and status["window"], status


def _age(sb, kind_folder, name, days):
    """Rename a backup (directory + metadata) as if it had been taken ``days`` earlier."""
    prefix, stamp = name.split("-", 1)
    when = datetime.datetime.strptime(stamp, "%Y-%m-%d_%H-%M-%S") - datetime.timedelta(days=days)
    new = "%s-%s" % (prefix, when.strftime("%Y-%m-%d_%H-%M-%S"))
    folder = os.path.join(sb.backup_dir, kind_folder)
    os.rename(os.path.join(folder, name), os.path.join(folder, new))
    os.rename(os.path.join(folder, name + ".json"), os.path.join(folder, new + ".json"))
    return new


def test_retention_after_a_month_keeps_the_window_and_a_gapless_chain(sandbox):
    sb = sandbox
    env_path = sb.write_env(RETENTION_DAYS=7)
    ages = [28, 20, 12, 6, 2]  # five real nights, renamed to look this many days old
    for _night in ages:
        sb.add_content(1)
        assert backup(sb, env_path).returncode == EXIT_OK
        time.sleep(1)
    for kind_folder in ("postgres", "contentstore", "config"):
        names = sorted(n[:-5] for n in os.listdir(os.path.join(sb.backup_dir, kind_folder)) if n.endswith(".json"))
        assert len(names) == 5
        for name, days in zip(names, ages):
            _age(sb, kind_folder, name, days)
    dry = backup(sb, env_path, ["--retention-dry-run"])
    assert dry.returncode == 0 and dry.stdout.count("DELETE") >= 9, dry.stdout
    before_segments = wal_chain.archive_segments(sb.wal_archive_dir)

    tonight = backup(sb, env_path)
    assert tonight.returncode == EXIT_OK, tonight.stdout
    bases = metadata(sb, "postgres")
    # Kept: the two inside the 7-day window plus tonight's; the 12-, 20- and 28-day-old ones are gone.
    assert len(bases) == 3, [b["name"] for b in bases]
    kept_names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(sb.backup_dir, "postgres", "base-*"))
                        if not p.endswith(".json"))
    now = datetime.datetime.now()
    for name in kept_names:
        taken = datetime.datetime.strptime(name[len("base-"):], "%Y-%m-%d_%H-%M-%S")
        assert now - taken <= datetime.timedelta(days=7), name
    assert len(metadata(sb, "contentstore")) == 3 and len(metadata(sb, "config")) == 3
    # WAL older than the oldest kept base backup is gone, the rest is a gapless chain.
    oldest = min(kept_names)
    with open(os.path.join(sb.backup_dir, "postgres", oldest + ".json")) as handle:
        start = json.load(handle)["start_wal_file"]
    after = wal_chain.archive_segments(sb.wal_archive_dir)
    assert len(after) < len(before_segments)
    assert all(not wal.is_segment_name(s) or s >= start for s in after), (start, after)
    status = json.loads(backup(sb, env_path, ["--status", "--json"]).stdout)
    assert status["facts"]["chain"]["ok"], status["facts"]["chain"]
    assert status["state"] == "OK", status["reasons"]


def test_status_is_critical_without_backups_and_ok_after_one(sandbox):
    sb = sandbox
    env_path = sb.write_env()
    empty = backup(sb, env_path, ["--status"])
    assert empty.returncode == 2 and "no complete postgres backup" in empty.stdout
    assert backup(sb, env_path).returncode == EXIT_OK
    good = backup(sb, env_path, ["--status"])
    assert good.returncode == 0, good.stdout
    assert "you can restore to any moment from" in good.stdout


def test_status_warns_when_the_newest_wal_is_old(sandbox):
    sb = sandbox
    env_path = sb.write_env(WAL_MAX_AGE_HOURS=1)
    assert backup(sb, env_path).returncode == EXIT_OK
    old = time.time() - 3 * 3600
    for name in os.listdir(sb.wal_archive_dir):
        os.utime(os.path.join(sb.wal_archive_dir, name), (old, old))
    result = backup(sb, env_path, ["--status"])
    assert result.returncode == 1 and "WARNING" in result.stdout, result.stdout


def test_killed_archive_push_leaves_no_half_segment(sandbox):
    """PostgreSQL's own archiver, with the archive directory briefly unwritable: no temp or half file stays,
    and archiving catches up once it is writable again."""
    sb = sandbox
    os.chmod(sb.wal_archive_dir, 0o500)
    try:
        segment = sb.psql("SELECT pg_walfile_name(pg_switch_wal())", user="postgres",
                          password=sb.superuser_password)
        time.sleep(2)
        assert not os.path.exists(os.path.join(sb.wal_archive_dir, segment))
    finally:
        os.chmod(sb.wal_archive_dir, 0o700)
    # A new segment wakes the archiver at once instead of after its 60 s back-off.
    sb.psql("SELECT pg_create_restore_point('wake'); SELECT pg_switch_wal()", user="postgres",
            password=sb.superuser_password)
    assert wal_chain.wait_for_file(sb.wal_archive_dir, segment, 90)
    assert not [n for n in os.listdir(sb.wal_archive_dir) if n.startswith(".")]
    assert os.path.getsize(os.path.join(sb.wal_archive_dir, segment)) == 16 * 1024 * 1024
    shutil.rmtree(os.path.join(sb.backup_dir, "postgres"), ignore_errors=True)
