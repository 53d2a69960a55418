"""The off-site commands of ``backup.py``: ``--offsite`` (ship), ``--offsite-audit``, ``--offsite-retention``.

Entry-point glue only (logging, the alert mail, exit codes); the work is in offsite.py, offsite_audit.py and
offsite_retention.py. Exit codes: 0 nothing failed; 1 something failed (named in the log and the mail);
2 configuration error. A failing ``--offsite`` (every 5 minutes from cron) mails on the first failure after a
success, then at most every ALERT_REPEAT_HOURS while the same error goes on, and once when it works again.
"""

import datetime
import logging
import os
import sys
import time

import config
import email_alert
import monitor
import offsite_state
import rclone
import subprocess_utils

LOG = logging.getLogger("offsite")
ALERT_REPEAT_HOURS = 6
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def require_remote(cfg):
    """Raise ConfigError when no off-site copy is configured."""
    if not getattr(cfg, "OFFSITE_REMOTE", ""):
        raise config.ConfigError([("OFFSITE_REMOTE", "is not set: there is no off-site copy (see the README, "
                                                     "Off-site copy)")], cfg.env_path)


def _stage(name, ok, seconds, detail, size=None):
    return {"name": name, "status": "OK" if ok else "FAILED", "duration": seconds, "size": size, "detail": detail}


def _should_mail(state, ok, error):
    """Throttle for a command cron runs every few minutes: (send?, reason)."""
    last_error, last_at = state.meta("alert_error"), state.meta("alert_at")
    now = time.time()
    if ok:
        if last_error:
            state.set_meta("alert_error", "")
            return True, "recovered"
        return False, None
    if last_error != error or not last_at or now - float(last_at) > ALERT_REPEAT_HOURS * 3600:
        state.set_meta("alert_error", error)
        state.set_meta("alert_at", str(now))
        return True, "failure"
    return False, None


def ship_main(cfg, log_path):
    """``backup.py --offsite``. Returns the exit code."""
    import offsite  # late: only the off-site commands need it

    started = time.monotonic()
    LOG.info("off-site shipping to %s started (pid %d)", cfg.OFFSITE_REMOTE, os.getpid())
    try:
        job = offsite.ship(cfg, LOG)
    except (rclone.RcloneError, offsite_state.StateError, OSError) as exc:
        return _report(cfg, "offsite", False, started, [str(exc)], [], [], 0, 0, log_path)
    return _report(cfg, "offsite", not job.failures, started, job.failures, job.notes, job.completed, job.files,
                   job.bytes, log_path)


def audit_main(cfg, log_path):
    """``backup.py --offsite-audit``: list the remote, compare with the record and re-ship. Exit code."""
    import offsite_audit

    started = time.monotonic()
    try:
        report = offsite_audit.audit(cfg, LOG)
    except (rclone.RcloneError, offsite_state.StateError, OSError) as exc:
        return _report(cfg, "offsite_audit", False, started, [str(exc)], [], [], 0, 0, log_path, throttle=False)
    return _report(cfg, "offsite_audit", not report["failures"], started, report["failures"], report["notes"],
                   report["lines"], report["files"], report["bytes"], log_path, throttle=False)


def _report(cfg, name, ok, started, failures, notes, completed, files, size, log_path, throttle=True):
    seconds = time.monotonic() - started
    for note in notes:
        LOG.warning("%s", note)
    detail = "%d files (%s) sent%s" % (files, catalog_size(size), "; complete off-site now: " + ", ".join(completed)
                                       if completed else "")
    LOG.info("%s %s in %.1f s: %s", name, "OK" if ok else "FAILED", seconds, detail)
    for failure in failures:
        LOG.error("%s", failure)
    error = "\n".join(failures[:20]) + ("\n(and %d more)" % (len(failures) - 20) if len(failures) > 20 else "")
    always = getattr(cfg, "ALERT_ON", "failure") == "always"
    send, recovered = not ok or always, False
    if throttle and os.path.isfile(offsite_state.path_of(cfg.BACKUP_DIR)):
        try:
            with offsite_state.State(cfg.BACKUP_DIR, cfg.OFFSITE_REMOTE) as state:
                wanted, why = _should_mail(state, ok, failures[0] if failures else "")
        except Exception:  # noqa: BLE001 - a broken record must not keep the alert from going out
            wanted, why = True, "failure"
        recovered = why == "recovered"
        send = wanted if not ok else (recovered or (always and bool(completed)))
        if recovered:
            notes = notes + ["the off-site copy works again"]
    if send:
        subject, body = email_alert.build_report(
            monitor.mail_host(cfg), ok, [_stage(name, ok, seconds, failures[0] if failures else detail, size)],
            error=error or None, log_path=log_path,
            extra_sections=[("Off-site copy", "Remote: %s\n%s" % (cfg.OFFSITE_REMOTE, detail))] +
            ([("Notes", "\n".join(notes))] if notes else []))
        # A recovery notice goes out like a failure would (ALERT_ON=failure), since the failure was mailed.
        email_alert.notify(cfg, ok and not recovered, subject, body, LOG, secrets=cfg.secrets())
    return EXIT_OK if ok else EXIT_FAILED


def catalog_size(size):
    import catalog

    return catalog.human_size(size)


def remote_config(env_path, optional=("PGUSER", "ALF_BASE_DIR", "BACKUP_DIR")):
    """A Config for commands that read only the remote (retention on another host, a restore on a new one):
    the ``optional`` keys, which need a local installation, may be missing there. Raises ConfigError."""
    raw = config.read_env_file(env_path)
    for key, filler in (("PGUSER", "-"), ("ALF_BASE_DIR", "/"), ("BACKUP_DIR", "/nonexistent")):
        if key in optional and not (raw.get(key) or "").strip():
            raw[key] = filler
    cfg = config.validate(raw, env_path, check_paths=False)
    if cfg.OFFSITE_REMOTE and cfg.OFFSITE_RCLONE_CONFIG and not os.path.isfile(cfg.OFFSITE_RCLONE_CONFIG):
        raise config.ConfigError([("OFFSITE_RCLONE_CONFIG", "file does not exist: %s" % cfg.OFFSITE_RCLONE_CONFIG)],
                                 env_path)
    return cfg


def retention_main(env_path, dry_run):
    """``backup.py --offsite-retention [--dry-run]``: reads only the remote. Returns the exit code."""
    import offsite_retention

    try:
        cfg = remote_config(env_path)
        require_remote(cfg)
    except config.ConfigError as exc:
        sys.stderr.write("%s\n" % exc)
        return EXIT_CONFIG
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Mask(cfg.secrets()))
    started = time.monotonic()
    try:
        remote = rclone.Remote(cfg, LOG)
        remote_catalog, manifests = offsite_retention.read_remote(remote)
        plan = offsite_retention.plan(remote_catalog, datetime.datetime.now(), cfg.OFFSITE_RETENTION_DAYS,
                                      max(1, cfg.OFFSITE_RETENTION_MIN_COUNT), manifests)
        print(plan.format())
        if dry_run:
            return EXIT_OK
        failures = offsite_retention.apply(remote, plan, LOG)
    except rclone.RcloneError as exc:
        failures = [str(exc)]
    ok = not failures
    for failure in failures:
        LOG.error("%s", failure)
    subject, body = email_alert.build_report(monitor.mail_host(cfg), ok, [_stage(
        "offsite_retention", ok, time.monotonic() - started, failures[0] if failures else "off-site retention")],
        error="\n".join(failures) or None)
    email_alert.notify(cfg, ok, subject, body, LOG, secrets=cfg.secrets())
    return EXIT_OK if ok else EXIT_FAILED


class _Mask(logging.Filter):
    def __init__(self, secrets):
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record):
        if self.secrets:
            record.msg, record.args = subprocess_utils.mask(record.getMessage(), self.secrets), None
        return True
