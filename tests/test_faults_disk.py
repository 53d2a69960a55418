"""Disk full, for real: BACKUP_DIR on a small tmpfs mounted by the test (root only)."""

import glob
import logging
import os
import subprocess

import base_backup
import catalog
import config
import contentstore
import faultkit
import postgres
import pytest
from mailserver import MailServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


small_fs = faultkit.small_fs


def remount(path, size):
    subprocess.run(["mount", "-o", "remount,size=%s" % size, path], check=True)


def test_not_enough_space_is_refused_early_with_the_numbers_then_recovers(sandbox):
    sb = sandbox
    sb.add_content(20, size=200 * 1024)  # ~4 MB more content
    backup_dir = os.path.join(sb.root, "small-backups")
    with small_fs(backup_dir, "2m", sb.uid, sb.gid):
        archive = os.path.join(sb.root, "wal-archive")
        os.mkdir(archive, 0o700)
        sb.chown_to_service_user(archive)
        with MailServer() as mail:
            env_path = sb.write_env(BACKUP_DIR=backup_dir, WAL_ARCHIVE_DIR=sb.wal_archive_dir, **mail.env())
            result = sb.run_cli("backup.py", env_path=env_path, timeout=300)
            messages = mail.wait(1)
        assert result.returncode == 1, result.stdout
        assert "not enough space in %s" % backup_dir in result.stdout
        assert "free" in result.stdout and "contentstore ~" in result.stdout
        assert len(messages) == 1 and "not enough space" in messages[0]["body"]
        assert not glob.glob(os.path.join(backup_dir, "postgres", "*"))
        assert not glob.glob(os.path.join(backup_dir, "contentstore", "*"))

        remount(backup_dir, "200m")
        again = sb.run_cli("backup.py", env_path=env_path, timeout=300)
        assert again.returncode == 0, again.stdout
        assert len(catalog.done_backups(backup_dir, "contentstore")) == 1


def cfg_for(sb, backup_dir):
    values = {"PGHOST": sb.socket_dir, "PGPORT": str(sb.port), "PGUSER": "alfresco",
              "PGPASSWORD": sb.alfresco_password, "BACKUP_DIR": backup_dir, "ALF_BASE_DIR": sb.alf_base_dir,
              "PG_COMPRESSION": "none"}
    return config.validate(values)


def test_disk_filling_during_the_copies_fails_cleanly_and_keeps_earlier_backups(sandbox, tmp_path):
    """The stages themselves (no estimate in front): a full disk mid-copy names the path, removes the
    partial, and leaves the earlier, complete backups alone."""
    sb = sandbox
    log = logging.getLogger("test")
    backup_dir = str(tmp_path / "fs")
    with small_fs(backup_dir, "60m", 0, 0):
        cfg = cfg_for(sb, backup_dir)
        conn = postgres.connect(cfg)
        server = postgres.server_facts(conn)
        conn.close()
        first = base_backup.take_base_backup(cfg, server, os.path.join(backup_dir, "postgres"),
                                          "base-2024-01-01_02-00-00", log)
        snap = contentstore.take_snapshot(sb.contentstore_dir, backup_dir, "contentstore-2024-01-01_02-00-01", log)
        # Fill the disk almost completely, then grow the database and the store.
        filler = os.path.join(backup_dir, "filler")
        subprocess.run(["dd", "if=/dev/zero", "of=" + filler, "bs=1M", "count=100"], capture_output=True)
        sb.psql("CREATE TABLE bulk AS SELECT g, md5(g::text) AS h FROM generate_series(1, 100000) g")
        sb.add_content(5, date=(2025, 2, 2, 2, 2), size=512 * 1024)
        with pytest.raises(postgres.PostgresError) as db_error:
            base_backup.take_base_backup(cfg, server, os.path.join(backup_dir, "postgres"),
                                      "base-2024-01-02_02-00-00", log)
        assert "no space left on device in %s" % os.path.join(backup_dir, "postgres") in str(db_error.value)
        with pytest.raises(contentstore.ContentstoreError) as cs_error:
            contentstore.take_snapshot(sb.contentstore_dir, backup_dir, "contentstore-2024-01-02_02-00-01", log)
        assert "no space left" in str(cs_error.value) and backup_dir in str(cs_error.value)
        assert not glob.glob(os.path.join(backup_dir, "*", "*.partial"))
        names = [e.name for e in catalog.done_backups(backup_dir, "postgres")]
        assert names == [first["name"]] or names == []  # the first one is WAITING_FOR_WAL, never touched
        assert os.path.isdir(os.path.join(backup_dir, "postgres", first["name"]))
        assert [e.name for e in catalog.done_backups(backup_dir, "contentstore")] == [snap["name"]]
        os.remove(filler)
