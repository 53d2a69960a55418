#!/usr/bin/env python3
"""The nightly backup of an Alfresco server: ``python backup.py [--env PATH] [--dry-run]``.

Stages, in order: lock → WAL settings check → PostgreSQL base backup → contentstore snapshot → keystore
and configuration copy → WAL archive check (the base backup becomes DONE) → retention → summary and
alert. Exit codes: see EXIT_CODES (and the README). This is an entry point: modules raise, this file
catches, logs, alerts and chooses the exit code.
"""

import argparse
import datetime
import logging
import os
import sys
import time
import traceback

import catalog
import config
import email_alert
import lock
import metrics
import monitor
import offsite_cli
import runner
import safe_files
import status
import subprocess_utils

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED = 0, 1, 2, 3
EXIT_CODES = {
    EXIT_OK: "every stage succeeded (warnings allowed)",
    EXIT_FAILED: "a stage failed (details in the log and the alert mail)",
    EXIT_CONFIG: "configuration error (every bad key is named), or run as root",
    EXIT_LOCKED: "another backup (or restore) holds the lock; nothing was done",
}
LOG = logging.getLogger("backup")


def setup_logging(backup_dir, secrets, to_file=True):
    """Log to stdout and (unless ``to_file`` is False) ``BACKUP_DIR/backup-YYYY-MM-DD.log`` (0600).

    Returns the log file path or None.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    secret_filter = subprocess_utils.MaskingFilter(secrets)
    handlers = [logging.StreamHandler(sys.stdout)]
    path = None
    if to_file:
        path = os.path.join(backup_dir, "backup-%s.log" % datetime.date.today().isoformat())
        fd = safe_files.open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        handlers.append(logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8")))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.addFilter(secret_filter)
        root.addHandler(handler)
    return path


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Back up an Alfresco server: PostgreSQL base backup, contentstore snapshot, keystore and "
                    "configuration, WAL archive check, retention.",
        epilog="Exit codes: " + "; ".join("%d %s" % item for item in sorted(EXIT_CODES.items())),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", metavar="PATH", help="configuration file (default: .env next to backup.py)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print what would run; change nothing")
    mode.add_argument("--status", action="store_true",
                      help="report backups, WAL archive health and the recovery window; exit 0/1/2 = "
                           "OK/WARNING/CRITICAL (Nagios)")
    mode.add_argument("--check", action="store_true",
                      help="end-to-end archive check: settings, privileges, a WAL switch reaching the archive")
    mode.add_argument("--retention-dry-run", action="store_true", help="print the retention plan and exit")
    parser.add_argument("--json", action="store_true", help="with --status: machine-readable output")
    offsite = parser.add_mutually_exclusive_group()
    offsite.add_argument("--offsite", action="store_true",
                         help="ship everything pending (new WAL, new backups) to OFFSITE_REMOTE (cron, every 5 min)")
    offsite.add_argument("--offsite-audit", action="store_true",
                         help="list the off-site copy, compare it with the local record and re-ship what is missing "
                              "or corrupted")
    offsite.add_argument("--offsite-retention", action="store_true",
                         help="delete off-site sets older than OFFSITE_RETENTION_DAYS (reads only the remote; "
                              "with --dry-run: print the plan)")
    args = parser.parse_args(argv)
    if (args.offsite or args.offsite_audit or args.offsite_retention) and (
            args.status or args.check or args.retention_dry_run or (args.dry_run and not args.offsite_retention)):
        parser.error("--offsite, --offsite-audit and --offsite-retention go alone (--offsite-retention with "
                     "--dry-run)")
    return args


def config_error_exit(exc, env_path):
    """Report every configuration problem; alert and ping with the settings that are usable on their own
    (a .env that cannot be read gives neither). Returns the exit code."""
    sys.stderr.write("%s\n" % exc)
    try:
        raw = config.read_env_file(env_path)
    except config.ConfigError:
        return EXIT_CONFIG
    mail_cfg, mon_cfg = config.mail_config(raw), config.subset_config(raw, config.MONITOR_KEYS)[0]
    secrets = [raw[k] for k in config.SECRET_NAMES if raw.get(k)] + mon_cfg.secrets()
    logging.basicConfig(level=logging.INFO)
    if mail_cfg is not None:
        subject, body = email_alert.build_report(monitor.mail_host(mon_cfg), False, [
            {"name": "configuration", "status": "FAILED", "duration": 0, "detail": str(exc)}], error=str(exc))
        email_alert.notify(mail_cfg, False, subject, body, LOG, secrets=secrets)
    monitor.ping_once(mon_cfg, EXIT_CONFIG, str(exc), LOG, secrets=secrets)
    return EXIT_CONFIG


def ensure_backup_dir(path):
    """Create BACKUP_DIR (0700) if needed; refuse one that is not writable. Raises config.ConfigError."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise config.ConfigError([("BACKUP_DIR", "cannot create %s: %s" % (path, exc.strerror))])
    if not os.access(path, os.W_OK | os.X_OK):
        raise config.ConfigError([("BACKUP_DIR", "%s is not writable by this user (uid %d)"
                                   % (path, os.getuid()))])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    env_path = os.path.abspath(args.env or config.default_env_path())
    refusal = config.root_refusal(env_path, [os.path.abspath(__file__)] + list(argv))
    if refusal:
        sys.stderr.write(refusal + "\n")
        return EXIT_CONFIG
    if args.offsite_retention:  # reads only the remote: may run on another host with other credentials
        return offsite_cli.retention_main(env_path, args.dry_run)
    try:
        cfg = config.load_config(env_path)
        if args.offsite or args.offsite_audit:
            offsite_cli.require_remote(cfg)
        if not (args.dry_run or args.status or args.retention_dry_run):
            ensure_backup_dir(cfg.BACKUP_DIR)
    except config.ConfigError as exc:
        return config_error_exit(exc, env_path)
    os.umask(0o077)  # everything we write in BACKUP_DIR is private to the service user
    if args.status:
        setup_logging(cfg.BACKUP_DIR, cfg.secrets(), to_file=False)
        logging.getLogger().setLevel(logging.WARNING)
        return status.report(cfg, as_json=args.json, publish=lambda doc: metrics.publish(
            cfg, doc, lambda message: sys.stderr.write("warning: %s\n" % message)))
    if args.check:
        setup_logging(cfg.BACKUP_DIR, cfg.secrets())
        return status.check(cfg, LOG)
    if args.dry_run or args.retention_dry_run:
        setup_logging(cfg.BACKUP_DIR, cfg.secrets(), to_file=False)
        for key, message in cfg.warnings:
            LOG.warning("%s: %s", key, message)
        return runner.dry_run(cfg, retention_only=args.retention_dry_run)
    if args.offsite or args.offsite_audit:  # own locks (offsite.py): never waits for, nor blocks, the night
        try:
            log_path = setup_logging(cfg.BACKUP_DIR, cfg.secrets())
        except OSError as exc:
            return config_error_exit(config.ConfigError([("BACKUP_DIR", "cannot write the log: %s" % exc)]), env_path)
        return (offsite_cli.ship_main if args.offsite else offsite_cli.audit_main)(cfg, log_path)
    backup_lock = lock.BackupLock(cfg.BACKUP_DIR)
    try:
        backup_lock.acquire()
    except lock.LockHeld as exc:
        sys.stderr.write("%s\n" % exc)
        subject, body = email_alert.build_report(monitor.mail_host(cfg), False, [
            {"name": "lock", "status": "FAILED", "duration": 0, "detail": str(exc)}], error=str(exc))
        logging.basicConfig(level=logging.INFO)
        email_alert.notify(cfg, False, subject, body, LOG, secrets=cfg.secrets())
        monitor.ping_once(cfg, EXIT_LOCKED, str(exc), LOG, secrets=cfg.secrets())
        return EXIT_LOCKED
    except OSError as exc:
        return config_error_exit(config.ConfigError([("BACKUP_DIR", "cannot take the lock: %s" % exc)]),
                                 env_path)
    # Commands inherit the lock: one that outlives a killed run keeps the next run out until it ends.
    subprocess_utils.pass_to_children(backup_lock.fileno())
    try:
        try:
            log_path = setup_logging(cfg.BACKUP_DIR, cfg.secrets())
        except OSError as exc:
            return config_error_exit(config.ConfigError([("BACKUP_DIR", "cannot write the log file %s: %s; it "
                                                          "must belong to the user that runs the backups (chown)"
                                                          % (exc.filename, exc.strerror))], env_path), env_path)
        for key, message in cfg.warnings:
            LOG.warning("%s: %s", key, message)
        return run_backup(cfg, log_path)
    finally:
        backup_lock.release()


def run_backup(cfg, log_path):
    """Run every stage, print the summary, write the status files, send the alert and the pings. Returns the
    exit code."""
    started, started_at = time.monotonic(), catalog.utc_now_iso()
    pinger = monitor.Pinger(cfg, LOG, log_path, secrets=cfg.secrets())
    LOG.info("backup run started (pid %d, config %s, installation %s)", os.getpid(), cfg.env_path,
             cfg.installation_name)
    pinger.start()
    exit_code, why = EXIT_FAILED, "the run ended unexpectedly: see the log"
    try:
        night = runner.Night(cfg, LOG)
        try:
            night.run_all()
        except Exception as exc:  # a bug of ours must still end in a summary, an alert and a non-zero exit
            LOG.error("unexpected error: %s\n%s", exc, traceback.format_exc())
            night.record_unexpected(exc)
        summary = night.summary(time.monotonic() - started)
        for line in summary.splitlines():
            LOG.info(line)
        ok = night.ok
        failed = night.first_failure()
        exit_code, why = (EXIT_OK, "") if ok else (EXIT_FAILED, "failed stage %s: %s" % (failed.name, failed.error))
        metrics.publish_run(cfg, night, metrics.run_record(night, started_at, catalog.utc_now_iso(),
                                                           time.monotonic() - started, exit_code, log_path),
                            LOG.warning)
        subject, body = email_alert.build_report(
            monitor.mail_host(cfg), ok, night.stage_dicts(), error=failed.error if failed else None,
            tool_output_tail=failed.tool_output if failed else "", log_path=log_path,
            extra_sections=night.extra_sections())
        email_alert.notify(cfg, ok, subject, body, LOG, secrets=cfg.secrets())
    finally:
        pinger.finish(exit_code, why)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
