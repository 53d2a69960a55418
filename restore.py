#!/usr/bin/env python3
"""Restore an Alfresco server from the backups ``backup.py`` made: ``python restore.py [--env PATH] COMMAND``.

Commands: ``list`` (backups, pairs, recovery window), ``postgres`` (database into an empty directory, to any
point in the recovery window), ``contentstore`` (the snapshot that pairs with a database point),
``full`` (both, in place, with roll-back commands), ``verify`` (the restore drill). RESTORE.md explains every
scenario. This is an entry point: modules raise, this file catches, logs and chooses the exit code.
"""

import argparse
import datetime
import errno
import logging
import os
import sys

import catalog
import config
import lock
import postgres
import restore_db
import restore_list
import restore_plan
import restore_server
import restore_settings
import root_rule
import safe_files
import subprocess_utils

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED, EXIT_REFUSED = 0, 1, 2, 3, 4
EXIT_CODES = {
    EXIT_OK: "done (for verify: the drill passed)",
    EXIT_FAILED: "a restore step or a drill check failed (the output says which and why)",
    EXIT_CONFIG: "configuration or command-line error, or run as root",
    EXIT_LOCKED: "a backup (or another restore) holds the lock; nothing was done",
    EXIT_REFUSED: "refused before changing anything: target outside the recovery window, directory not empty, "
                  "no paired snapshot, not enough space, or not confirmed",
}
LOG = logging.getLogger("restore")
REPORT = logging.getLogger("restore.report")  # the log file only: what say() also prints plainly


def setup_logging(cfg, to_file):
    """INFO to stdout and, with ``to_file``, BACKUP_DIR/restore-YYYY-MM-DD.log (0600). Returns its path."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    handlers, path = [logging.StreamHandler(sys.stdout)], None
    if to_file:
        path = os.path.join(cfg.BACKUP_DIR, "restore-%s.log" % datetime.date.today().isoformat())
        fd = safe_files.open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        handlers.append(logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8")))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.addFilter(subprocess_utils.MaskingFilter(cfg.secrets()))
        root.addHandler(handler)
    REPORT.propagate = False
    for handler in list(REPORT.handlers):
        REPORT.removeHandler(handler)
    REPORT.addHandler(handlers[-1] if to_file else logging.NullHandler())
    return path


def say(text):
    """Print ``text`` for the person at the terminal and keep it in the log file."""
    print(text)
    sys.stdout.flush()
    for line in str(text).splitlines():
        REPORT.info("%s", line)


def add_target_options(parser, times_only=False):
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--target-time", metavar="T", help="recover to this moment ('YYYY-MM-DD HH:MM:SS' local "
                                                          "time, or with an offset such as +02:00)")
    if not times_only:
        group.add_argument("--target-name", metavar="N", help="recover to the restore point N "
                                                              "(pg_create_restore_point)")
        group.add_argument("--target-xid", metavar="X", help="recover up to transaction X")
        group.add_argument("--target-lsn", metavar="L", help="recover up to WAL location L (PostgreSQL 10+)")
        group.add_argument("--immediate", action="store_true",
                           help="stop as soon as the base backup is consistent (its end)")
        parser.add_argument("--timeline", default="latest",
                            help="recovery_target_timeline: latest (default, in every version), current or N")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds to wait for recovery (default 3600)")


def parse_args(argv):
    epilog = "Exit codes:\n" + "\n".join("  %d %s" % item for item in sorted(EXIT_CODES.items())) + \
        "\nEvery scenario, with the tool and by hand: RESTORE.md"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--env", metavar="PATH", default=argparse.SUPPRESS,
                        help="configuration file (default: .env next to backup.py)")
    common.add_argument("--from", dest="source", choices=("local", "offsite"), default=argparse.SUPPRESS,
                        help="where the backups are: local (BACKUP_DIR, the default) or offsite (OFFSITE_REMOTE)")
    common.add_argument("--staging", metavar="DIR", default=argparse.SUPPRESS,
                        help="with --from offsite: where downloads go (default BACKUP_DIR/offsite-restore)")
    parser = argparse.ArgumentParser(
        description="Restore an Alfresco server (database and contentstore) from the backups backup.py made.",
        epilog=epilog, parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     parser_class=lambda **kw: argparse.ArgumentParser(
                                         formatter_class=argparse.RawDescriptionHelpFormatter, **kw))
    commands.required = True
    cmd = commands.add_parser("list", parents=[common], help="backups, which snapshot pairs with which base "
                                                             "backup, the recovery window")
    cmd.add_argument("--json", action="store_true")
    cmd = commands.add_parser("postgres", parents=[common], epilog=epilog,
                              help="restore the database into an empty directory")
    cmd.add_argument("--to", required=True, metavar="DIR", help="empty or new directory")
    cmd.add_argument("--backup", metavar="ID", help="base backup name (default: chosen for the target)")
    add_target_options(cmd)
    cmd.add_argument("--keep-archiving", action="store_true",
                     help="leave the backup's archive settings on (only for a copy that becomes production)")
    cmd.add_argument("--port", type=int, help="port for the restored server")
    cmd.add_argument("--socket-dir", help="Unix socket directory for the restored server")
    cmd.add_argument("--start", action="store_true", help="start it (as this user) and wait until recovery ends")
    cmd = commands.add_parser("contentstore", parents=[common], epilog=epilog,
                              help="restore the contentstore snapshot that pairs with a database point")
    cmd.add_argument("--to", required=True, metavar="DIR", help="empty or new directory")
    which = cmd.add_mutually_exclusive_group()
    which.add_argument("--snapshot", metavar="ID", help="snapshot name")
    which.add_argument("--for-time", metavar="T", help="the database point in time it must cover")
    cmd.add_argument("--url", action="append", default=[], metavar="store://...",
                     help="copy only this content URL (repeatable): a single document")
    cmd = commands.add_parser("full", parents=[common], epilog=epilog,
                              help="in-place restore of database and contentstore (stops and starts Alfresco)")
    cmd.add_argument("--backup", metavar="ID")
    cmd.add_argument("--snapshot", metavar="ID", help="override the paired snapshot (knowingly)")
    add_target_options(cmd)
    cmd.add_argument("--with-config", action="store_true", help="also restore keystore and configuration")
    cmd.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    cmd.add_argument("--stop-timeout", type=int, default=300, help="seconds for alfresco.sh stop (default 300)")
    cmd.add_argument("--start-timeout", type=int, default=600, help="seconds for alfresco.sh start (default 600)")
    cmd = commands.add_parser("verify", parents=[common], epilog=epilog,
                              help="restore drill: restore into a scratch directory and check it")
    cmd.add_argument("--backup", metavar="ID", help="base backup name or latest (default)")
    add_target_options(cmd, times_only=True)
    return parser.parse_args(argv)


def target_of(args):
    return restore_plan.make_target(time=args.target_time, name=getattr(args, "target_name", None),
                                    xid=getattr(args, "target_xid", None), lsn=getattr(args, "target_lsn", None),
                                    immediate=getattr(args, "immediate", False))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    env_path = os.path.abspath(getattr(args, "env", None) or config.default_env_path())
    refusal = root_rule.root_refusal(env_path, [os.path.abspath(__file__)] + list(argv))
    if refusal:
        sys.stderr.write(refusal + "\n")
        return EXIT_CONFIG
    if getattr(args, "source", "local") == "offsite":  # a new host may have nothing but the .env
        import offsite_restore  # imported here: rclone and mail are not needed for a local restore

        return offsite_restore.run(env_path, args)
    try:
        cfg = config.load_config(env_path)
    except config.ConfigError as exc:
        sys.stderr.write("%s\n" % exc)
        return EXIT_CONFIG
    os.umask(0o077)
    try:
        if args.command == "list":
            setup_logging(cfg, to_file=False)
            logging.getLogger().setLevel(logging.WARNING)
            return cmd_list(cfg, args.json)
        # As root no log file: a root-owned file in BACKUP_DIR would break the service user's next run.
        setup_logging(cfg, to_file=os.geteuid() != 0 and os.access(cfg.BACKUP_DIR, os.W_OK))
        if args.command in ("postgres", "contentstore"):
            reading = reading_lock(cfg)
            if isinstance(reading, int):
                return reading
            try:
                return cmd_postgres(cfg, args) if args.command == "postgres" else cmd_contentstore(cfg, args)
            finally:
                if reading is not None:
                    reading.release()
        backup_lock = lock.BackupLock(cfg.BACKUP_DIR)
        try:
            backup_lock.acquire()
        except lock.LockHeld as exc:
            sys.stderr.write("%s\n" % exc)
            return EXIT_LOCKED
        try:
            return cmd_full(cfg, args) if args.command == "full" else cmd_verify(cfg, args)
        finally:
            backup_lock.release()
    except (restore_plan.PlanError, restore_db.Refused) as exc:
        LOG.error("refused: %s", exc)
        return EXIT_REFUSED
    except (restore_db.RestoreError, postgres.PostgresError, subprocess_utils.CommandError, OSError) as exc:
        LOG.error("FAILED: %s", exc)
        return EXIT_FAILED


def reading_lock(cfg):
    """The shared restore.lock, held while a restore reads the backups (retention takes it exclusively and
    skips a night instead of deleting the base backup or the WAL being replayed). Returns the held lock, None
    when BACKUP_DIR cannot hold a lock file (a read-only copy of the backup disk), or EXIT_LOCKED."""
    reading = lock.BackupLock(cfg.BACKUP_DIR, lock.RESTORE_LOCK_NAME, shared=True,
                              what="retention is deleting old backups")
    try:
        return reading.acquire()
    except lock.LockHeld as exc:
        sys.stderr.write("%s: try again when that run's retention has finished\n" % exc)
        return EXIT_LOCKED
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES):
            raise
        LOG.warning("cannot take %s (%s): make sure no backup run's retention deletes what this restore reads",
                    reading.path, exc.strerror)
        return None


# ---------------------------------------------------------------- list

def cmd_list(cfg, as_json):
    restore_list.show(cfg, as_json)
    return EXIT_OK


# ---------------------------------------------------------------- postgres

def cmd_postgres(cfg, args):
    target = target_of(args)
    dest = os.path.abspath(args.to)
    plan = restore_db.plan_database(cfg, target, args.backup, args.timeline)
    LOG.info("restoring base backup %s (PostgreSQL %s) into %s, recovering to %s", plan.base.name,
             plan.base.info.get("server_version"), dest, restore_plan.describe_target(target))
    for note in plan.notes:
        LOG.info("note: %s", note)
    port = args.port if args.port else (restore_server.free_port() if args.start else None)
    result = restore_db.restore_database(cfg, plan, dest, LOG, timeline=args.timeline,
                                         keep_archiving=args.keep_archiving, port=port, socket_dir=args.socket_dir)
    for line in result["warnings"]:
        LOG.warning("%s", line)
    for line in result["notes"]:
        LOG.info("%s", line)
    version = plan.base.info["server_version_num"]
    pg_ctl = restore_db.pg_tool(cfg, "pg_ctl", version)
    how = "recovery.conf" if restore_settings.uses_recovery_conf(version) else "recovery.signal + postgresql.auto.conf"
    say("Restored %s into %s (%s%s)." % (plan.base.name, dest, how,
                                          "; archiving stays ON" if args.keep_archiving else "; archive_mode = off"))
    if args.keep_archiving:
        LOG.warning("archiving stays on: once promoted this copy archives into %s, like production; only right "
                    "for a copy that replaces production", cfg.wal_archive_dir)
    log_file = os.path.join(dest, "restore-start.log")
    if not args.start:
        say("Start it with: %s -D %s -l %s start%s" % (pg_ctl, dest, log_file,
                                                      "" if port else "  (it uses the backup's port; see --port)"))
        return EXIT_OK
    server = restore_server.Server(pg_ctl, dest, log_file, LOG)
    server.start()
    sockets = [args.socket_dir] if args.socket_dir else socket_dirs(dest)
    conns = [restore_server.conn_settings(cfg, host, port) for host in sockets + ["127.0.0.1"]]
    seconds = restore_server.wait_promoted(conns, dest, args.timeout, log_file, server.log_offset)
    restore_db.clean_after_promotion(dest, keep_block=True, log=LOG)
    reached, line = server.outcome()
    if target.kind != "latest" and reached is not True:
        LOG.warning("could not confirm from %s that recovery stopped at the target %s", log_file, line)
    elif line:
        LOG.info("PostgreSQL: %s", line)
    say("Recovery finished in %.1f s; the restored server runs on port %d. Stop it with: %s -D %s stop"
        % (seconds, port, pg_ctl, dest))
    return EXIT_OK


def socket_dirs(data_dir):
    """The restored server's unix_socket_directories (the last setting in its config files), else /tmp."""
    value = None
    for name in ("postgresql.conf", "postgresql.auto.conf"):
        try:
            with open(os.path.join(data_dir, name), encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    parts = line.split("#", 1)[0].split("=", 1)
                    if len(parts) == 2 and parts[0].strip() in ("unix_socket_directories", "unix_socket_directory"):
                        value = parts[1].strip().strip("'")
        except OSError:
            continue
    dirs = [d.strip() for d in (value or "").split(",") if d.strip().startswith("/")]
    return dirs + ["/tmp", "/var/run/postgresql"]


# ---------------------------------------------------------------- contentstore

def cmd_contentstore(cfg, args):
    snapshots = catalog.list_backups(cfg.BACKUP_DIR, "contentstore")
    snapshot, warnings = restore_plan.snapshot_to_restore(snapshots, args.for_time, args.snapshot)
    for warning in warnings:
        LOG.warning("%s", warning)
    dest = os.path.abspath(args.to)
    rels = []
    for url in args.url:
        rel = restore_plan.content_relpath(url)
        if rel is None:
            raise restore_plan.PlanError("not a store:// content URL: %r" % url)
        if not os.path.isfile(os.path.join(snapshot.path, rel)):
            raise restore_db.RestoreError("%s is not in snapshot %s" % (url, snapshot.name))
        rels.append(rel)
    if not rels:
        restore_db.check_free_space(dest, int((snapshot.info.get("bytes_total") or 0) * 1.05), "the contentstore")
    restore_db.prepare_dir(dest)
    if rels:
        import shutil

        for rel in rels:
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(os.path.join(snapshot.path, rel), os.path.join(dest, rel))
        say("Copied %d file(s) from snapshot %s into %s: %s" % (len(rels), snapshot.name, dest, ", ".join(rels)))
        return EXIT_OK
    LOG.info("copying snapshot %s into %s", snapshot.name, dest)
    subprocess_utils.run(["rsync", "-a", "--numeric-ids", snapshot.path.rstrip("/") + "/", dest + "/"],
                         subprocess_utils.base_env(), what="copying the contentstore snapshot", log=LOG)
    os.chmod(dest, 0o700)
    say("Restored contentstore snapshot %s (started %s) into %s." % (
        snapshot.name, restore_plan.show_time(restore_plan.started_at(snapshot)), dest))
    return EXIT_OK


# ---------------------------------------------------------------- full and verify

def confirm(assume_yes):
    """True when the person at the terminal types yes (or --yes was given). Raises Refused without a terminal."""
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        raise restore_db.Refused("not confirmed: stdin is not a terminal; pass --yes to restore in place")
    return input("Type 'yes' to stop Alfresco and restore in place: ").strip().lower() == "yes"


def cmd_full(cfg, args):
    import restore_full

    plan = restore_full.plan_full(cfg, target_of(args), args.backup, args.snapshot, args.with_config,
                                  args.timeline)
    say(plan.describe())
    if not confirm(args.yes):
        raise restore_db.Refused("not confirmed; nothing was changed")
    ok, report, rollback = restore_full.run_full(plan, LOG, args.timeline, args.stop_timeout, args.start_timeout,
                                                 args.timeout)
    path = restore_full.save_rollback(cfg, plan.stamp, rollback)
    say("\n".join(report))
    say("To roll back (undo this restore), run these commands (also saved in %s):" % path)
    say("# ---- roll-back commands ----")
    say("\n".join(rollback))
    say("# ---- end of roll-back commands ----")
    return EXIT_OK if ok else EXIT_FAILED


def cmd_verify(cfg, args):
    import email_alert
    import mail_report
    import monitor
    import restore_verify

    result = restore_verify.verify_backup(cfg, args.backup, args.target_time, LOG, args.timeout)
    say(result.summary_text)
    stage = {"name": "verify", "status": "OK" if result.ok else "FAILED",
             "duration": result.details["timings"].get("total_s"),
             "detail": result.details["failures"][0] if result.details["failures"] else "restore drill"}
    subject, body = mail_report.build_report(monitor.mail_host(cfg), result.ok, [stage],
                                             extra_sections=[("Restore drill", result.summary_text)])
    email_alert.notify(cfg, result.ok, subject, body, LOG, secrets=cfg.secrets())
    return EXIT_OK if result.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
