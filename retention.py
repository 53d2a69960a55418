"""Which backups to keep and which to delete, and deleting them safely.

:func:`plan_retention` is pure: it takes the catalog's entries and returns a :class:`RetentionPlan` with one
:class:`Decision` per entry, warnings, and the values WAL pruning needs (``wal_keep_from``,
``keep_backup_labels``; ``wal.wal_prune_plan`` does the pruning). :func:`apply_plan` carries the plan out.

Rules (see :func:`plan_retention`): only DONE backups count; the newest DONE backup of every kind and the
``min_count`` newest survive however old they are, so a run of failed nights never empties BACKUP_DIR;
age comes from the timestamp in the name, never from mtime (rsync copies the source's mtime onto a new
snapshot); each kept base backup keeps a contentstore snapshot and a config copy it can be restored with.

Deleting (:func:`delete_entry`) renames to ``NAME.partial`` first, then drops the metadata, then the tree. A
delete killed at any moment therefore leaves a ``.partial`` directory (PARTIAL) -- never something that looks
DONE -- and the next plan made under the backup lock deletes it. Only exact backup names that are provably
partial or failed (or DONE and past the window) are ever deleted: anything else is kept and reported.
"""

import datetime
import logging
import os
import re
import time

import catalog
from tree_delete import remove_tree

DAY = datetime.timedelta(days=1)
# A WAITING_FOR_WAL backup younger than this may still see its last WAL segment archived.
WAITING_GRACE = DAY
_SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")

KEEP = "keep"
DELETE = "delete"


class Decision:
    """What happens to one :class:`catalog.BackupEntry`: ``action`` (``"keep"``/``"delete"``) and why."""

    def __init__(self, entry, action, reason):
        self.entry = entry
        self.action = action
        self.reason = reason

    def __repr__(self):
        return f"Decision({self.entry.kind}/{self.entry.name}, {self.action}, {self.reason!r})"


class RetentionPlan:
    """The outcome of :func:`plan_retention`.

    ``decisions`` (list of :class:`Decision`, by kind then oldest first), ``warnings`` (list of str),
    ``wal_keep_from`` (WAL segment name of the oldest kept base backup's start, or None: then WAL must not
    be pruned at all), ``keep_backup_labels`` (set of ``*.backup`` label file names of kept base backups).
    """

    def __init__(self, decisions, warnings, wal_keep_from, keep_backup_labels, now, retention_days, min_count):
        self.decisions = decisions
        self.warnings = warnings
        self.wal_keep_from = wal_keep_from
        self.keep_backup_labels = keep_backup_labels
        self.now = now
        self.retention_days = retention_days
        self.min_count = min_count

    def to_delete(self):
        """The entries to delete, in decision order."""
        return [d.entry for d in self.decisions if d.action == DELETE]

    def kept(self):
        """The entries to keep, in decision order."""
        return [d.entry for d in self.decisions if d.action == KEEP]

    def format(self):
        """A human-readable table of every decision, then the warnings and the WAL boundary (str)."""
        header = ("KIND", "NAME", "STATUS", "AGE(d)", "ACTION", "REASON")
        rows = []
        for decision in self.decisions:
            entry = decision.entry
            age = (self.now - entry.taken_at).total_seconds() / 86400.0
            rows.append((entry.kind, os.path.basename(entry.path), entry.status, f"{age:.1f}",
                         decision.action.upper(), decision.reason))
        widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(5)]
        when = self.now.strftime("%Y-%m-%d %H:%M:%S")
        title = (f"Retention plan at {when}: {self.retention_days}-day window, "
                 f"at least {max(self.min_count, 1)} DONE backup(s) per kind")
        lines = [title]
        for row in [header] + rows:
            cells = [row[i].rjust(widths[i]) if i == 3 else row[i].ljust(widths[i]) for i in range(5)]
            lines.append("  ".join(cells + [row[5]]).rstrip())
        if not rows:
            lines.append("(no backups found)")
        lines.append(f"{len(self.to_delete())} to delete, {len(self.kept())} to keep")
        if self.wal_keep_from:
            lines.append(f"WAL archive: keep from segment {self.wal_keep_from}")
        else:
            lines.append("WAL archive: nothing will be pruned")
        if self.keep_backup_labels:
            labels = ", ".join(sorted(self.keep_backup_labels))
            lines.append(f"WAL backup labels kept: {labels}")
        for warning in self.warnings:
            lines.append(f"WARNING: {warning}")
        return "\n".join(lines) + "\n"


class ApplyResult:
    """What :func:`apply_plan` did: ``deleted`` (names), ``failed`` ((name, error text) pairs), ``seconds``."""

    def __init__(self, deleted, failed, seconds):
        self.deleted = deleted
        self.failed = failed
        self.seconds = seconds

    def __repr__(self):
        return f"ApplyResult(deleted={self.deleted!r}, failed={self.failed!r}, seconds={self.seconds:.1f})"


def collect(backup_dir):
    """``{kind: [BackupEntry, ...] oldest first}`` for every kind in :data:`catalog.KINDS`. Raises OSError."""
    return {kind: catalog.list_backups(backup_dir, kind) for kind in catalog.KINDS}


def _key(entry):
    return (entry.kind, entry.path)


def _age_days(now, entry):
    return (now - entry.taken_at).total_seconds() / 86400.0


def _done(entries):
    # A directory without a backup name of ours (e.g. base-...-keep) is never counted, paired or deleted.
    return sorted((e for e in entries if e.status == catalog.DONE and e.name_parsed),
                  key=lambda e: (e.taken_at, e.name))


def plan_retention(entries_by_kind, now, retention_days, min_count=1, lock_free=True, current_names=()):
    """Decide, for every entry, keep or delete.

    ``entries_by_kind``: ``{kind: [BackupEntry]}`` as from :func:`collect`. ``now``: naive local datetime
    (names carry local time). ``retention_days``: DONE backups older than this many days go.
    ``min_count``: that many newest DONE backups per kind stay however old (the newest always does).
    ``lock_free``: True when the caller holds the backup lock, so no run is writing a non-DONE entry and
    those may be deleted. ``current_names``: names of the current run's entries, never deleted.

    Rules: (1) only DONE counts; newest DONE per kind and the ``min_count`` newest are kept. (2) older
    DONE go when older than the window. (3) FAILED / PARTIAL go when ``lock_free``; INCOMPLETE (no readable
    metadata) and directories whose name is not one we write are kept and reported in ``warnings``;
    WAITING_FOR_WAL stays for a day, then goes (also only when ``lock_free``: a run holding the lock may
    be promoting it). (4) each kept DONE base backup keeps the oldest DONE contentstore snapshot taken at
    or after it (a database must never point at content its snapshot lacks), and the oldest DONE config
    copy at or after it, else the newest before it.

    Returns a :class:`RetentionPlan`. Raises ValueError for a negative ``retention_days``/``min_count``.
    """
    if retention_days < 0 or min_count < 0:
        raise ValueError("retention_days and min_count must not be negative")
    window = datetime.timedelta(days=retention_days)
    current = set(current_names)
    keep_reasons = {}
    warnings = []

    for kind, entries in entries_by_kind.items():
        done = _done(entries)
        if not done:
            warnings.append(f"no DONE {kind} backup at all")
        for index, entry in enumerate(reversed(done)):
            reasons = []
            if index == 0:
                reasons.append(f"newest DONE {kind} backup is never deleted")
            elif index < min_count:
                reasons.append(f"minimum count: one of the {min_count} newest DONE {kind} backups")
            # Naive local times: across a DST change an age is off by one hour at most.
            if now - entry.taken_at <= window:
                reasons.append(f"within the {retention_days}-day retention window")
            if reasons:
                keep_reasons[_key(entry)] = reasons

    kept_bases = [e for e in _done(entries_by_kind.get("postgres", [])) if _key(e) in keep_reasons]
    _pair(kept_bases, _done(entries_by_kind.get("contentstore", [])), "contentstore snapshot", False,
          keep_reasons, warnings)
    _pair(kept_bases, _done(entries_by_kind.get("config", [])), "config copy", True, keep_reasons, warnings)

    decisions = []
    kinds = [k for k in catalog.KINDS if k in entries_by_kind]
    kinds += sorted(k for k in entries_by_kind if k not in catalog.KINDS)
    for kind in kinds:
        for entry in sorted(entries_by_kind[kind], key=lambda e: (e.taken_at, e.name)):
            action, reason = _decide(entry, now, retention_days, lock_free, current, keep_reasons)
            if action == KEEP and reason.startswith(UNKNOWN):
                warnings.append("%s/%s: %s" % (kind, os.path.basename(entry.path), reason))
            decisions.append(Decision(entry, action, reason))

    wal_keep_from, labels = _wal_needs(decisions, warnings)
    return RetentionPlan(decisions, warnings, wal_keep_from, labels, now, retention_days, min_count)


def _moment(entry, key):
    """The exact UTC time ``key`` (started_at/ended_at) from the metadata, else the name's local time."""
    exact = catalog.parse_iso(entry.info.get(key))
    return exact if exact is not None else entry.taken_at.astimezone(datetime.timezone.utc)


def _pair(kept_bases, candidates, what, fallback_older, keep_reasons, warnings):
    """Add a keep reason to each kept base backup's partner among DONE ``candidates`` (oldest first): the
    first one started at or after the base backup ended, the pair a restore uses (restore_plan)."""
    partners = {}
    for base in kept_bases:
        partner = None
        for candidate in candidates:
            if _moment(candidate, "started_at") >= _moment(base, "ended_at"):
                partner = candidate
                break
        if partner is None and fallback_older:
            older = [c for c in candidates if _moment(c, "started_at") < _moment(base, "ended_at")]
            partner = older[-1] if older else None
        if partner is None:
            if fallback_older:
                warnings.append(f"no DONE {what} at all for kept base backup {base.name}")
            else:
                warnings.append(f"no DONE {what} taken at or after kept base backup {base.name}: "
                                "it cannot be restored as a consistent set")
            continue
        partners.setdefault(_key(partner), []).append(base.name)
    for key, bases in partners.items():
        names = ", ".join(bases)
        keep_reasons.setdefault(key, []).append(f"paired {what} of kept base backup {names}")


UNKNOWN = "not deleted:"


def _decide(entry, now, retention_days, lock_free, current, keep_reasons):
    """(action, reason) for one entry. Only exact backup names are ever deleted, and of those only DONE ones
    past the window and ones provably partial or failed; what this tool cannot account for is kept and
    reported (a copy set aside by hand, a backup copied in without its metadata, a damaged .json)."""
    status = entry.status
    if not entry.name_parsed:
        return KEEP, ("%s the name is not one this tool writes (%s-YYYY-MM-DD_HH-MM-SS): kept; delete it by "
                      "hand when it is not needed" % (UNKNOWN, catalog.KINDS.get(entry.kind, entry.kind)))
    if status == catalog.INCOMPLETE:
        return KEEP, ("%s no readable metadata (%s): kept; this tool never leaves such a directory behind. "
                      "Put its .json back, or delete it by hand" % (UNKNOWN, os.path.basename(
                          catalog.info_path(entry.path))))
    if status == catalog.DONE:
        if _key(entry) in keep_reasons:
            return KEEP, "; ".join(keep_reasons[_key(entry)])
        age = _age_days(now, entry)
        return DELETE, f"older than the {retention_days}-day retention window ({age:.1f} days)"
    if entry.name in current:
        return KEEP, f"{status}, belongs to the current run"
    no_lock = "kept: the backup lock is not held, a run may be writing it"
    if status == catalog.WAITING_FOR_WAL:
        if now - entry.taken_at < WAITING_GRACE:
            return KEEP, "WAITING_FOR_WAL younger than 1 day: the backup may still be completing"
        if not lock_free:
            return KEEP, f"WAITING_FOR_WAL older than 1 day, {no_lock}"
        return DELETE, "WAITING_FOR_WAL for more than 1 day: failed to complete"
    if not lock_free:
        return KEEP, f"{status} backup, {no_lock}"
    if status == catalog.PARTIAL:
        return DELETE, "partial left by an interrupted run"
    return DELETE, "FAILED backup, not needed"


def _wal_needs(decisions, warnings):
    """(wal_keep_from, keep_backup_labels) from the kept DONE and WAITING_FOR_WAL base backups.

    WAITING_FOR_WAL bases count too: once their WAL arrives they are restore sources and need it.
    """
    bases = [d.entry for d in decisions if d.action == KEEP and d.entry.kind == "postgres"
             and d.entry.status in (catalog.DONE, catalog.WAITING_FOR_WAL)]
    labels = set()
    starts = []
    unknown = []
    for base in bases:
        label = base.info.get("backup_label_file")
        if isinstance(label, str) and label:
            labels.add(label)
        start = base.info.get("start_wal_file")
        if isinstance(start, str) and _SEGMENT_RE.match(start):
            starts.append(start)
        else:
            unknown.append(base.name)
    if unknown:
        names = ", ".join(unknown)
        warnings.append(f"kept base backup(s) {names} have no valid start_wal_file: WAL must not be pruned")
        return None, labels
    # Segment names sort in WAL order (timeline first, then log and segment numbers, fixed-width hex).
    return (min(starts) if starts else None), labels


# ---------------------------------------------------------------------------------------------- applying


def apply_plan(plan, log=None):
    """Delete every entry ``plan`` marks for deletion, each with :func:`delete_entry`.

    Make the plan right before, under the backup lock. ``log``: a logging.Logger. A failure is
    recorded and the next entry tried. Returns an :class:`ApplyResult`; raises nothing for a failed
    delete (see ``failed``).
    """
    log = log or logging.getLogger("retention")
    started = time.monotonic()
    deleted, failed = [], []
    for entry in plan.to_delete():
        one_start = time.monotonic()
        try:
            delete_entry(entry)
        except OSError as exc:
            log.error("could not delete %s backup %s: %s", entry.kind, entry.name, exc)
            failed.append((entry.name, str(exc)))
            continue
        log.info("deleted %s backup %s (%s) in %.1f s", entry.kind, entry.name, entry.status,
                 time.monotonic() - one_start)
        deleted.append(entry.name)
    return ApplyResult(deleted, failed, time.monotonic() - started)


def delete_entry(entry):
    """Delete one backup: rename it to ``NAME.partial``, then drop its metadata, then remove the tree.
    Raises OSError.

    Order matters: the rename is atomic, and from that instant the directory reads PARTIAL whatever its
    metadata says ("partial left by an interrupted run", deleted by the next plan under the lock), so a delete
    killed at any moment never leaves something that looks DONE, nor a metadata-less directory of an exact
    name (which retention keeps and reports, since it cannot tell it from a backup copied in by hand).
    """
    _check_deletable(entry)
    path = rename_to_partial(entry)
    drop_metadata(entry)
    remove_tree(path)


def _check_deletable(entry):
    base = os.path.basename(entry.path.rstrip("/"))
    prefix = catalog.KINDS.get(entry.kind, "\0") + "-"
    if not base.startswith(prefix) or catalog.parse_name_time(base) is None or os.path.islink(entry.path):
        raise OSError(f"refusing to delete {entry.path}: not a {entry.kind} backup directory")


def drop_metadata(entry):
    """Remove ``entry``'s metadata file (and a stale ``.tmp`` of it), durably. Raises OSError."""
    meta = catalog.info_path(entry.path)
    for path in (meta, meta + ".tmp"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    catalog.fsync_dir(os.path.dirname(meta))


def remove_orphan_metadata(backup_dir, log=None):
    """Delete ``NAME.json`` (and ``.json.tmp``) files whose ``NAME`` and ``NAME.partial`` directories are both
    gone (left by a delete or a backup killed between two steps): metadata alone is not a backup. Returns
    the names removed."""
    removed = []
    for kind, prefix in catalog.KINDS.items():
        folder = catalog.kind_dir(backup_dir, kind)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            base = name[:-len(".json.tmp")] if name.endswith(".json.tmp") else name[:-len(".json")] \
                if name.endswith(".json") else None
            if base is None or catalog.parse_name_time(base) is None or not base.startswith(prefix + "-"):
                continue
            if any(os.path.lexists(os.path.join(folder, d)) for d in (base, base + catalog.PARTIAL_SUFFIX)):
                continue
            os.unlink(os.path.join(folder, name))
            removed.append(name)
            if log:
                log.info("removed %s/%s: its backup directory is gone", kind, name)
    return removed


def rename_to_partial(entry):
    """Rename ``entry``'s directory to ``NAME.partial`` durably; return the path to remove next.

    Already ``.partial``: returned as is. When a ``NAME.partial`` is in the way the directory keeps its
    name (it is INCOMPLETE already, the metadata being gone). Raises OSError.
    """
    path = entry.path.rstrip("/")
    if path.endswith(catalog.PARTIAL_SUFFIX):
        return path
    target = path + catalog.PARTIAL_SUFFIX
    if os.path.lexists(target):
        return path
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return target if os.path.lexists(target) else path
    catalog.fsync_dir(os.path.dirname(path))
    return target
