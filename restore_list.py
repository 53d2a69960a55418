"""``restore.py list``: the backups, their pairs, the WAL archive and the recovery window (read only)."""

import json

import catalog
import restore_db
import restore_plan


def pair_of(base, snapshots):
    """The name of the first DONE snapshot in ``snapshots`` that started after base backup ``base`` ended
    (the one a restore of it pairs with), or None."""
    ended = restore_plan.ended_at(base)
    for snap in snapshots:
        if snap.status == catalog.DONE and ended and restore_plan.started_at(snap) and \
                restore_plan.started_at(snap) >= ended:
            return snap.name
    return None


def show(cfg, as_json):
    """Print every backup of ``cfg.BACKUP_DIR`` (with the snapshot each base backup pairs with), the WAL
    archive's chain and the recovery window: as a table, or with ``as_json`` as one JSON object."""
    kinds = {kind: catalog.list_backups(cfg.BACKUP_DIR, kind) for kind in catalog.KINDS}
    facts = restore_db.archive_facts(cfg.wal_archive_dir)
    window = restore_plan.recovery_window(kinds["postgres"], facts.newest_at)
    done = [b for b in kinds["postgres"] if b.status == catalog.DONE]
    chain = restore_db.chain_from(done[0], facts) if done else None
    if chain and not chain.ok and window:
        window = (window[0], chain.reach_end or window[0])
    rows = {kind: [{"name": e.name, "status": e.status, "started_at": e.info.get("started_at"),
                    "ended_at": e.info.get("ended_at"), "size_bytes": e.info.get("size_bytes"),
                    "server_version": e.info.get("server_version"),
                    "pairs_with": pair_of(e, kinds["contentstore"]) if kind == "postgres" else None}
                   for e in entries] for kind, entries in kinds.items()}
    info = {"backups": rows, "window": {"from": window[0].isoformat(), "to": window[1].isoformat()} if window
            else None, "wal": {"archive_dir": facts.archive_dir, "segments": len(facts.mtimes),
                               "newest_at": facts.newest_at.isoformat() if facts.newest_at else None,
                               "chain": chain.report.describe() if chain and chain.report else None}}
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return
    for kind, entries in rows.items():
        print("%s backups in %s:" % (kind, catalog.kind_dir(cfg.BACKUP_DIR, kind)))
        for row in entries or [{"name": "(none)"}]:
            if "status" not in row:
                print("  (none)")
                continue
            ended = catalog.parse_iso(row["ended_at"])
            print("  %-32s %-15s ended %-25s %10s%s%s" % (
                row["name"], row["status"], restore_plan.show_time(ended),
                catalog.human_size(row["size_bytes"]), "  PG " + row["server_version"] if row["server_version"] else "",
                "  pairs with " + (row["pairs_with"] or "no snapshot yet") if kind == "postgres" else ""))
    print("WAL archive %s: %d segments, newest %s" % (facts.archive_dir, len(facts.mtimes),
                                                       restore_plan.show_time(facts.newest_at)))
    if chain and chain.report:
        print("  " + chain.report.describe())
    if window:
        print("Recovery window: any moment from %s to %s" % tuple(restore_plan.show_time(w) for w in window))
    else:
        print("Recovery window: none (no complete base backup, or no archived WAL)")
