"""``backup.py --offsite-audit``: the periodic full comparison of the off-site copy with the local record.

The nightly shipping trusts its record and never lists the bucket; the audit does (one LIST request per
1,000 objects, plus, for objects uploaded in parts, one HEAD each for their MD5), say weekly from cron:

- an object the record calls shipped that the remote lacks is queued again and re-sent by the normal,
  add-only path (``--immutable``);
- an object of another size, or whose MD5 differs from the one verified at upload (or, where none was
  recorded, from the local file's), is **corrupted**: it is re-sent with ``--immutable`` dropped, the one
  place where this project overwrites an object off-site (so the audit's credentials need overwrite rights;
  under S3 Object Lock the corrupted version stays, locked, below the good one);
- an object gone both off-site and locally (off-site retention removed it, or it is lost) leaves the record,
  with a note;
- DONE local backups the record lacks are taken in, as by ``--offsite``.
A crypt remote has no MD5 of the plain content: there only sizes are compared.
"""

import os

import catalog
import lock
import offsite
import rclone

SHOW = 10


def local_path(cfg, row):
    """The local file behind a record row (content: in its source snapshot)."""
    if row["key"].startswith("content/"):
        return os.path.join(catalog.kind_dir(cfg.BACKUP_DIR, "contentstore"), row["source"] or "",
                            row["key"][len("content/"):])
    return row["source"]


def compare(shipped, listing):
    """(missing, suspicious) keys, pure: ``shipped`` {key: (size, md5)} from the record, ``listing`` {key: (size,
    md5 or None)} from the remote. Suspicious: another size, or both MD5s known and different."""
    missing, suspicious = [], []
    for key, (size, md5) in sorted(shipped.items()):
        if key not in listing:
            missing.append(key)
            continue
        remote_size, remote_md5 = listing[key]
        if size is not None and remote_size is not None and remote_size != size:
            suspicious.append(key)
        elif md5 and remote_md5 and md5 != remote_md5:
            suspicious.append(key)
    return missing, suspicious


def audit(cfg, log):
    """Run the audit under the off-site lock. Returns {'failures', 'notes', 'lines', 'files', 'bytes'}."""
    report = {"failures": [], "notes": [], "lines": [], "files": 0, "bytes": 0}
    held = lock.BackupLock(cfg.BACKUP_DIR, lock.OFFSITE_LOCK_NAME)
    try:
        held.acquire()
    except lock.LockHeld as exc:
        report["notes"].append("audit skipped: %s" % exc)
        return report
    try:
        job = offsite.Run(cfg, log)
        try:
            _audit(cfg, log, job, report)
        finally:
            job.state.close()
    finally:
        held.release()
    return report


def _audit(cfg, log, job, report):
    state = job.state
    run_id = state.start_run("audit")
    log.info("audit: listing the whole off-site copy %s", job.remote.root)
    listing = {item["Path"]: (item.get("Size"), (item.get("Hashes") or {}).get("md5"))
               for item in job.remote.lsjson("", recursive=True, hashes=True)
               if not os.path.basename(item["Path"]).startswith(".")}
    shipped = state.shipped_objects("")
    missing, suspicious = compare(shipped, listing)
    corrupted = [state.object(key) for key in suspicious]
    for key, (_size, md5) in shipped.items():  # no MD5 recorded: the local file says what it must be
        remote_md5 = listing.get(key, (None, None))[1]
        if not md5 and remote_md5 and key not in suspicious:
            row = state.object(key)
            path = local_path(cfg, row)
            if os.path.isfile(path) and rclone.md5_of(path) != remote_md5:
                corrupted.append(row)
    gone, resend = [], []
    for key in missing:
        row = state.object(key)
        if os.path.isfile(local_path(cfg, row)):
            resend.append(key)
        else:
            gone.append(key)
    for key in resend:
        report["lines"].append("missing off-site, re-sent: %s" % key)
    for row in corrupted:
        report["lines"].append("corrupted off-site (size %s, MD5 %s; expected size %s, MD5 %s), re-sent: %s" % (
            listing[row["key"]][0], listing[row["key"]][1], row["size"], row["md5"] or "-", row["key"]))
    for line in report["lines"]:
        log.warning("audit: %s", line)
    if gone:
        state.db.executemany("DELETE FROM objects WHERE key = ?", ((k,) for k in gone))
        report["notes"].append("%d objects are neither off-site nor local any more (removed by off-site retention, "
                               "or lost): forgotten by the record, e.g. %s" % (len(gone), ", ".join(gone[:SHOW])))
    state.mark_unshipped(resend)
    fixable = [r for r in corrupted if os.path.isfile(local_path(cfg, r))]
    for row in corrupted:
        if row not in fixable:
            report["failures"].append("%s is corrupted off-site and no local copy is left to re-send" % row["key"])
    if fixable:
        state.mark_unshipped([r["key"] for r in fixable])
        job.send([(r["key"], r["size"], r["source"], r["first_set"]) for r in fixable], overwrite=True)
    job.ship_wal()
    job.queue_sets()
    job.ship_sets()
    report["failures"] += job.failures
    report["notes"] += job.notes
    report["files"], report["bytes"] = job.files, job.bytes
    foreign = len(set(listing) - set(shipped))
    report["notes"].append("audit: %d objects off-site, %d in the record; %d missing, %d corrupted%s" % (
        len(listing), len(shipped), len(missing), len(corrupted),
        "; %d off-site objects the record does not know (another installation's, or from before this record)"
        % foreign if foreign else ""))
    state.end_run(run_id, not report["failures"], job.files, job.bytes,
                  "; ".join(report["failures"])[:2000] if report["failures"] else None)
