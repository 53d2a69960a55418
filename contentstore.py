"""The contentstore snapshot: a copy in which files unchanged since the newest complete snapshot are hardlinks.

Every night is a plain, browsable directory ``contentstore-TS/`` in which files unchanged since the
previous complete snapshot are hardlinks of it (same inode, no space). The copy goes to
``contentstore-TS.partial/`` and is renamed only when it succeeded; a partial left by an interrupted
run is reused (renamed to tonight's partial) so a multi-TB first copy never starts from zero, and it is
never a link base.

Two engines give the same tree: ``rsync -a --link-dest`` (the first copy, and always with
``CONTENTSTORE_METHOD=rsync``) and :mod:`linktree` (nightly, when a previous snapshot exists: the same
size+mtime quick check in Python, in ``CONTENTSTORE_PARALLEL`` forked worker processes, faster than rsync).

Nightly, :mod:`linktree` compares file by file only in the directories that changed since the previous
snapshot (:func:`compare_plan`): Alfresco adds content to the current minute's directory and never
rewrites a ``.bin``, so an old, unchanged directory is hard-linked by name. Every
``CONTENTSTORE_FULL_COMPARE_DAYS`` days one night compares every file again.
"""

import datetime
import os
import re
import time

import btrfs_snapshot
import catalog
import first_copy
import linktree
import safe_files
import subprocess_utils
import tree_delete

RSYNC_VANISHED = 24  # "some files vanished before they could be transferred": normal on a live store
# A directory changed less than this before the previous snapshot started is compared file by file even
# when its mtime matches: covers the file system's timestamp granularity (1-2 s on some shares), the
# kernel's coarse clock and a small clock difference to a file server.
TRUST_MARGIN_S = 60
# A full compare is due when the last one started at least this long before the next (so a nightly run
# at 02:00 that starts a few minutes early does not push it a day later).
FULL_COMPARE_SLACK = datetime.timedelta(hours=2)


class ContentstoreError(Exception):
    """The snapshot failed; the message says why and names the path."""


def rsync_argv(source, dest, link_dest=None, extra=()):
    """The rsync command line (pure). Trailing slashes: copy the *contents* of source into dest.
    ``extra``: more options (e.g. an --exclude)."""
    argv = ["rsync", "-a", "--delete", "--numeric-ids", "--stats", "--no-human-readable"] + list(extra)
    if link_dest:
        argv.append("--link-dest=%s" % link_dest)
    argv += [source.rstrip("/") + "/", dest.rstrip("/") + "/"]
    return argv


def parse_stats(output):
    """{'files', 'regular_files', 'files_copied', 'bytes_total', 'bytes_copied'} from rsync --stats."""
    patterns = {
        "files": r"Number of files: ([\d,]+)",
        "regular_files": r"Number of files: [\d,]+ \(reg: ([\d,]+)",
        "files_copied": r"Number of regular files transferred: ([\d,]+)",
        "bytes_total": r"Total file size: ([\d,]+)",
        "bytes_copied": r"Total transferred file size: ([\d,]+)",
    }
    stats = {}
    for key, pattern in patterns.items():
        match = re.search(pattern, output)
        if match:
            stats[key] = int(match.group(1).replace(",", ""))
    return stats


def find_resumable_partial(backup_dir, tonight):
    """The newest ``contentstore-*.partial`` left by an earlier, interrupted run, or None."""
    partials = [e for e in catalog.list_backups(backup_dir, "contentstore")
                if e.status == catalog.PARTIAL and e.name != tonight]
    return partials[-1].path if partials else None


def choose_method(configured, previous_exists, on_btrfs=False):
    """'rsync', 'linktree' or 'btrfs' (pure) for CONTENTSTORE_METHOD ``configured``: btrfs subvolumes
    whenever the snapshots' folder is on btrfs (``auto``) or when asked; else linktree, which only pays
    off when there is a previous snapshot to link to; rsync for the first copy or when asked."""
    if configured == "btrfs" or (configured == "auto" and on_btrfs):
        return "btrfs"
    if configured == "rsync" or not previous_exists:
        return "rsync"
    return "linktree"


def worker_count(configured):
    """CONTENTSTORE_PARALLEL ``configured`` as the engines take it (pure): the number when > 0, else None:
    the in-process engine chooses its worker processes (linktree_workers.walk) and the first copy
    runs :func:`rsync_count` rsyncs."""
    return configured if configured > 0 else None


def rsync_count(workers, cpus=None):
    """How many rsyncs the first copy runs at once (pure): ``workers`` when set, else two per CPU core, 2 to
    8 (measured on 2 cores: four rsyncs took 0.55-0.7x the time of one, two 0.75-0.85x; see
    bench/RESULTS.md)."""
    if workers:
        return workers
    return max(2, min(8, 2 * (cpus or os.cpu_count() or 1)))


def last_full_compare(info):
    """When the newest snapshot that compared every file started (aware datetime), from a snapshot's
    metadata ``info``, or None. An rsync snapshot compared every file."""
    when = catalog.parse_iso(info.get("full_compare_at"))
    if when is None and info.get("engine") == "rsync":
        when = catalog.parse_iso(info.get("started_at"))
    return when


def compare_plan(previous_info, now, full_compare_days, margin_s=None):
    """Whether tonight may skip the per-file compare in unchanged directories (pure).

    ``previous_info``: the metadata of the link base (None: no previous snapshot). ``now``: aware datetime.
    ``full_compare_days``: CONTENTSTORE_FULL_COMPARE_DAYS (0: compare every file every night);
    ``margin_s``: default :data:`TRUST_MARGIN_S`. Returns
    ``(trust_before_ns, reason)``: ``trust_before_ns`` is None for a full compare, else the previous
    snapshot's start minus ``margin_s`` in ns since the epoch (see :func:`linktree.snapshot`)."""
    if not previous_info:
        return None, "first copy"
    if full_compare_days <= 0:
        return None, "CONTENTSTORE_FULL_COMPARE_DAYS=0: every file compared every night"
    started = catalog.parse_iso(previous_info.get("started_at"))
    last = last_full_compare(previous_info)
    if started is None or last is None:
        return None, "no full compare recorded yet"
    if now - last >= datetime.timedelta(days=full_compare_days) - FULL_COMPARE_SLACK:
        return None, "the last full compare started %s (every %d days)" % (last.isoformat(timespec="seconds"),
                                                                          full_compare_days)
    before = started - datetime.timedelta(seconds=TRUST_MARGIN_S if margin_s is None else margin_s)
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    return (before - epoch) // datetime.timedelta(microseconds=1) * 1000, \
        "only directories changed since %s are compared file by file" % before.isoformat(timespec="seconds")


def take_snapshot(source, backup_dir, name, log, timeout=0, method="auto", workers=None, full_compare_days=7):
    """Snapshot ``source`` into ``backup_dir/contentstore/name``. ``workers``: threads of the in-process
    engine and rsyncs of the first copy (None: chosen, see :func:`worker_count`); ``full_compare_days``:
    see :func:`compare_plan`. Returns the metadata dict (status DONE), also written beside the snapshot.
    Raises ContentstoreError; the partial is kept for the next run, except after "no space left", when
    keeping it would only keep the disk full."""
    started, started_iso = time.monotonic(), catalog.utc_now_iso()
    if not os.path.isdir(source):
        raise ContentstoreError("contentstore not found: %s (set CONTENTSTORE_DIR or ALF_BASE_DIR)" % source)
    dest_root = catalog.kind_dir(backup_dir, "contentstore")
    os.makedirs(dest_root, mode=0o700, exist_ok=True)
    final = os.path.join(dest_root, name)
    partial = final + catalog.PARTIAL_SUFFIX
    previous = catalog.newest_done(backup_dir, "contentstore")
    if previous and (previous.info.get("files") or 0) > 0 and not os.listdir(source):
        # An unmounted share looks exactly like this; a DONE empty snapshot would pass for a good backup.
        raise ContentstoreError("the contentstore %s is empty but %s held %s files: is its file system mounted?"
                                % (source, previous.name, previous.info.get("files")))
    btrfs_reason = btrfs_snapshot.unsupported_reason(dest_root) if method in ("auto", "btrfs") else "not asked"
    if method == "btrfs" and btrfs_reason:
        raise ContentstoreError("CONTENTSTORE_METHOD=btrfs, but %s: use auto or linktree" % btrfs_reason)
    engine = choose_method(method, previous is not None, btrfs_reason is None)
    resumed = find_resumable_partial(backup_dir, name)
    if resumed:
        log.info("reusing %s left by an interrupted run", resumed)
        if engine != "btrfs":  # btrfs_snapshot.prepare takes it over
            os.rename(resumed, partial)
    elif engine != "btrfs" and not os.path.isdir(partial):
        os.mkdir(partial, 0o700)
    log.info("snapshot engine: %s%s", engine, " (link base %s)" % previous.name if previous else "")
    trust_ns, why = compare_plan(previous.info if previous else None, catalog.parse_iso(started_iso),
                                 full_compare_days)
    if engine == "rsync":
        trust_ns, why = None, "rsync compares every file"
        stats, warnings = _run_rsync(source, partial, previous, timeout, backup_dir, workers)
    elif engine == "btrfs":
        stats, warnings, trust_ns = _run_btrfs(source, partial, previous, workers, resumed, backup_dir,
                                               log, trust_ns, why, timeout)
    else:
        log.info("compare: %s", why)
        stats, warnings = _run_linktree(source, partial, previous, workers, bool(resumed), backup_dir, log,
                                        trust_ns)
    # The snapshot root gets the source's mode from the copy; it stays private (btrfs: made so before it
    # became read-only).
    if engine != "btrfs":
        os.chmod(partial, 0o700)
    files = stats.get("regular_files", stats.get("files"))
    log.info("contentstore copied (%s files, %s bytes copied) in %.1f s; syncing the file system",
             files, stats.get("bytes_copied"), time.monotonic() - started)
    # Every copied file and new directory entry on disk before the snapshot counts: later nights hardlink
    # these files by size+mtime, so a zero-filled one after a power cut would spread into every snapshot.
    safe_files.sync_filesystem(partial)
    info = {
        "kind": "contentstore", "name": name, "status": catalog.DONE, "source": source,
        "started_at": started_iso, "ended_at": catalog.utc_now_iso(),
        "duration_s": round(time.monotonic() - started, 3),
        "link_dest": previous.name if previous else None, "resumed_partial": bool(resumed), "engine": engine,
        "files": files, "bytes_total": stats.get("bytes_total"),
        "bytes_copied": stats.get("bytes_copied"), "files_copied": stats.get("files_copied"),
        "bytes_linked": (stats.get("bytes_total") or 0) - (stats.get("bytes_copied") or 0),
        "size_bytes": stats.get("bytes_copied"), "warnings": warnings,
        "compare": "full" if trust_ns is None else "changed directories",
        "full_compare_at": started_iso if trust_ns is None else
        last_full_compare(previous.info).isoformat(timespec="microseconds"),
        "dirs_trusted": stats.get("dirs_trusted"), "dirs_compared": stats.get("dirs_compared"),
        "workers": stats.get("workers", rsync_count(workers) if engine == "rsync" and not previous else None),
    }
    if engine == "linktree":
        # What off-site shipping needs to list this snapshot from the previous one's listing plus these
        # directories (offsite_listing), instead of reading every directory of the store again.
        info["regular_bytes"] = stats.get("regular_bytes")
        info["changed_dirs"] = stats.get("changed_dirs")
    catalog.write_info(final, info)  # before the rename: see base_backup.take_base_backup
    os.rename(partial, final)
    catalog.fsync_dir(dest_root)
    return info


def _no_space(partial, backup_dir, detail):
    try:
        tree_delete.remove_tree(partial)
    except OSError:
        pass  # the next run's retention deletes what is left of it
    return ContentstoreError("no space left on device in %s while copying the contentstore (%s); the partial "
                             "copy was removed: free space or lower RETENTION_DAYS" % (backup_dir, detail))


def _run_rsync(source, partial, previous, timeout, backup_dir, workers=1):
    """rsync into ``partial``: with --link-dest to ``previous``, or (no previous: the first copy) with
    up to ``workers`` rsyncs at once over the month buckets (:mod:`first_copy`). Returns (stats,
    warnings); raises ContentstoreError."""
    deadline = time.monotonic() + timeout if timeout else None
    warnings, no_space = [], []

    def copy_one(src, dst, extra):
        remaining = None if deadline is None else max(1, deadline - time.monotonic())
        argv = rsync_argv(src, dst, previous.path if previous else None, extra)
        try:
            result = subprocess_utils.run(argv, subprocess_utils.base_env(), timeout=remaining,
                                          ok_codes=(0, RSYNC_VANISHED), what="rsync of the contentstore")
        except subprocess_utils.CommandError as exc:
            if "No space left" in exc.stderr_tail:
                no_space.append(exc)
            elif exc.timed_out:  # the whole copy's time is up (several rsyncs may share it)
                raise ContentstoreError("rsync of the contentstore: timed out after %d s (RSYNC_TIMEOUT); the "
                                        "partial copy %s is kept and reused next time" % (timeout, partial))
            elif src != source and not os.path.isdir(src):
                raise first_copy.BucketVanished(src)
            raise ContentstoreError("%s; the partial copy %s is kept and reused next time" % (exc, partial))
        if result.returncode == RSYNC_VANISHED and not warnings:
            warnings.append("some files vanished during the copy (rsync exit 24): normal while Alfresco runs")
        return parse_stats(result.stdout)

    try:
        if previous is None:
            stats = first_copy.parallel_copy(
                source, partial, rsync_count(workers), copy_one, _sum_stats,
                keep_going=lambda: not no_space and (deadline is None or time.monotonic() < deadline))
        else:
            stats = copy_one(source, partial, [])
    except ContentstoreError:
        if no_space:
            raise _no_space(partial, backup_dir, no_space[0])
        raise
    except OSError as exc:
        raise ContentstoreError("preparing the copy in %s: %s; the partial copy is kept and reused next time"
                                % (partial, exc))
    return stats, warnings


def _sum_stats(results):
    total = {}
    for stats in results:
        for key, value in stats.items():
            total[key] = total.get(key, 0) + value
    return total


def _run_linktree(source, partial, previous, workers, resume, backup_dir, log, trust_ns, in_place=False):
    try:
        stats = linktree.snapshot(source, partial, previous.path if previous else None, workers=workers,
                                  resume=resume, trust_before_ns=trust_ns, in_place=in_place)
    except linktree.LinkTreeError as exc:
        if "No space left" in str(exc):
            raise _no_space(partial, backup_dir, exc)
        raise ContentstoreError("%s; the partial copy %s is kept and reused next time" % (exc, partial))
    warnings = list(stats.warnings)
    if stats.vanished:
        warnings.insert(0, "%d files vanished during the copy: normal while Alfresco runs" % stats.vanished)
    for warning in warnings:
        log.warning(warning)
    counts = stats.as_dict()
    return {"files": counts["files"] + counts["dirs"] + counts["symlinks"], "regular_files": counts["files"],
            "files_copied": counts["copied"], "bytes_total": counts["bytes_total"],
            "bytes_copied": counts["bytes_copied"], "dirs_trusted": counts["dirs_trusted"],
            "dirs_compared": counts["dirs_compared"], "delta_files": counts["delta_files"],
            "delta_bytes": counts["delta_bytes"], "workers": stats.workers or workers,
            "regular_bytes": counts["bytes_total"] - counts["symlink_bytes"],
            "changed_dirs": None if stats.changed_dirs is None else [os.fsdecode(d) for d in stats.changed_dirs]}, \
        warnings


def _run_btrfs(source, partial, previous, workers, resumed, backup_dir, log, trust_ns, why, timeout):
    """The btrfs engine (:mod:`btrfs_snapshot`). Returns (stats, warnings, trust_ns actually used)."""
    try:
        start = btrfs_snapshot.prepare(partial, previous.path if previous else None, resumed, log,
                                       tree_delete.remove_tree)
        if previous is None:  # the first copy (or its resumption): rsync into the subvolume, in place
            stats, warnings = _run_rsync(source, partial, None, timeout, backup_dir, workers)
            trust_ns = None
        else:
            if start != "previous" or previous.info.get("files") is None \
                    or previous.info.get("bytes_total") is None:
                trust_ns, why = None, "the working copy is not the previous snapshot: every file compared"
            log.info("compare: %s", why)
            stats, warnings = _run_linktree(source, partial, None, workers, False, backup_dir, log, trust_ns,
                                            in_place=True)
            if trust_ns is not None:  # unchanged directories were not listed: count from the previous
                stats["regular_files"] = previous.info["files"] + stats.pop("delta_files")
                stats["bytes_total"] = previous.info["bytes_total"] + stats.pop("delta_bytes")
        btrfs_snapshot.finish(partial, log)
    except btrfs_snapshot.BtrfsError as exc:
        raise ContentstoreError("%s; the partial copy %s is kept and reused next time" % (exc, partial))
    return stats, warnings, trust_ns
