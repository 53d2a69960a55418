"""One night's run as a list of stages, each recorded with its status, duration, size and error.

A failing stage is recorded with what it was doing; later stages still run where that is safe (the
contentstore is snapshotted even when the database backup failed; retention is skipped after any failed
backup stage, so a week of failures never thins out the good backups).
"""

import datetime
import os
import time
import traceback

import alfresco_files
import base_backup
import catalog
import contentstore
import lock
import offsite_status
import postgres
import retention
import space
import status
import subprocess_utils
import wal_chain
import wal_config_check

OK, WARN, FAILED, SKIPPED = "OK", "WARN", "FAILED", "SKIPPED"
EXPECTED_ERRORS = (postgres.PostgresError, contentstore.ContentstoreError, alfresco_files.ConfigCopyError,
                   space.SpaceError, subprocess_utils.CommandError, OSError)


class Stage:
    """Result of one stage: ``name``, ``doing`` (what it was doing), ``status``, ``duration``, ``size``,
    ``detail``, ``error``, ``tool_output`` (tail of the failing tool's stderr)."""

    def __init__(self, name, doing):
        self.name = name
        self.doing = doing
        self.status = SKIPPED
        self.duration = 0.0
        self.size = None
        self.detail = ""
        self.error = None
        self.tool_output = ""
        self.no_space = False  # failed for lack of space: retention still runs, to free some

    def as_dict(self):
        return {"name": self.name, "status": self.status, "duration": self.duration, "size": self.size,
                "detail": self.error or self.detail}


def _name_time():
    return datetime.datetime.now().replace(microsecond=0)


def unique_name(backup_dir, kind):
    """A backup name for now that no directory (final or partial) uses yet."""
    while True:
        name = catalog.backup_name(kind, _name_time())
        base = os.path.join(catalog.kind_dir(backup_dir, kind), name)
        if not os.path.exists(base) and not os.path.exists(base + catalog.PARTIAL_SUFFIX):
            return name
        time.sleep(1)


class Night:
    """Runs the stages of one night against ``cfg`` and keeps their results."""

    def __init__(self, cfg, log):
        self.cfg = cfg
        self.log = log
        self.stages = []
        self.base_info = None
        self.current_names = set()
        self.window = None
        self.server = None
        self.verify_summary = None
        self.snapshot_info = None  # for metrics: copied vs hardlinked bytes
        self.facts = None  # status.collect() of the wal_health stage, reused by metrics

    def stage(self, name, doing, func):
        """Run ``func(stage)``; it returns (status, detail) or None for OK. Errors become FAILED."""
        stage = Stage(name, doing)
        self.stages.append(stage)
        self.log.info("== %s: %s", name, doing)
        started = time.monotonic()
        try:
            result = func(stage)
            stage.status, stage.detail = result if result else (OK, stage.detail)
        except EXPECTED_ERRORS as exc:
            stage.status, stage.error = FAILED, "%s: %s" % (doing, exc)
            stage.no_space = isinstance(exc, space.SpaceError) or "no space left on device" in str(exc).lower()
            # Module errors wrap the CommandError that has the tool's output; it is their cause/context.
            stage.tool_output = next((getattr(e, "stderr_tail", "") for e in (exc, exc.__cause__, exc.__context__)
                                      if getattr(e, "stderr_tail", "")), "")
            self.log.error("%s FAILED while %s: %s", name, doing, exc)
        except Exception as exc:
            stage.status, stage.error = FAILED, "%s: unexpected %s: %s" % (doing, type(exc).__name__, exc)
            self.log.error("%s FAILED while %s:\n%s", name, doing, traceback.format_exc())
        stage.duration = time.monotonic() - started
        if stage.status == WARN:
            self.log.warning("%s: %s", name, stage.detail)
        return stage

    def skip(self, name, reason):
        stage = Stage(name, reason)
        stage.detail = reason
        self.stages.append(stage)
        self.log.warning("%s SKIPPED: %s", name, reason)

    def run_all(self):
        cfg = self.cfg
        self.stage("wal_config", "checking the server's WAL settings", self._check_wal_config)
        space_stage = self.stage("space", "checking free space in %s" % cfg.BACKUP_DIR, self._check_space)
        if space_stage.status == FAILED:
            for name in ("postgres", "contentstore", "config"):
                self.skip(name, "the space check failed: nothing copied tonight")
        else:
            self.stage("postgres", "taking the PostgreSQL base backup", self._base_backup)
            self.stage("contentstore", "snapshotting the contentstore %s" % cfg.contentstore_dir, self._snapshot)
            self.stage("config", "copying the keystore and Alfresco configuration", self._copy_config)
        if self.base_info:
            self.stage("wal_archive", "waiting for the base backup's WAL to reach %s" % cfg.wal_archive_dir,
                       self._complete_base_backup)
        else:
            self.skip("wal_archive", "no base backup was taken tonight")
        if cfg.VERIFY_AFTER_BACKUP:
            if self.base_info and self.base_info.get("status") == catalog.DONE:
                self.stage("verify", "restore drill of %s" % self.base_info["name"], self._verify)
            else:
                self.skip("verify", "no complete base backup tonight: nothing to drill")
        self.stage("wal_health", "checking the WAL archive and the recovery window", self._wal_health)
        # wal_config and wal_health report on the server and the archive; the others are tonight's backups.
        failed = [s for s in self.stages if s.status == FAILED and s.name not in ("wal_config", "wal_health")]
        if failed and not all(s.no_space for s in failed):
            self.skip("retention", "a backup stage failed (%s): nothing is deleted after a failed night"
                      % ", ".join(s.name for s in failed))
        elif failed:
            # Skipping would keep the disk full forever: every night would fail the same way and the WAL archive
            # would grow until archiving stops. Age-based retention still keeps the newest DONE of each kind.
            self.stage("retention", "applying retention (%d days) to free space after tonight's no-space "
                       "failure" % cfg.RETENTION_DAYS, self._retention)
        else:
            self.stage("retention", "applying retention (%d days)" % cfg.RETENTION_DAYS, self._retention)

    def record_unexpected(self, exc):
        stage = Stage("run", "running the backup")
        stage.status, stage.error = FAILED, "unexpected %s: %s" % (type(exc).__name__, exc)
        self.stages.append(stage)

    # -- stages ----------------------------------------------------------------------------------

    def _check_wal_config(self, stage):
        conn = postgres.connect(self.cfg)
        try:
            checks = wal_config_check.evaluate(wal_config_check.read_settings(conn))
        finally:
            conn.close()
        for check in checks:
            self.log.info("check %-22s %-4s %s", check.name, check.status, check.message)
        bad = wal_config_check.failed(checks)
        if bad:
            raise postgres.PostgresError("; ".join("%s: %s" % (c.name, c.message) for c in bad))
        warnings = [c for c in checks if c.status == wal_config_check.WARN]
        if warnings:
            return WARN, "; ".join(c.message for c in warnings)
        return None

    def _check_space(self, stage):
        try:
            conn = postgres.connect(self.cfg)
            try:
                self.server = postgres.server_facts(conn)
            finally:
                conn.close()
        except postgres.PostgresError:
            self.server = None  # the postgres stage reports it; the contentstore still gets its check
        try:
            need = space.check(self.cfg.BACKUP_DIR, self.cfg.wal_archive_dir, self.cfg.contentstore_dir,
                               self.server["cluster_size"] if self.server else 0,
                               self.server["wal_segment_size"] if self.server else 16 << 20, self.log)
        except space.SpaceError:
            raise
        except (OSError, ValueError, TypeError, KeyError) as exc:
            # Only a proven lack of space may stop the copies; an estimate we cannot make must not.
            return WARN, "could not estimate the space needed (%s: %s); copying anyway" % (type(exc).__name__, exc)
        stage.size = need["database"] + need["contentstore"]
        stage.detail = "estimated need: database ~%s, contentstore ~%s" % (
            catalog.human_size(need["database"]), catalog.human_size(need["contentstore"]))
        return None

    def _base_backup(self, stage):
        server = self.server
        if server is None:  # the space stage could not ask; this gives the real error
            conn = postgres.connect(self.cfg)
            try:
                server = postgres.server_facts(conn)
            finally:
                conn.close()
        name = unique_name(self.cfg.BACKUP_DIR, "postgres")
        self.current_names.add(name)
        info = base_backup.take_base_backup(self.cfg, server, catalog.kind_dir(self.cfg.BACKUP_DIR, "postgres"),
                                         name, self.log)
        self.base_info = info
        stage.size = info["size_bytes"]
        stage.detail = "%s (start %s, stop %s)" % (name, info["start_wal_file"], info["stop_wal_file"])
        return None

    def _snapshot(self, stage):
        name = unique_name(self.cfg.BACKUP_DIR, "contentstore")
        self.current_names.add(name)
        info = contentstore.take_snapshot(self.cfg.contentstore_dir, self.cfg.BACKUP_DIR, name, self.log,
                                          timeout=self.cfg.RSYNC_TIMEOUT, method=self.cfg.CONTENTSTORE_METHOD,
                                          workers=contentstore.worker_count(self.cfg.CONTENTSTORE_PARALLEL),
                                          full_compare_days=self.cfg.CONTENTSTORE_FULL_COMPARE_DAYS)
        self.snapshot_info = info
        stage.size = info.get("bytes_copied")
        stage.detail = "%s: %s files, %s bytes copied, %s bytes hardlinked" % (
            name, info.get("files"), info.get("bytes_copied"), info.get("bytes_linked"))
        if info["warnings"]:
            return WARN, "; ".join(info["warnings"])
        return None

    def _copy_config(self, stage):
        name = unique_name(self.cfg.BACKUP_DIR, "config")
        self.current_names.add(name)
        info, warnings = alfresco_files.copy_config(self.cfg.ALF_BASE_DIR, self.cfg.BACKUP_DIR, name, self.log)
        stage.size = info["size_bytes"]
        stage.detail = "%s: %s" % (name, ", ".join(info["items"]))
        return (WARN, "; ".join(warnings)) if warnings else None

    def _complete_base_backup(self, stage):
        info = self.base_info
        path = os.path.join(catalog.kind_dir(self.cfg.BACKUP_DIR, "postgres"), info["name"])
        needed = info["stop_wal_file"]
        if wal_chain.wait_for_file(self.cfg.wal_archive_dir, needed, self.cfg.WAL_WAIT_TIMEOUT):
            info["status"] = catalog.DONE
            info["wal_archived_at"] = catalog.utc_now_iso()
            catalog.write_info(path, info)
            stage.detail = "%s is DONE: WAL up to %s is archived" % (info["name"], needed)
            return None
        reason = status.archiver_reason(self.cfg)
        info["status"] = catalog.FAILED
        info["error"] = "WAL segment %s did not reach %s within %d s%s" % (
            needed, self.cfg.wal_archive_dir, self.cfg.WAL_WAIT_TIMEOUT, reason)
        catalog.write_info(path, info)
        raise postgres.PostgresError(info["error"])

    def _verify(self, stage):
        import restore_verify  # late: only nights that drill need it

        result = restore_verify.verify_backup(self.cfg, backup_name=self.base_info["name"], log=self.log,
                                              timeout=self.cfg.VERIFY_TIMEOUT)
        self.verify_summary = result.summary_text
        stage.detail = result.summary_text.splitlines()[0]
        if not result.ok:
            raise postgres.PostgresError("restore drill failed: " + "; ".join(result.details["failures"]))
        if result.details["warnings"]:
            return WARN, "; ".join(result.details["warnings"])
        return None

    def _wal_health(self, stage):
        facts = self.facts = status.collect(self.cfg)
        _state, reasons, window = status.assess(facts, datetime.datetime.now(datetime.timezone.utc),
                                                self.cfg.BACKUP_MAX_AGE_HOURS, self.cfg.WAL_MAX_AGE_HOURS,
                                                include_backups=False)
        self.window = window
        stage.detail = ("recovery window: any moment from %s to %s" % (window["from"], window["to"])
                        if window else "no recovery window yet")
        self.offsite = facts.get("offsite")
        critical = [r for r in reasons if r.startswith("CRITICAL")]
        if critical:
            raise postgres.PostgresError("; ".join(critical))
        if reasons:
            return WARN, "; ".join(reasons) + "; " + stage.detail
        return None

    def _retention(self, stage):
        # Exclusive against restores (they hold it shared): never delete what a running restore replays.
        deleting = lock.BackupLock(self.cfg.BACKUP_DIR, lock.RESTORE_LOCK_NAME)
        try:
            deleting.acquire()
        except lock.LockHeld as exc:
            return WARN, "skipped: %s; nothing is deleted tonight" % exc
        try:
            free_before = _free_bytes(self.cfg)
            entries = retention.collect(self.cfg.BACKUP_DIR)
            plan = retention.plan_retention(entries, datetime.datetime.now(), self.cfg.RETENTION_DAYS,
                                            min_count=max(1, self.cfg.RETENTION_MIN_COUNT), lock_free=True,
                                            current_names=self.current_names)
            for line in plan.format().splitlines():
                self.log.info("retention: %s", line)
            result = retention.apply_plan(plan, self.log)
            pruned = prune_wal(self.cfg, plan, self.log)
            retention.remove_orphan_metadata(self.cfg.BACKUP_DIR, self.log)
            freed = max(0, _free_bytes(self.cfg) - free_before)
        finally:
            deleting.release()
        stage.size = freed
        stage.detail = "deleted %d backups, %d WAL files; freed %s" % (len(result.deleted), pruned,
                                                                      catalog.human_size(freed))
        problems = ["could not delete %s: %s" % item for item in result.failed] + list(plan.warnings)
        return (WARN, "; ".join(problems + [stage.detail])) if problems else None

    # -- reporting -------------------------------------------------------------------------------

    @property
    def ok(self):
        return all(s.status != FAILED for s in self.stages)

    def first_failure(self):
        return next((s for s in self.stages if s.status == FAILED), None)

    def stage_dicts(self):
        return [s.as_dict() for s in self.stages]

    def extra_sections(self):
        sections = [("Restore drill", self.verify_summary)] if self.verify_summary else []
        if getattr(self, "offsite", None):  # informational: the off-site copy never fails the night
            now = datetime.datetime.now(datetime.timezone.utc)
            sections.append(("Off-site copy", "\n".join(offsite_status.describe(self.offsite, now) + [
                "  %s: %s" % ({1: "WARNING", 2: "CRITICAL"}[lvl], why) for lvl, why in
                offsite_status.assess(self.offsite, now)])))
        if self.window:
            return sections + [("Recovery window", "You can restore the database to any moment from %s to %s."
                                % (self.window["from"], self.window["to"]))]
        return sections + [("Recovery window", "None: no complete base backup with an unbroken WAL chain.")]

    def summary(self, total_seconds):
        lines = ["", "Backup summary (%s)" % ("OK" if self.ok else "FAILED"),
                 "%-14s %-8s %10s %12s  %s" % ("stage", "status", "duration", "size", "detail")]
        for s in self.stages:
            lines.append("%-14s %-8s %9.1fs %12s  %s" % (s.name, s.status, s.duration,
                                                          catalog.human_size(s.size), s.error or s.detail))
        lines.append("total %.1f s; backups in %s" % (total_seconds, self.cfg.BACKUP_DIR))
        if getattr(self, "offsite", None):
            lines += offsite_status.describe(self.offsite, datetime.datetime.now(datetime.timezone.utc))
        return "\n".join(lines)


def _free_bytes(cfg):
    """Free bytes on the file systems of BACKUP_DIR and the WAL archive (each counted once)."""
    seen, total = set(), 0
    for path in (cfg.BACKUP_DIR, cfg.wal_archive_dir):
        try:
            device, available, _size = space.free_space(path)
        except OSError:
            continue
        if device not in seen:
            seen.add(device)
            total += available
    return total


def prune_wal(cfg, plan, log):
    """Delete archived WAL older than the oldest kept DONE base backup's start segment. Returns a count."""
    if not plan.wal_keep_from or not os.path.isdir(cfg.wal_archive_dir):
        return 0
    names = wal_chain.wal_prune_plan(wal_chain.archive_segments(cfg.wal_archive_dir), plan.wal_keep_from,
                                     keep=plan.keep_backup_labels)
    if names:
        log.info("pruning %d WAL files older than %s", len(names), plan.wal_keep_from)
    return wal_chain.apply_prune(cfg.wal_archive_dir, names)
