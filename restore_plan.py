"""Restore planning, pure: which base backup and snapshot, and the recovery settings for a server version.

Nothing here touches the file system or a server; callers pass in catalog entries (``catalog.BackupEntry``),
times and LSNs. Every refusal is a :class:`PlanError` whose message says what to do instead. The recovery
settings per server version are in restore_settings.py.

Rules (see RESTORE.md):
- base backup for a target time: the newest DONE backup that ended (plus a 1 s margin, for metadata
  written with whole seconds) at or before it;
- recovery window: [oldest DONE backup's end, newest archived WAL segment]; a target time outside it is refused;
- contentstore snapshot: the first DONE snapshot that *started* at or after the database's recovery point
  (a file without a row is a harmless orphan; a row without its file is a broken document);
- base backups taken on a timeline that an earlier restore abandoned are left out (see :func:`on_lineage`).
"""

import collections
import datetime
import re
import shlex

import catalog
import wal_chain

MARGIN = datetime.timedelta(seconds=1)
TARGET_KINDS = ("latest", "time", "name", "xid", "lsn", "immediate")
_TIME_RE = re.compile(
    r"^\s*(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?)?"
    r"\s*(Z|UTC|[+-]\d{2}(?::?\d{2})?)?\s*$", re.I)


class PlanError(Exception):
    """The restore cannot be planned as asked; the message says why and what to do instead."""


Target = collections.namedtuple("Target", "kind value")
Target.__doc__ = "A recovery target: ``kind`` in TARGET_KINDS, ``value`` (aware datetime, str or None)."
LATEST = Target("latest", None)


def parse_time(text):
    """'2024-05-01 10:30[:00[.123456]][Z|+02|+02:00|+0200]' -> aware datetime.

    Without an offset the time is this machine's local time. Raises PlanError."""
    match = _TIME_RE.match(text or "")
    if not match:
        raise PlanError("cannot read the time %r: write it as 'YYYY-MM-DD HH:MM:SS' (local time) or with an "
                        "offset, e.g. '2024-05-01 10:30:00+02:00'" % text)
    year, month, day, hour, minute, second, frac, zone = match.groups()
    try:
        value = datetime.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                                  int(second or 0), int((frac or "0").ljust(6, "0")))
    except ValueError as exc:
        raise PlanError("impossible time %r: %s" % (text, exc))
    if zone is None:
        return value.astimezone()  # naive: local time of this machine
    if zone.upper() in ("Z", "UTC"):
        return value.replace(tzinfo=datetime.timezone.utc)
    digits = zone[1:].replace(":", "")
    offset = datetime.timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0))
    return value.replace(tzinfo=datetime.timezone(-offset if zone[0] == "-" else offset))


def format_pg_time(value):
    """An aware datetime as PostgreSQL reads it unambiguously: '2024-05-01 08:30:00.123456+00' (UTC)."""
    utc = value.astimezone(datetime.timezone.utc)
    return utc.strftime("%Y-%m-%d %H:%M:%S") + (".%06d" % utc.microsecond if utc.microsecond else "") + "+00"


def show_time(value):
    """A datetime for people: local time with its offset, seconds precision, or '-'."""
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S %z") if value else "-"


def make_target(time=None, name=None, xid=None, lsn=None, immediate=False):
    """One Target from the CLI options (at most one may be given). Raises PlanError."""
    given = [(k, v) for k, v in (("time", time), ("name", name), ("xid", xid), ("lsn", lsn)) if v is not None]
    if immediate:
        given.append(("immediate", None))
    if len(given) > 1:
        raise PlanError("give only one recovery target (got %s)" % ", ".join(k for k, _ in given))
    if not given:
        return LATEST
    kind, value = given[0]
    if kind == "time" and not isinstance(value, datetime.datetime):
        value = parse_time(value)
    if kind == "xid" and not re.match(r"^[0-9]+$", str(value)):
        raise PlanError("--target-xid must be a transaction number, got %r" % value)
    if kind == "lsn" and not re.match(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$", str(value)):
        raise PlanError("--target-lsn must look like 16/B374D848, got %r" % value)
    if kind == "name" and (not value or "\n" in value):
        raise PlanError("--target-name must be a non-empty single line")
    return Target(kind, value)


def describe_target(target):
    if target.kind == "latest":
        return "the end of the archived WAL (latest)"
    if target.kind == "immediate":
        return "the end of the base backup (immediate)"
    if target.kind == "time":
        return "time %s" % target.value.astimezone().isoformat(" ")
    return "%s %s" % (target.kind, target.value)


# ---------------------------------------------------------------- choosing backups

def ended_at(entry):
    return catalog.parse_iso(entry.info.get("ended_at"))


def started_at(entry):
    return catalog.parse_iso(entry.info.get("started_at"))


def _done(entries):
    return [e for e in entries if e.status == catalog.DONE and ended_at(e) is not None]


def find_backup(entries, ident, what):
    """The entry named ``ident`` ('latest' = newest DONE). Raises PlanError unless it exists and is DONE."""
    done = _done(entries)
    if ident in (None, "", "latest"):
        if not done:
            raise PlanError("no complete (DONE) %s backup exists" % what)
        return done[-1]
    for entry in entries:
        if entry.name == ident or entry.name == ident.rstrip("/").split("/")[-1]:
            if entry.status != catalog.DONE:
                raise PlanError("%s backup %s is %s, not DONE: it cannot be restored" % (what, entry.name,
                                                                                        entry.status))
            return entry
    raise PlanError("no %s backup named %s (see: restore.py list)" % (what, ident))


def recovery_window(bases, newest_wal_at):
    """(start, end) datetimes: the oldest DONE base backup's end and the newest archived WAL, or None."""
    done = _done(bases)
    if not done or newest_wal_at is None:
        return None
    start = min(ended_at(e) for e in done)
    return start, max(start, newest_wal_at)


def on_lineage(entry, lineage):
    """True when base backup ``entry`` can start a recovery that follows ``lineage`` ({timeline: LSN int
    where the next timeline forked off, or None for the followed timeline}; None = no restriction)."""
    if lineage is None:
        return True
    tli, stop = entry.info.get("timeline") or 1, entry.info.get("stop_lsn")
    if tli not in lineage:
        return False
    return lineage[tli] is None or (stop is not None and wal_chain.parse_lsn(stop) <= lineage[tli])


def choose_base(bases, target, backup_id=None, newest_wal_at=None, lineage=None):
    """(entry, notes) for ``target``. Raises PlanError for a target outside the recovery window.

    Time: the newest DONE backup that ended at or before it (or ``backup_id``, checked). LSN: the newest
    that stopped at or before it. Name / xid: ``backup_id`` or the oldest DONE backup, the only one sure
    to begin before the target. Latest / immediate: ``backup_id`` or the newest. With ``lineage`` (see
    :func:`on_lineage`), backups taken on a timeline abandoned by an earlier restore are left out."""
    every = _done(bases)
    if not every:
        raise PlanError("no complete (DONE) base backup exists: nothing to restore")
    done = [e for e in every if on_lineage(e, lineage)]
    if backup_id not in (None, "", "latest"):
        chosen = find_backup(bases, backup_id, "base")
        if chosen not in done:
            raise PlanError("backup %s was taken on timeline %s after a later timeline forked off it (an earlier "
                            "restore): recovery along the newest timeline cannot start from it; pass --timeline %s "
                            "to follow its own timeline" % (chosen.name, chosen.info.get("timeline") or 1,
                                                           chosen.info.get("timeline") or 1))
    if not done:
        raise PlanError("every complete base backup lies on a timeline abandoned by an earlier restore: pass "
                        "--timeline with the timeline to follow")
    notes = []
    if target.kind == "time":
        window = recovery_window(done, newest_wal_at)
        if window and target.value > window[1]:
            raise PlanError("target %s is after the newest archived WAL (%s): the archive cannot reach it. The "
                            "recovery window is %s .. %s" % (show_time(target.value), show_time(window[1]),
                                                             show_time(window[0]), show_time(window[1])))
        if window is None and newest_wal_at is None:
            raise PlanError("the WAL archive holds no segment: no point in time can be reached")
        fitting = [e for e in done if ended_at(e) + MARGIN <= target.value]
        if backup_id not in (None, "", "latest"):
            entry = find_backup(bases, backup_id, "base")
            if entry not in fitting:
                raise PlanError("backup %s ended at %s, after the target %s: choose an older backup or a later "
                                "time" % (entry.name, show_time(ended_at(entry)), show_time(target.value)))
            return entry, notes
        if not fitting:
            raise PlanError("target %s is before the oldest complete base backup ended (%s): the recovery "
                            "window is %s .. %s" % (show_time(target.value), show_time(ended_at(done[0])),
                                                    show_time(window[0]) if window else "-",
                                                    show_time(window[1]) if window else "-"))
        return fitting[-1], notes
    if backup_id not in (None, "", "latest"):
        return find_backup(bases, backup_id, "base"), notes
    if target.kind == "lsn":
        goal = wal_chain.parse_lsn(target.value)
        fitting = [e for e in done if e.info.get("stop_lsn") and wal_chain.parse_lsn(e.info["stop_lsn"]) <= goal]
        if not fitting:
            raise PlanError("LSN %s is before the end of the oldest complete base backup (%s)"
                            % (target.value, done[0].info.get("stop_lsn")))
        return fitting[-1], notes
    if target.kind in ("name", "xid"):
        notes.append("starting from the oldest complete backup %s, the only one sure to begin before %s %s; "
                     "pass --backup to start from a later one taken before it" % (done[0].name, target.kind,
                                                                                 target.value))
        return done[0], notes
    return done[-1], notes


def db_point(target, base):
    """The time the restored database will represent, when known: the target time, the base backup's end
    (immediate), else None (latest, name, xid, lsn: somewhere up to the newest archived WAL)."""
    if target.kind == "time":
        return target.value
    if target.kind == "immediate":
        return ended_at(base)
    return None


def snapshot_to_restore(snapshots, for_time=None, snapshot_id=None):
    """(entry, warnings) for ``restore.py contentstore``: the snapshot named by ``snapshot_id``, else the one
    that pairs with the database time ``for_time`` (text, see :func:`parse_time`), else the newest DONE one.
    Raises PlanError."""
    point = parse_time(for_time) if for_time else None
    if point is None and not snapshot_id:
        return find_backup(snapshots, "latest", "contentstore"), []
    return choose_snapshot(snapshots, point, snapshot_id)


def choose_snapshot(snapshots, point, snapshot_id=None, newest_wal_at=None):
    """(entry, warnings): the first DONE snapshot that started at or after ``point`` (an aware datetime).

    ``point`` None (latest and friends): the newest DONE snapshot, with a warning when it started before the
    newest archived WAL. ``snapshot_id`` overrides the choice (a warning when it is older than ``point``).
    Raises PlanError when nothing fits."""
    done = [e for e in _done(snapshots) if started_at(e) is not None]
    if not done:
        raise PlanError("no complete (DONE) contentstore snapshot exists")
    warnings = []
    if snapshot_id not in (None, "", "latest"):
        entry = find_backup(snapshots, snapshot_id, "contentstore")
        if point is not None and started_at(entry) < point:
            warnings.append("snapshot %s started at %s, BEFORE the database point %s: documents created in "
                            "between will have no content" % (entry.name, show_time(started_at(entry)),
                                                              show_time(point)))
        return entry, warnings
    if point is None:
        entry = done[-1]
        if newest_wal_at is not None and started_at(entry) < newest_wal_at:
            warnings.append("the newest snapshot %s started at %s, before the newest archived WAL (%s): content "
                            "added after it is missing from it (restore the database to %s or earlier for a "
                            "consistent pair)" % (entry.name, show_time(started_at(entry)),
                                                  show_time(newest_wal_at), show_time(started_at(entry))))
        return entry, warnings
    fitting = [e for e in done if started_at(e) >= point]
    if not fitting:
        raise PlanError("no complete snapshot started at or after %s (the newest, %s, started at %s): the "
                        "database would reference content no snapshot holds. Restore the database to %s or "
                        "earlier, or pass --snapshot to accept the gap" % (
                            show_time(point), done[-1].name, show_time(started_at(done[-1])),
                            show_time(started_at(done[-1]))))
    return fitting[0], warnings


def choose_config(configs, base):
    """The DONE config copy of the base backup's night: the first that started at or after the base
    started, else the newest; None when there is none."""
    done = [e for e in configs if e.status == catalog.DONE]
    after = [e for e in done if started_at(e) and started_at(base) and started_at(e) >= started_at(base)]
    if after:
        return after[0]
    return done[-1] if done else None


def check_wal_reach(target, chain_ok, reach_end, first_missing):
    """Refuse targets a broken WAL chain cannot reach. ``reach_end``: time of the last segment before the
    first gap; ``first_missing``: that gap's first segment name. Raises PlanError."""
    if chain_ok or target.kind == "immediate":
        return
    where = "WAL segment %s is missing from the archive" % first_missing
    if target.kind == "time":
        if reach_end is None or target.value > reach_end:
            raise PlanError("%s: recovery can reach only about %s, before the target %s"
                            % (where, show_time(reach_end), show_time(target.value)))
        return
    raise PlanError("%s: a restore to %s would stop silently at the gap (about %s). Pass --target-time at or "
                    "before that time to accept it" % (where, describe_target(target), show_time(reach_end)))


# ---------------------------------------------------------------- after the restore

def content_relpath(content_url):
    """'store://2024/3/7/14/5/<uuid>.bin' -> '2024/3/7/14/5/<uuid>.bin'; None for another store or a URL
    that would leave the snapshot (.., absolute, empty parts)."""
    if not content_url or not content_url.startswith("store://"):
        return None
    rel = content_url[len("store://"):]
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in rel:
        return None
    return rel


def rollback_commands(alfresco_sh, moves, archive_dir=None, abandoned_dir=None, new_timeline=None):
    """Shell lines that undo an in-place restore. ``moves``: [(original, moved_aside, restored_aside)]:
    the restored ``original`` is moved to ``restored_aside`` and ``moved_aside`` back. With
    ``new_timeline``, that timeline's files leave ``archive_dir`` for ``abandoned_dir`` (later restores
    would otherwise follow the abandoned timeline)."""
    q = shlex.quote
    lines = ["%s stop" % q(alfresco_sh)]
    for original, moved_aside, restored_aside in moves:
        lines.append("mv %s %s" % (q(original), q(restored_aside)))
        lines.append("mv %s %s" % (q(moved_aside), q(original)))
    if new_timeline and archive_dir and abandoned_dir:
        lines.append("mkdir -p %s" % q(abandoned_dir))
        lines.append("find %s -maxdepth 1 -name %s -exec mv {} %s \\;" % (
            q(archive_dir), q("%08X*" % new_timeline), q(abandoned_dir + "/")))
    lines.append("%s start" % q(alfresco_sh))
    return lines
