"""``restore.py full``: put the database and the contentstore of an Alfresco install back in place.

Order: plan (base backup, paired snapshot) -> free space -> stop Alfresco (``alfresco.sh stop``, with a
timeout) -> make sure PostgreSQL and Tomcat are down -> move the data directory and the contentstore aside
(``<path>.before-restore-<TS>``, never deleted) -> restore both (and, on request, keystore and configuration)
-> ``alfresco.sh start postgresql`` -> wait for recovery -> the drill's checks against it -> ``alfresco.sh
start``. A failure before PostgreSQL starts puts the originals back; after that the roll-back commands
(printed and saved as BACKUP_DIR/restore-rollback-<TS>.sh) undo the restore.

The restored server *is* production here, so its own archive settings stay on: it must keep archiving
(into the same archive, on a new timeline) so that tonight's backup and any later point-in-time restore
have its WAL. The throwaway copies made by ``restore.py postgres`` and ``verify`` have archiving off.
"""

import os
import shlex
import shutil
import time

import catalog
import pg_versions
import postgres
import restore_db
import restore_plan
import restore_server
import restore_settings
import restore_verify
import subprocess_utils

ALL_CODES = tuple(range(256))  # alfresco.sh returns non-zero on success at times; its effect is checked instead
CONFIG_ITEMS = (("keystore", os.path.join("alf_data", "keystore")),
                ("alfresco-global.properties", os.path.join("tomcat", "shared", "classes",
                                                            "alfresco-global.properties")),
                ("extension", os.path.join("tomcat", "shared", "classes", "alfresco", "extension")))


class FullPlan:
    """What an in-place restore will do; ``describe()`` is shown before asking for confirmation."""

    def __init__(self, cfg, db, snapshot, config, warnings, stamp):
        self.cfg, self.db, self.snapshot, self.config, self.warnings = cfg, db, snapshot, config, warnings
        self.stamp = stamp
        self.rescued = {"archived": [], "copied": []}
        self.alfresco_sh = os.path.join(cfg.ALF_BASE_DIR, "alfresco.sh")
        self.moves = [(cfg.pgdata, "database"), (cfg.contentstore_dir, "contentstore")]
        if config is not None:
            # Only what the copy holds: an item it lacks stays as it is.
            self.moves += [(os.path.join(cfg.ALF_BASE_DIR, rel), what) for what, rel in CONFIG_ITEMS
                           if os.path.lexists(os.path.join(config.path, what))]

    def aside(self, path):
        return "%s.before-restore-%s" % (path, self.stamp)

    def describe(self):
        lines = ["In-place restore of %s" % self.cfg.ALF_BASE_DIR,
                 "  database: base backup %s, recovered to %s" % (self.db.base.name,
                                                                  restore_plan.describe_target(self.db.target)),
                 "  contentstore: snapshot %s" % self.snapshot.name]
        if self.config is not None:
            lines.append("  keystore and configuration: %s" % self.config.name)
        lines.append("  will stop Alfresco (%s stop), then move aside (nothing is deleted):" % self.alfresco_sh)
        lines += ["    %s -> %s" % (path, self.aside(path)) for path, _what in self.moves]
        lines += ["  note: %s" % n for n in self.db.notes] + ["  WARNING: %s" % w for w in self.warnings]
        return "\n".join(lines)


def plan_full(cfg, target, backup_id=None, snapshot_id=None, with_config=False, timeline="latest"):
    """A FullPlan. Raises PlanError / RestoreError before anything is changed."""
    if os.geteuid() == 0:
        raise restore_db.Refused("run restore.py full as the Alfresco install owner (the OS user that runs "
                                 "PostgreSQL), not as root: PostgreSQL refuses root")
    if not os.access(os.path.join(cfg.ALF_BASE_DIR, "alfresco.sh"), os.X_OK):
        raise restore_db.Refused("%s/alfresco.sh not found: 'full' drives an installer bundle; for another "
                                 "layout follow RESTORE.md by hand" % cfg.ALF_BASE_DIR)
    db = restore_db.plan_database(cfg, target, backup_id, timeline)
    restore_settings.recovery_lines(db.base.info.get("server_version_num") or 0, "", target, timeline)  # refuse now
    snapshot, warnings = restore_plan.choose_snapshot(
        catalog.list_backups(cfg.BACKUP_DIR, "contentstore"), restore_plan.db_point(target, db.base), snapshot_id,
        db.archive.newest_at)
    config = None
    if with_config:
        config = restore_plan.choose_config(catalog.list_backups(cfg.BACKUP_DIR, "config"), db.base)
        if config is None:
            raise restore_plan.PlanError("no complete keystore/configuration copy exists")
    for path in (cfg.pgdata, cfg.contentstore_dir):
        parent = os.path.dirname(path)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise restore_db.Refused("cannot move %s aside: %s is not writable by this user" % (path, parent))
    # The originals stay (moved aside on their own file system): the restored copies need room of their own.
    needs = [(cfg.pgdata, restore_db.space_needed(db.base)),
             (cfg.contentstore_dir, int((snapshot.info.get("bytes_total") or 0) * 1.05))]
    for path, _need in needs:
        same = sum(n for p, n in needs if os.stat(os.path.dirname(p)).st_dev == os.stat(os.path.dirname(path)).st_dev)
        restore_db.check_free_space(path, same, "the restored data directory and contentstore")
    return FullPlan(cfg, db, snapshot, config, warnings, time.strftime("%Y-%m-%d_%H-%M-%S"))


def _pid_from(path):
    try:
        with open(path) as handle:
            pid = int(handle.read().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def stop_alfresco(plan, log, timeout):
    """alfresco.sh stop, then insist that PostgreSQL and Tomcat are down. Raises RestoreError."""
    cfg = plan.cfg
    try:
        subprocess_utils.run([plan.alfresco_sh, "stop"], subprocess_utils.base_env(), timeout=timeout,
                             ok_codes=ALL_CODES, what="alfresco.sh stop", log=log)
    except subprocess_utils.CommandError as exc:
        log.warning("%s", exc)
    deadline = time.monotonic() + 30
    while restore_server.postmaster_alive(cfg.pgdata) and time.monotonic() < deadline:
        time.sleep(0.5)
    if restore_server.postmaster_alive(cfg.pgdata):
        raise restore_db.RestoreError("PostgreSQL is still running on %s after '%s stop': stop it (%s stop "
                                      "postgresql) and run the restore again; nothing was moved"
                                      % (cfg.pgdata, plan.alfresco_sh, plan.alfresco_sh))
    tomcat = _pid_from(os.path.join(cfg.ALF_BASE_DIR, "tomcat", "temp", "catalina.pid"))
    if tomcat:
        raise restore_db.RestoreError("Tomcat (pid %d from tomcat/temp/catalina.pid) is still running: stop it "
                                      "and run the restore again; nothing was moved" % tomcat)


def _copy_item(src, dst):
    if os.path.isdir(src):
        shutil.copytree(src, dst, symlinks=True)
    elif os.path.isfile(src):
        shutil.copy2(src, dst)


def put_back(plan, moved, log):
    """Undo the moves after a failure before PostgreSQL started: restored pieces go to .failed-restore-TS."""
    for path, aside in reversed(moved):
        try:
            if os.path.lexists(path):
                os.rename(path, "%s.failed-restore-%s" % (path, plan.stamp))
            os.rename(aside, path)
            log.info("put back %s", path)
        except OSError as exc:
            log.error("could not put %s back from %s: %s", path, aside, exc)


def restore_files(plan, log, timeline):
    """Move aside and restore database, contentstore (and configuration). Returns the moves done."""
    cfg, moved = plan.cfg, []
    for path, _what in plan.moves:
        if os.path.lexists(path):
            os.rename(path, plan.aside(path))
            moved.append((path, plan.aside(path)))
    try:
        result = restore_db.restore_database(cfg, plan.db, cfg.pgdata, log, timeline=timeline, keep_archiving=True)
        for warning in result["warnings"]:
            log.warning("%s", warning)
        if os.path.isdir(plan.aside(cfg.pgdata)):
            plan.rescued = rescue_unarchived_wal(plan.aside(cfg.pgdata), cfg.pgdata, cfg.wal_archive_dir,
                                                 plan.db.base.info.get("server_version_num") or 0, log)
        store = cfg.contentstore_dir
        subprocess_utils.run(["rsync", "-a", "--numeric-ids", plan.snapshot.path.rstrip("/") + "/", store + "/"],
                             subprocess_utils.base_env(), what="copying the contentstore snapshot", log=log)
        if os.path.isdir(plan.aside(store)):
            os.chmod(store, os.stat(plan.aside(store)).st_mode & 0o7777)
        if plan.config is not None:
            for what, rel in CONFIG_ITEMS:
                _copy_item(os.path.join(plan.config.path, what), os.path.join(cfg.ALF_BASE_DIR, rel))
    except (restore_db.RestoreError, subprocess_utils.CommandError, OSError, shutil.Error) as exc:
        put_back(plan, moved, log)
        raise restore_db.RestoreError("%s\nThe original data directory and contentstore are back in place (the "
                                      "partial restore is kept as *.failed-restore-%s); Alfresco is stopped: start "
                                      "it with %s start" % (exc, plan.stamp, plan.alfresco_sh))
    except BaseException:
        put_back(plan, moved, log)
        raise
    return moved


def rescue_unarchived_wal(old_data, new_data, archive_dir, version_num, log):
    """Keep the WAL the old server wrote but had not archived yet (PostgreSQL's documented procedure for a
    restore after a crash: the last minutes of commits, more when archiving lagged).

    Segments and history files marked ``archive_status/<name>.ready`` in the moved-aside ``old_data`` are
    archived now, as the old server would have done, so recovery fetches them like any other and the
    archive keeps no gap; segments with no status at all (the one being written when the server stopped, and
    recycled ones, whose stale pages recovery recognises as the end of WAL) are copied into the restored
    ``pg_wal``. Returns {'archived': [names], 'copied': [names]}. Raises RestoreError when one cannot be
    saved: restoring without it would silently lose those commits."""
    import wal  # the archive_command's own code: the same durable, never-overwriting push

    wal_dir = restore_settings.wal_dir_name(version_num)
    old_wal, new_wal = os.path.join(old_data, wal_dir), os.path.join(new_data, wal_dir)
    saved = {"archived": [], "copied": []}
    if not os.path.isdir(old_wal) or os.path.islink(old_wal):
        return saved
    status_dir = os.path.join(old_wal, "archive_status")
    status = set(os.listdir(status_dir)) if os.path.isdir(status_dir) else set()
    archived = {n[:-3] if n.endswith(".gz") else n for n in wal.archive_segments(archive_dir)} \
        if os.path.isdir(archive_dir) else set()
    for name in sorted(os.listdir(old_wal)):
        path = os.path.join(old_wal, name)
        if not os.path.isfile(path) or os.path.islink(path) or name in archived:
            continue
        try:
            if name + ".ready" in status:
                wal.archive_push(path, archive_dir, compress=True)
                saved["archived"].append(name)
            elif wal.is_segment_name(name) and name + ".done" not in status:
                shutil.copy2(path, os.path.join(new_wal, name))
                saved["copied"].append(name)
        except (OSError, wal.ArchiveFailed) as exc:
            raise restore_db.RestoreError("cannot save WAL %s that the old server had not archived yet (%s): "
                                          "restoring without it would lose its commits" % (path, exc))
    if saved["archived"] or saved["copied"]:
        log.info("saved the old server's unarchived WAL: archived %s; copied into %s: %s",
                 ", ".join(saved["archived"]) or "none", new_wal, ", ".join(saved["copied"]) or "none")
    return saved


def filler(store, aside, log):
    """A check_content fallback: copy a file the snapshot lacks from the moved-aside contentstore when it is
    there with the recorded size (content files never change once written, so this is safe)."""
    def fill(rel, size):
        src, dst = os.path.join(aside, rel), os.path.join(store, rel)
        if not os.path.isfile(src) or (size is not None and os.path.getsize(src) != size):
            return False
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)
        log.info("copied %s from %s (newer than the snapshot)", rel, aside)
        return True
    return fill if os.path.isdir(aside) else None


def check_restored(plan, log):
    """The drill's checks against the restored, running server. Returns (problems, info lines, timeline)."""
    cfg = plan.cfg
    store = cfg.contentstore_dir
    conn = postgres.connect(cfg)
    try:
        counts = restore_verify.sanity_counts(conn)
        report = restore_verify.check_content(conn, store, filler(store, plan.aside(store), log))
        version = int(postgres.query(conn, "SHOW server_version_num")[0][0])
        timeline = int(postgres.query(conn, "SELECT %s" % pg_versions.current_wal_file_sql(version))[0][0][:8], 16)
    finally:
        conn.close()
    info = ["rows: " + ", ".join("%s %d" % item for item in counts.items()),
            "content: %d store:// URLs checked, %d missing, %d size mismatches" % (
                report["checked"], report["missing_total"], report["mismatched_total"])]
    if report["filled"]:
        info.append("%d files newer than the snapshot were copied from %s" % (report["filled"], plan.aside(store)))
    return restore_verify.content_problems(report, store), info, timeline


def wait_for_tomcat(cfg, offset, timeout):
    out = os.path.join(cfg.ALF_BASE_DIR, "tomcat", "logs", "catalina.out")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "Server startup in" in restore_server.read_from(out, offset):
            return True
        time.sleep(1)
    return False


def run_full(plan, log, timeline="latest", stop_timeout=300, start_timeout=600, recovery_timeout=3600):
    """Carry out ``plan``. Returns (ok, report lines, rollback lines). Raises RestoreError / CommandError when
    it fails before PostgreSQL is started (the originals are then back in place)."""
    cfg = plan.cfg
    stop_alfresco(plan, log, stop_timeout)
    moved = restore_files(plan, log, timeline)
    pg_log = os.path.join(cfg.ALF_BASE_DIR, "postgresql", "postgresql.log")
    offset = restore_server.file_size(pg_log)
    rollback_moves = [(path, aside, "%s.restored-%s" % (path, plan.stamp)) for path, aside in moved]
    rollback = restore_plan.rollback_commands(plan.alfresco_sh, rollback_moves)
    report = ["restored %s and %s; originals kept as *.before-restore-%s" % (
        plan.db.base.name, plan.snapshot.name, plan.stamp)]
    if plan.rescued["archived"] or plan.rescued["copied"]:
        report.append("kept %d WAL files the old server had not archived yet (%d archived now, %d copied into "
                      "pg_wal): commits up to its last moment are recovered" % (
                          len(plan.rescued["archived"]) + len(plan.rescued["copied"]), len(plan.rescued["archived"]),
                          len(plan.rescued["copied"])))
    try:
        subprocess_utils.run([plan.alfresco_sh, "start", "postgresql"], subprocess_utils.base_env(),
                             timeout=start_timeout, ok_codes=ALL_CODES, what="alfresco.sh start postgresql", log=log,
                             daemon=True)
        seconds = restore_server.wait_promoted([cfg], cfg.pgdata, recovery_timeout, pg_log, offset)
        report.append("PostgreSQL recovered in %.1f s" % seconds)
        restore_db.clean_after_promotion(cfg.pgdata, keep_block=False, log=log)
        reached, line = restore_settings.recovery_outcome(restore_server.read_from(pg_log, offset))
        if plan.db.target.kind not in ("latest",) and reached is not True:
            report.append("WARNING: could not confirm from %s that recovery stopped at the target%s" % (
                pg_log, ": " + line if line else ""))
        problems, info, timeline_now = check_restored(plan, log)
        report += info
    except (restore_db.RestoreError, postgres.PostgresError, subprocess_utils.CommandError) as exc:
        return False, report + ["FAILED: %s" % exc, "Alfresco was not started."], rollback
    base_tli = plan.db.base.info.get("timeline") or 1
    if timeline_now > base_tli:
        rollback = restore_plan.rollback_commands(
            plan.alfresco_sh, rollback_moves, cfg.wal_archive_dir,
            os.path.join(cfg.BACKUP_DIR, "pg_wal.abandoned-%s" % plan.stamp), timeline_now)
        report.append("the restored server continues on timeline %d and archives into %s"
                      % (timeline_now, cfg.wal_archive_dir))
    if problems:
        return False, report + ["FAILED: %s" % p for p in problems] + ["Alfresco was not started."], rollback
    out_offset = restore_server.file_size(os.path.join(cfg.ALF_BASE_DIR, "tomcat", "logs", "catalina.out"))
    subprocess_utils.run([plan.alfresco_sh, "start"], subprocess_utils.base_env(), timeout=start_timeout,
                         ok_codes=ALL_CODES, what="alfresco.sh start", log=log, daemon=True)
    if wait_for_tomcat(cfg, out_offset, start_timeout):
        report.append("Alfresco started ('Server startup in' seen in tomcat/logs/catalina.out)")
    else:
        report.append("WARNING: 'Server startup in' did not appear in catalina.out within %d s" % start_timeout)
    return True, report, rollback


def save_rollback(cfg, stamp, lines):
    """Write the roll-back commands to BACKUP_DIR/restore-rollback-<stamp>.sh (0700). Returns its path."""
    path = os.path.join(cfg.BACKUP_DIR, "restore-rollback-%s.sh" % stamp)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
    with os.fdopen(fd, "w") as handle:
        handle.write("#!/bin/sh\n# Undo the in-place restore of %s\nset -e\n%s\n" % (
            shlex.quote(cfg.ALF_BASE_DIR), "\n".join(lines)))
    return path
