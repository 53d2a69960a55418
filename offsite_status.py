"""The off-site state for ``--status``, ``--json`` and the nightly summary, from the local record only (no
request to the remote: a status check every minute must cost nothing).

:func:`facts` returns the dict published as ``facts["offsite"]`` (keys below; other tools, e.g. the Prometheus
exporter, read exactly these), or None when no off-site copy is configured. :func:`assess` (pure) judges it:
CRITICAL when no base backup is off-site complete or the newest is older than OFFSITE_BACKUP_MAX_AGE_HOURS;
WARNING when the newest WAL off-site is older than OFFSITE_WAL_MAX_AGE_HOURS (the off-site RPO) or the last
run failed.
"""

import datetime
import os

import catalog
import offsite_state
import wal

KEYS = ("remote", "newest_complete_base", "newest_complete_base_ended_at", "newest_wal", "newest_wal_at",
        "pending_files", "pending_bytes", "last_run_at", "last_ok_at", "last_error")


def _mtime_iso(path):
    try:
        stamp = os.stat(path).st_mtime
    except OSError:
        return None
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).replace(microsecond=0).isoformat()


def facts(cfg):
    """{KEYS..., 'wal_max_age_hours', 'backup_max_age_hours', 'complete_bases'} or None (not configured).
    Never raises: an unreadable record gives last_error."""
    remote = getattr(cfg, "OFFSITE_REMOTE", "")
    if not remote:
        return None
    result = dict.fromkeys(KEYS)
    result.update(remote=remote, pending_files=0, pending_bytes=0, complete_bases=0,
                  wal_max_age_hours=cfg.OFFSITE_WAL_MAX_AGE_HOURS,
                  backup_max_age_hours=cfg.OFFSITE_BACKUP_MAX_AGE_HOURS)
    archive = cfg.wal_archive_dir
    local_wal = wal.archive_segments(archive) if os.path.isdir(archive) else []
    if not offsite_state.exists(cfg.BACKUP_DIR):
        result["pending_files"] = len(local_wal)
        result["pending_bytes"] = sum(os.path.getsize(os.path.join(archive, n)) for n in local_wal)
        _add_unqueued_sets(cfg, None, result)
        return result
    try:
        with offsite_state.State(cfg.BACKUP_DIR, remote, readonly=True) as state:
            _from_state(cfg, state, archive, local_wal, result)
    except Exception as exc:  # noqa: BLE001 - the status must show the problem, not crash on it
        result["last_error"] = "cannot read the off-site record %s: %s" % (offsite_state.path_of(cfg.BACKUP_DIR), exc)
    return result


def _from_state(cfg, state, archive, local_wal, result):
    shipped = state.shipped_objects("wal/")
    segments = sorted(k[4:] for k in shipped if wal.segment_file_base(k[4:]))
    if segments:
        newest = segments[-1]
        result["newest_wal"] = wal.segment_file_base(newest)
        row = state.object("wal/" + newest)
        result["newest_wal_at"] = _mtime_iso(os.path.join(archive, newest)) or (row and row["shipped_at"])
    bases = []
    for name, _status, info, _at in state.sets("postgres", "shipped"):
        stop = info.get("stop_wal_file") or ""
        if stop and ("wal/" + stop in shipped or "wal/" + stop + ".gz" in shipped):
            bases.append((info.get("ended_at") or "", name))
    if bases:
        result["newest_complete_base_ended_at"], result["newest_complete_base"] = max(bases)
        result["complete_bases"] = len(bases)
    files, size = state.pending_totals()
    known = state.known("wal/" + n for n in local_wal)
    new_wal = [n for n in local_wal if "wal/" + n not in known]
    result["pending_files"] = files + len(new_wal)
    result["pending_bytes"] = size + sum(_size(os.path.join(archive, n)) for n in new_wal)
    result["last_run_at"], result["last_ok_at"], result["last_error"] = state.last_runs()
    _add_unqueued_sets(cfg, state, result)


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _add_unqueued_sets(cfg, state, result):
    """DONE local backups the shipper has not taken in yet: their size (a snapshot: its new files)."""
    for kind in catalog.KINDS:
        for entry in catalog.done_backups(cfg.BACKUP_DIR, kind):
            if state is not None and state.set_status(kind, entry.name) is not None:
                continue
            info = entry.info
            if kind == "contentstore":
                result["pending_files"] += info.get("files_copied") or info.get("files") or 0
                result["pending_bytes"] += info.get("bytes_copied") or 0
            else:
                result["pending_files"] += 1
                result["pending_bytes"] += info.get("size_bytes") or 0


def _age_hours(iso, now):
    value = catalog.parse_iso(iso)
    return None if value is None else (now - value).total_seconds() / 3600.0


def assess(off, now):
    """[(level, reason)] for the off-site facts ``off`` (pure); level 1 WARNING, 2 CRITICAL."""
    if not off:
        return []
    problems = []
    if not off.get("newest_complete_base"):
        problems.append((2, "no base backup is complete off-site yet (%s; %d files, %s pending)" % (
            off["remote"], off["pending_files"], catalog.human_size(off["pending_bytes"]))))
    else:
        age = _age_hours(off.get("newest_complete_base_ended_at"), now)
        if age is not None and age > off["backup_max_age_hours"]:
            problems.append((2, "newest base backup complete off-site, %s, is %.1f h old (limit %d h)" % (
                off["newest_complete_base"], age, off["backup_max_age_hours"])))
    wal_age = _age_hours(off.get("newest_wal_at"), now)
    if wal_age is None:
        problems.append((1, "no WAL segment is off-site yet"))
    elif wal_age > off["wal_max_age_hours"]:
        problems.append((1, "newest WAL segment off-site, %s, is %.1f h old (limit %d h): the off-site copy lags "
                            "behind" % (off["newest_wal"], wal_age, off["wal_max_age_hours"])))
    if off.get("last_error"):
        problems.append((1, "the last off-site run failed: %s" % off["last_error"].splitlines()[0][:300]))
    return problems


def describe(off, now):
    """Lines for people (status report, nightly summary and mail)."""
    if not off:
        return ["off-site copy: not configured (OFFSITE_REMOTE)"]
    base_age = _age_hours(off.get("newest_complete_base_ended_at"), now)
    wal_age = _age_hours(off.get("newest_wal_at"), now)
    return ["off-site copy %s:" % off["remote"],
            "  newest complete base backup %s (%s old)" % (off.get("newest_complete_base") or "none",
                                                           "%.1f h" % base_age if base_age is not None else "-"),
            "  newest WAL segment %s (%s old: the off-site RPO)" % (off.get("newest_wal") or "none",
                                                                   "%.1f h" % wal_age if wal_age is not None else "-"),
            "  pending: %d files, %s; last run %s, last success %s%s" % (
                off["pending_files"], catalog.human_size(off["pending_bytes"]), off.get("last_run_at") or "never",
                off.get("last_ok_at") or "never",
                "; last error: %s" % off["last_error"].splitlines()[0][:200] if off.get("last_error") else "")]
