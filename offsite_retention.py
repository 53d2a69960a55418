"""``backup.py --offsite-retention [--dry-run]``: thin out the off-site copy. It reads only the remote (not
BACKUP_DIR, not the local record), so it can run on another host with credentials that may delete, while the
server's own credentials may only add.

:func:`plan` is pure. Sets (base backup, contentstore night, config copy) are judged by retention.py's own
rules on the remote catalog, with OFFSITE_RETENTION_DAYS and OFFSITE_RETENTION_MIN_COUNT; sets still being
uploaded (no metadata yet, or a base backup whose last WAL segment is not off-site) are kept unless they
are older than both the window and the newest complete set. On top of those rules, the **newest complete set**
(the newest off-site complete base backup that has a complete night taken after it) is always kept, with its
night and config. WAL goes only below the start segment of the oldest kept base backup (wal.wal_prune_plan).
A content object goes only when no kept night's manifest lists it, nor a manifest still being uploaded.

Why that is safe against a shipper running at the same time: the shipper sends a night's manifest before
its content, and :func:`read_remote` lists the content before the manifests, so every content object seen has
its manifest seen too. An object a new night lists and an old, deleted night listed was in every night in
between (Alfresco never brings a content file back), so the newest complete night, always kept, lists it.
Deleting a set removes its metadata first: an interrupted run never leaves something that looks complete.
"""

import datetime

import catalog
import offsite_remote
import retention
import wal

KEEP, DELETE = retention.KEEP, retention.DELETE
META_KEY = {"postgres": "postgres/%s.json", "config": "config/%s.json", "contentstore": "manifests/%s.json"}


class OffsitePlan:
    """``decisions`` [(entry, action, reason)], ``delete_manifests`` [name] (manifest objects of deleted nights
    or of abandoned uploads), ``delete_wal`` [name], ``delete_content`` [relpath], ``wal_keep_from``,
    ``warnings``."""

    def __init__(self, decisions, delete_manifests, delete_wal, delete_content, wal_keep_from, warnings, days):
        self.decisions, self.delete_manifests, self.delete_wal = decisions, delete_manifests, delete_wal
        self.delete_content, self.wal_keep_from = delete_content, wal_keep_from
        self.warnings, self.days = warnings, days

    def deleted_sets(self):
        return [e for e, action, _r in self.decisions if action == DELETE]

    def format(self):
        lines = ["off-site retention plan (%d days):" % self.days]
        for entry, action, reason in self.decisions:
            lines.append("  %-6s %-12s %-34s %-16s %s" % (action.upper(), entry.kind, entry.name, entry.status, reason))
        lines.append("  WAL: %s; delete %d files%s" % (
            "keep from %s" % self.wal_keep_from if self.wal_keep_from else "nothing is pruned", len(self.delete_wal),
            " (%s .. %s)" % (self.delete_wal[0], self.delete_wal[-1]) if self.delete_wal else ""))
        lines.append("  content: delete %d objects no kept night lists%s" % (
            len(self.delete_content), " (e.g. %s)" % ", ".join(self.delete_content[:3]) if self.delete_content else ""))
        lines += ["  warning: %s" % w for w in self.warnings]
        return "\n".join(lines)


def _moment(entry, key):
    value = catalog.parse_iso(entry.info.get(key))
    return value if value is not None else entry.taken_at.astimezone(datetime.timezone.utc)


def newest_complete_set(entries):
    """(base, snapshot) of the newest DONE base backup with a DONE night started at or after its end, or None."""
    snapshots = [s for s in entries.get("contentstore", []) if s.status == catalog.DONE]
    for base in reversed([b for b in entries.get("postgres", []) if b.status == catalog.DONE]):
        paired = [s for s in snapshots if _moment(s, "started_at") >= _moment(base, "ended_at")]
        if paired:
            return base, paired[0]
    return None


def plan(cat, now, days, min_count, manifests):
    """The plan for RemoteCatalog ``cat`` at naive local ``now``. ``manifests`` maps a night's name to the
    set of relpaths its manifest lists (looked up only for kept nights; a KeyError keeps every content
    object). Pure. Raises ValueError for negative settings."""
    entries = cat.entries
    base_plan = retention.plan_retention(entries, now, days, min_count=min_count, lock_free=False)
    warnings = list(base_plan.warnings)
    actions = {(d.entry.kind, d.entry.name): [d.entry, d.action, d.reason] for d in base_plan.decisions}
    complete = newest_complete_set(entries)
    newest_time = complete[0].taken_at if complete else None
    if complete:
        partners = list(complete) + [c for c in [restore_config(entries, complete[0])] if c is not None]
        for entry in partners:
            item = actions[(entry.kind, entry.name)]
            if item[1] == DELETE:
                item[1], item[2] = KEEP, "part of the newest complete set off-site (%s)" % complete[0].name
    else:
        warnings.append("no complete set (base backup, its WAL and a night after it) is off-site: nothing old is "
                        "deleted")
    window = datetime.timedelta(days=days)
    for item in actions.values():
        entry = item[0]
        if entry.status != catalog.DONE:
            if complete and now - entry.taken_at > window and entry.taken_at < newest_time:
                item[1], item[2] = DELETE, "%s off-site, older than the window and than the newest complete set" % (
                    "upload never completed" if entry.status == catalog.INCOMPLETE else "its last WAL never arrived")
            else:
                item[1], item[2] = KEEP, "%s off-site: may still be uploading" % entry.status
        if not complete and item[1] == DELETE:
            item[1], item[2] = KEEP, "kept: no complete set off-site yet"
    decisions = sorted(actions.values(), key=lambda i: (list(catalog.KINDS).index(i[0].kind), i[0].taken_at))
    kept = [e for e, action, _r in decisions if action == KEEP]
    night_names = {e.name for e in entries.get("contentstore", [])}
    orphans = sorted(n for n in cat.manifests if n not in night_names)  # manifest sent, metadata not yet
    delete_manifests = [e.name for e, action, _r in decisions
                        if action == DELETE and e.kind == "contentstore" and e.name in cat.manifests]
    for name in orphans:
        taken = catalog.parse_name_time(name)
        if complete and taken and now - taken > window and taken < newest_time:
            delete_manifests.append(name)
    starts = [e.info.get("start_wal_file") for e in kept if e.kind == "postgres"]
    wal_keep_from, delete_wal = None, []
    if complete and starts and all(isinstance(s, str) and wal.is_segment_name(s) for s in starts):
        wal_keep_from = min(starts)
        labels = {e.info.get("backup_label_file") for e in kept if e.kind == "postgres"} - {None}
        delete_wal = wal.wal_prune_plan(sorted(cat.wal), wal_keep_from,
                                        keep=labels | {label + ".gz" for label in labels})
    elif complete:
        warnings.append("a kept base backup has no start_wal_file: no WAL is pruned")
    delete_content = []
    if complete and cat.content is not None:
        protect = [e.name for e in kept if e.kind == "contentstore"] + [n for n in orphans if n not in delete_manifests]
        try:
            listed = set()
            for name in protect:
                listed |= set(manifests[name])
            delete_content = sorted(rel for rel in cat.content if rel not in listed)
        except KeyError as exc:
            warnings.append("the manifest of %s could not be read: no content object is deleted" % exc)
    return OffsitePlan([tuple(d) for d in decisions], sorted(delete_manifests), delete_wal, delete_content,
                       wal_keep_from, warnings, days)


def restore_config(entries, base):
    import restore_plan

    return restore_plan.choose_config(entries.get("config", []), base)


class _Manifests(dict):
    """{night: set of relpaths}, each manifest fetched from the remote on first use."""

    def __init__(self, remote, available):
        super().__init__()
        self.remote, self.available = remote, available

    def __missing__(self, name):
        if name not in self.available:
            raise KeyError(name)
        self[name] = set(offsite_remote.manifest(self.remote, name))
        return self[name]


def read_remote(remote):
    """(RemoteCatalog with content, lazy manifests). Content is listed FIRST (see the module docstring)."""
    content = {item["Path"]: (item.get("Size"), None) for item in remote.lsjson("content", recursive=True)}
    cat = offsite_remote.read_catalog(remote)
    cat.content = {rel: v for rel, v in content.items() if not rel.rsplit("/", 1)[-1].startswith(".")}
    return cat, _Manifests(remote, cat.manifests)


def apply(remote, the_plan, log):
    """Carry ``the_plan`` out: metadata of deleted sets, then their files, then WAL, then content. Returns
    failure messages (each names the object and the remote's error); never stops at the first."""
    from rclone import RcloneError

    failures = []

    def attempt(what, func, *args):
        try:
            func(*args)
            log.info("off-site retention: deleted %s", what)
        except RcloneError as exc:
            failures.append("deleting %s: %s" % (what, exc))

    deleted = the_plan.deleted_sets()
    for entry in deleted:
        key = META_KEY[entry.kind] % entry.name
        folder, name = key.rsplit("/", 1)
        attempt(key, remote.delete_files, folder, [name])
    for entry in deleted:
        if entry.kind != "contentstore":
            attempt("%s/%s/" % (entry.kind, entry.name), remote.purge, "%s/%s" % (entry.kind, entry.name))
    if the_plan.delete_manifests:
        attempt("%d manifests" % len(the_plan.delete_manifests), remote.delete_files, "manifests",
                ["%s.tsv.gz" % n for n in the_plan.delete_manifests])
    if the_plan.delete_wal:
        attempt("%d WAL files" % len(the_plan.delete_wal), remote.delete_files, "wal", the_plan.delete_wal)
    if the_plan.delete_content:
        attempt("%d content objects" % len(the_plan.delete_content), remote.delete_files, "content",
                the_plan.delete_content)
    return failures
