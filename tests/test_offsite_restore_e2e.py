"""Disaster recovery from the off-site copy: BACKUP_DIR deleted, a fresh .env pointing at the remote, then
``restore.py ... --from offsite`` (point in time, contentstore, list, the off-site drill), also through an
rclone ``crypt`` remote. Real PostgreSQL, real ``rclone serve s3`` on loopback."""

import filecmp
import os
import shutil
import time

import pytest
import wal_chain
from sandbox import free_port

pytestmark = pytest.mark.slow


def ok(result):
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return result


def history(sb, env):
    """Two nights with a marker row between them; returns the time T between marker 9001 and 9002."""
    ok(sb.run_cli("backup.py", env_path=env, timeout=300))
    time.sleep(1)
    sb.psql("INSERT INTO alf_node VALUES (9001, 'kept', 1, 'x')")
    time.sleep(1)
    moment = sb.psql("SELECT clock_timestamp()")
    time.sleep(1)
    sb.psql("INSERT INTO alf_node VALUES (9002, 'later', 1, 'x')")
    sb.add_content(3, date=(2024, 7, 1, 8, 0))
    ok(sb.run_cli("backup.py", env_path=env, timeout=300))
    segment = sb.psql("SELECT pg_walfile_name(pg_switch_wal())", db="postgres", user="postgres")
    assert wal_chain.wait_for_file(sb.wal_archive_dir, segment, 60)
    ok(sb.run_cli("backup.py", ["--offsite"], env_path=env))
    return moment


def lose_the_server(sb, s3, **env):
    """Stop PostgreSQL, delete BACKUP_DIR; a fresh .env whose BACKUP_DIR does not exist yet."""
    sb.stop()
    shutil.rmtree(sb.backup_dir)
    return sb.write_env(path=os.path.join(sb.root, "newhost.env"), BACKUP_DIR=os.path.join(sb.root, "newbackups"),
                        **env)


def restore_at(sb, env, dest, *target):
    port = free_port()
    result = ok(sb.run_cli("restore.py", ["postgres", "--from", "offsite", "--to", dest, "--start", "--port", port]
                           + list(target), env_path=env, timeout=600))
    try:
        rows = sb.run_as_service_user([os.path.join(sb.pg_bin, "psql"), "-X", "-At", "-h", "127.0.0.1", "-p",
                                       str(port), "-U", "alfresco", "-d", "alfresco", "-c",
                                       "SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM alf_node "
                                       "WHERE id > 9000"], extra_env={"PGPASSWORD": sb.alfresco_password})
        return rows.stdout.strip(), result
    finally:
        sb.run_as_service_user([os.path.join(sb.pg_bin, "pg_ctl"), "-D", dest, "-m", "fast", "-w", "stop"])


def test_disaster_restore_from_offsite_to_a_point_in_time_and_drill(sandbox, s3):
    sb = sandbox
    moment = history(sb, sb.write_env(**s3.env()))
    live = sb.content_files()
    env = lose_the_server(sb, s3, **s3.env())
    listing = ok(sb.run_cli("restore.py", ["list", "--from", "offsite"], env_path=env))
    assert "Recovery window: any moment from" in listing.stdout and "pairs with contentstore-" in listing.stdout
    rows, _result = restore_at(sb, env, os.path.join(sb.root, "pitr"), "--target-time", moment)
    assert rows == "9001"
    dest = os.path.join(sb.root, "cs")
    ok(sb.run_cli("restore.py", ["contentstore", "--from", "offsite", "--to", dest, "--for-time", moment],
                  env_path=env))
    restored = {os.path.relpath(os.path.join(d, n), dest) for d, _s, names in os.walk(dest) for n in names}
    assert restored == set(live)
    assert all(filecmp.cmp(os.path.join(dest, r), os.path.join(sb.contentstore_dir, r), shallow=False) for r in live)
    drill = ok(sb.run_cli("restore.py", ["verify", "--from", "offsite"], env_path=env, timeout=600))
    assert "Restore drill OK" in drill.stdout and "sample: " in drill.stdout
    # One content object the database references disappears off-site: the drill fails and names it.
    victim = sorted(k for k in s3.objects() if k.startswith("content/"))[0]
    s3.delete(victim)
    failed = sb.run_cli("restore.py", ["verify", "--from", "offsite"], env_path=env, timeout=600)
    assert failed.returncode == 1, failed.stdout[-3000:]
    assert "store://" + victim[len("content/"):] in failed.stdout and "Restore drill FAILED" in failed.stdout


def test_an_encrypted_offsite_copy_restores_with_only_the_key_and_the_credentials(sandbox, s3):
    sb = sandbox
    remote = s3.env(remote="s3crypt:prod")
    moment = history(sb, sb.write_env(**remote))
    stored = s3.objects(prefix="crypt")
    assert len(stored) > 10 and not [k for k in stored if "content" in k or "base-" in k or k.endswith(".bin")]
    secret = open(os.path.join(sb.contentstore_dir, sorted(sb.content_files())[0]), "rb").read()[:64]
    assert not [k for k, path in stored.items() if secret in open(path, "rb").read()]
    env = lose_the_server(sb, s3, **remote)
    rows, _result = restore_at(sb, env, os.path.join(sb.root, "pitr"), "--target-time", moment)
    assert rows == "9001"
    drill = ok(sb.run_cli("restore.py", ["verify", "--from", "offsite"], env_path=env, timeout=600))
    assert "Restore drill OK" in drill.stdout
