"""``backup.py --status`` (Nagios-style health report) and ``backup.py --check`` (end-to-end archive test).

:func:`assess` is pure: it turns the collected facts into a state (OK/WARNING/CRITICAL) with reasons;
:func:`collect` gathers the facts from BACKUP_DIR, the WAL archive and the running server.
"""

import datetime
import json
import os
import time

import catalog
import offsite_status
import pg_versions
import postgres
import wal
import wal_config_check

STATE_OK, STATE_WARNING, STATE_CRITICAL = 0, 1, 2
STATE_NAMES = {STATE_OK: "OK", STATE_WARNING: "WARNING", STATE_CRITICAL: "CRITICAL"}
BACKLOG_WARN = 10  # .ready segments waiting for archive_command


def collect(cfg):
    """Facts for :func:`assess`: newest DONE backups, window, archive state, server archiver stats."""
    facts = {"backups": {}, "archiver": None, "archiver_error": None, "backlog": None}
    for kind in catalog.KINDS:
        entries = catalog.list_backups(cfg.BACKUP_DIR, kind)
        done = [e for e in entries if e.status == catalog.DONE]
        facts["backups"][kind] = {
            "done_count": len(done), "total_count": len(entries),
            "newest": done[-1].name if done else None,
            "newest_ended_at": done[-1].info.get("ended_at") if done else None,
            "newest_size_bytes": done[-1].info.get("size_bytes") if done else None,
            "oldest": done[0].name if done else None,
            "oldest_ended_at": done[0].info.get("ended_at") if done else None,
            "oldest_start_wal_file": done[0].info.get("start_wal_file") if done else None,
            "wal_segment_size": done[0].info.get("wal_segment_size") if done else None,
        }
    archive = cfg.wal_archive_dir
    segments = wal.archive_segments(archive) if os.path.isdir(archive) else []
    wal_files = [s for s in segments if wal.segment_file_base(s)]
    facts["archive_dir"] = archive
    facts["archive_segments"] = len(wal_files)
    newest_mtime = max((os.stat(os.path.join(archive, s)).st_mtime for s in wal_files), default=None)
    facts["newest_segment_at"] = _iso(newest_mtime)
    pg = facts["backups"]["postgres"]
    if pg["oldest_start_wal_file"]:
        report = wal.check_chain(archive, pg["oldest_start_wal_file"], pg["wal_segment_size"] or 16 * 1024 * 1024)
        facts["chain"] = {"ok": report.ok, "first": report.first, "last": report.last,
                          "gaps": [list(g) for g in report.gaps], "segments": report.segments}
    else:
        facts["chain"] = None
    try:
        facts["archiver"] = read_archiver(cfg)
    except postgres.PostgresError as exc:
        facts["archiver_error"] = str(exc)
    try:
        facts["backlog"] = wal.ready_backlog(cfg.pgdata)
    except OSError:
        facts["backlog"] = None  # the data directory may belong to another OS user
    facts["offsite"] = offsite_status.facts(cfg)
    return facts


ARCHIVER_KEYS = ("archived_count", "last_archived_wal", "last_archived_time", "failed_count", "last_failed_wal",
                 "last_failed_time")


def read_archiver(cfg):
    """pg_stat_archiver as a dict of ARCHIVER_KEYS (times as ISO strings). Raises PostgresError."""
    conn = postgres.connect(cfg)
    try:
        row = postgres.query(conn, "SELECT %s FROM pg_stat_archiver" % ", ".join(ARCHIVER_KEYS))[0]
    finally:
        conn.close()
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in zip(ARCHIVER_KEYS, row)}


def archiver_failing(archiver):
    """True when the archiver's last failure is newer than its last success (pure)."""
    return bool(archiver and archiver["last_failed_wal"] and (
        not archiver["last_archived_time"]
        or catalog.parse_iso(archiver["last_failed_time"]) > catalog.parse_iso(archiver["last_archived_time"])))


def archiver_reason(cfg):
    """'; archive_command is failing: ...' from pg_stat_archiver, for an error message; never raises."""
    try:
        archiver = read_archiver(cfg)
    except postgres.PostgresError as exc:
        return "; pg_stat_archiver could not be read: %s" % exc
    if archiver_failing(archiver):
        return ("; archive_command is failing: last failed segment %s at %s (%d failures), last success %s; "
                "see the PostgreSQL log" % (archiver["last_failed_wal"], archiver["last_failed_time"],
                                            archiver["failed_count"], archiver["last_archived_wal"] or "never"))
    return "; pg_stat_archiver shows no failure (last archived %s): is archive_command writing to %s?" % (
        archiver["last_archived_wal"] or "nothing", cfg.wal_archive_dir)


def _iso(timestamp):
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat()


def _age_hours(iso, now):
    value = catalog.parse_iso(iso)
    return None if value is None else (now - value).total_seconds() / 3600.0


def assess(facts, now, backup_max_age_hours, wal_max_age_hours, include_backups=True):
    """(state, reasons, window) from ``facts`` (pure). ``now`` is an aware UTC datetime.

    ``include_backups=False`` judges only the WAL archive (the nightly run judges its backups itself).
    """
    state, reasons = STATE_OK, []

    def worse(new_state, reason):
        nonlocal state
        state = max(state, new_state)
        reasons.append("%s: %s" % (STATE_NAMES[new_state], reason))

    for kind in ("postgres", "contentstore") if include_backups else ():
        info = facts["backups"][kind]
        if not info["newest"]:
            worse(STATE_CRITICAL, "no complete %s backup" % kind)
            continue
        age = _age_hours(info["newest_ended_at"], now)
        if age is not None and age > backup_max_age_hours:
            worse(STATE_CRITICAL, "newest complete %s backup %s is %.1f h old (limit %d h)"
                  % (kind, info["newest"], age, backup_max_age_hours))
    archiver = facts.get("archiver")
    if facts.get("archiver_error"):
        worse(STATE_CRITICAL, "cannot read pg_stat_archiver: %s" % facts["archiver_error"])
    elif archiver_failing(archiver):
        worse(STATE_CRITICAL, "archive_command is failing: last failed segment %s at %s, last success %s"
              % (archiver["last_failed_wal"], archiver["last_failed_time"], archiver["last_archived_wal"]))
    wal_age = _age_hours(facts.get("newest_segment_at"), now)
    if wal_age is None:
        worse(STATE_CRITICAL, "the WAL archive %s holds no segment" % facts.get("archive_dir"))
    elif wal_age > wal_max_age_hours:
        worse(STATE_WARNING, "newest archived WAL segment is %.1f h old (limit %d h)" % (wal_age, wal_max_age_hours))
    if facts.get("backlog") is not None and facts["backlog"] >= BACKLOG_WARN:
        worse(STATE_WARNING, "%d WAL segments are waiting to be archived (pg_wal is growing)" % facts["backlog"])
    chain = facts.get("chain")
    if chain and not chain["ok"]:
        worse(STATE_CRITICAL, "WAL chain has gaps: %s" % ", ".join("%s..%s" % tuple(g) for g in chain["gaps"]))
    for level, reason in offsite_status.assess(facts.get("offsite"), now) if include_backups else ():
        worse(level, reason)
    window = None
    pg = facts["backups"]["postgres"]
    if pg["oldest_ended_at"] and chain and chain["ok"]:
        # The backup's last segment can reach the archive before the backup's own checks end: the window then
        # ends where it starts (as restore_plan.recovery_window says), never before.
        newest = facts.get("newest_segment_at")
        ends = catalog.parse_iso(newest), catalog.parse_iso(pg["oldest_ended_at"])
        window = {"from": pg["oldest_ended_at"],
                  "to": newest if ends[0] and ends[1] and ends[0] >= ends[1] else pg["oldest_ended_at"]}
    return state, reasons, window


def report(cfg, as_json=False, publish=None):
    """Print the status; return the Nagios exit code. ``publish(doc)`` (metrics.publish) may complete the
    document (installation, last run) and write it to the monitoring files; it returns the document."""
    facts = collect(cfg)
    now = datetime.datetime.now(datetime.timezone.utc)
    state, reasons, window = assess(facts, now, cfg.BACKUP_MAX_AGE_HOURS, cfg.WAL_MAX_AGE_HOURS)
    doc = {"state": STATE_NAMES[state], "reasons": reasons, "window": window, "facts": facts}
    doc = publish(doc) if publish else doc
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True, default=str))
        return state
    print("ALFRESCO BACKUP %s" % STATE_NAMES[state])
    last = doc.get("last_run")
    if last:
        print("  %s: last run %s (exit %s), ended %s" % (doc.get("installation"), last.get("result"),
                                                         last.get("exit_code"), last.get("ended_at")))
    for kind, info in facts["backups"].items():
        age = _age_hours(info["newest_ended_at"], now)
        print("  %-12s newest %s (%s old), %d complete of %d" % (
            kind, info["newest"] or "none", "%.1f h" % age if age is not None else "?", info["done_count"],
            info["total_count"]))
    if window:
        print("  recovery window: you can restore to any moment from %s to %s" % (window["from"], window["to"]))
    else:
        print("  recovery window: none (no complete base backup with an unbroken WAL chain)")
    print("  WAL archive %s: %d segments, newest at %s; backlog %s" % (
        facts["archive_dir"], facts["archive_segments"], facts["newest_segment_at"],
        facts["backlog"] if facts["backlog"] is not None else "unknown"))
    if facts.get("offsite"):
        print("\n".join("  " + line for line in offsite_status.describe(facts["offsite"], now)))
    for reason in reasons:
        print("  " + reason)
    return state


def check(cfg, log):
    """``--check``: settings, privileges, then a restore point and a WAL switch that must reach the archive
    within WAL_WAIT_TIMEOUT. Prints each result; returns 0 when all pass, else 1."""
    results = []
    try:
        conn = postgres.connect(cfg)
    except postgres.PostgresError as exc:
        print("FAIL connection: %s" % exc)
        return 1
    try:
        facts = wal_config_check.read_settings(conn)
        checks = wal_config_check.evaluate(facts)
        # A WAL switch is what --check is for: without the privilege it cannot test anything.
        results += [("FAIL" if c.name == "wal_switch" and c.status != "OK" else c.status, c.name, c.message)
                    for c in checks]
        if not any(r[0] == "FAIL" for r in results):
            results.append(_switch_and_wait(cfg, conn, facts))
    finally:
        conn.close()
    for status_word, name, message in results:
        print("%-4s %-22s %s" % (status_word, name, message))
        log.info("check %s %s: %s", name, status_word, message)
    return 1 if any(r[0] == "FAIL" for r in results) else 0


def _switch_and_wait(cfg, conn, facts):
    """A restore point and a WAL switch (the built-ins when the role may call them, else, on 9.x, the helper
    functions setup.py made), then wait for the closed segment in the archive. Returns a result tuple."""
    import psycopg2

    num = facts["server_version_num"]
    helper = not facts["switch_direct"]
    label = "alfresco-backup-check-%s" % time.strftime("%Y%m%d%H%M%S")
    try:
        # The restore point first: the switch then always closes a segment (a no-op switch would return a
        # segment boundary, which pg_walfile_name names as the next, incomplete segment from 17 on).
        postgres.query(conn, pg_versions.restore_point_sql(helper), (label,))
        segment = postgres.query(conn, pg_versions.switch_sql(num, helper))[0][0]
    except psycopg2.Error as exc:
        return ("FAIL", "wal_switch", "cannot switch WAL as %s: %s; as a superuser in database %s run: %s (or "
                "run setup.py)" % (cfg.PGUSER, str(exc).strip(), facts.get("database"), " ".join(
                    s + ";" for s in pg_versions.switch_fix(num, '"%s"' % cfg.PGUSER.replace('"', '""')))))
    started = time.monotonic()
    if wal.wait_for_file(cfg.wal_archive_dir, segment, cfg.WAL_WAIT_TIMEOUT):
        return ("OK", "wal_archived", "segment %s reached %s in %.1f s" % (
            segment, cfg.wal_archive_dir, time.monotonic() - started))
    return ("FAIL", "wal_archived", "segment %s did not reach %s within %d s%s. Check that the directory is "
            "writable by the PostgreSQL server's OS user and that archive_command points at it"
            % (segment, cfg.wal_archive_dir, cfg.WAL_WAIT_TIMEOUT, archiver_reason(cfg)))
