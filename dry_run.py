"""``backup.py --dry-run``: what tonight's run would do, printed; nothing is changed or started."""

import datetime
import os

import alfresco_files
import btrfs_snapshot
import catalog
import contentstore
import postgres
import retention
import space
import subprocess_utils


class _PrintLog:
    """A logger stand-in that prints, for --dry-run."""

    def info(self, fmt, *args):
        print(fmt % args)


def print_plan(cfg, retention_only=False):
    """``backup.py --dry-run`` (or ``--retention-dry-run``, with ``retention_only``): print what a run would
    do, from the configuration, the server and the backups on disk; change nothing. Returns an exit code."""
    print("Configuration %s" % cfg.env_path)
    if not retention_only:
        env = subprocess_utils.base_env()
        server = None
        try:
            bin_dir = postgres.find_bin_dir(cfg.PG_BIN_DIR, cfg.ALF_BASE_DIR)
            tool, client_num = postgres.client_version(bin_dir, env)
            print("pg_basebackup: %s (PostgreSQL %s)" % (tool, postgres.version_label(client_num)))
            conn = postgres.connect(cfg)
            server = postgres.server_facts(conn)
            conn.close()
            plan = postgres.basebackup_plan(client_num, server["version_num"], cfg.PG_COMPRESSION, "label")
            print("would run: %s -D %s/postgres/base-<time>.partial %s" % (
                tool, cfg.BACKUP_DIR, " ".join(plan.args)))
            for note in plan.notes:
                print("note: %s" % note)
        except postgres.PostgresError as exc:
            print("PostgreSQL: %s" % exc)
        previous = catalog.newest_done(cfg.BACKUP_DIR, "contentstore")
        snapshots = catalog.kind_dir(cfg.BACKUP_DIR, "contentstore")
        on_btrfs = os.path.isdir(snapshots) and btrfs_snapshot.unsupported_reason(snapshots) is None
        engine = contentstore.choose_method(cfg.CONTENTSTORE_METHOD, previous is not None, on_btrfs)
        print("contentstore snapshot engine: %s%s" % (engine, ", link base %s" % previous.name if previous else
                                                      ", first copy (no complete snapshot yet)"))
        partial = os.path.join(snapshots, "contentstore-<time>.partial")
        if engine == "rsync" or previous is None:
            print("would run: %s%s" % (" ".join(contentstore.rsync_argv(
                cfg.contentstore_dir, partial, previous.path if previous else None)),
                "" if previous else " (one per month bucket, several at once)"))
        else:
            print("would compare %s with %s and hardlink unchanged files into %s%s" % (
                cfg.contentstore_dir, previous.path, partial,
                " (a writable btrfs snapshot of it)" if engine == "btrfs" else ""))
        print("would copy: %s" % ", ".join(os.path.join(cfg.ALF_BASE_DIR, rel)
                                           for _w, rel, _t in alfresco_files.ITEMS))
        print("would wait up to %d s for the backup's WAL in %s" % (cfg.WAL_WAIT_TIMEOUT, cfg.wal_archive_dir))
        if os.path.isdir(cfg.BACKUP_DIR):
            try:
                need = space.check(cfg.BACKUP_DIR, cfg.wal_archive_dir, cfg.contentstore_dir,
                                   server["cluster_size"] if server else 0, 16 << 20, _PrintLog())
                print("space: enough (database ~%s, contentstore ~%s)" % (
                    catalog.human_size(need["database"]), catalog.human_size(need["contentstore"])))
            except space.SpaceError as exc:
                print("space: %s" % exc)
    plan = retention.plan_retention(retention.collect(cfg.BACKUP_DIR), datetime.datetime.now(),
                                    cfg.RETENTION_DAYS, min_count=max(1, cfg.RETENTION_MIN_COUNT),
                                    lock_free=False)
    print("retention plan (%d days, keep at least %d):" % (cfg.RETENTION_DAYS, max(1, cfg.RETENTION_MIN_COUNT)))
    print(plan.format())
    return 0
