"""The contentstore snapshot: a copy in which files unchanged since the newest complete snapshot are hardlinks.

Every night is a plain, browsable directory ``contentstore-TS/`` in which files unchanged since the
previous complete snapshot are hardlinks of it (same inode, no space). The copy goes to
``contentstore-TS.partial/`` and is renamed only when it succeeded; a partial left by an interrupted
run is reused (renamed to tonight's partial) so a multi-TB first copy never starts from zero, and it is
never a link base.

Two engines give the same tree: ``rsync -a --link-dest`` (the first copy, and always with
``CONTENTSTORE_METHOD=rsync``) and :mod:`linktree` (nightly, when a previous snapshot exists: the same
size+mtime quick check in-process, with ``CONTENTSTORE_PARALLEL`` threads, faster than rsync).
"""

import os
import re
import time

import catalog
import linktree
import safe_files
import subprocess_utils

RSYNC_VANISHED = 24  # "some files vanished before they could be transferred": normal on a live store


class ContentstoreError(Exception):
    """The snapshot failed; the message says why and names the path."""


def rsync_argv(source, dest, link_dest=None):
    """The rsync command line (pure). Trailing slashes: copy the *contents* of source into dest."""
    argv = ["rsync", "-a", "--delete", "--numeric-ids", "--stats", "--no-human-readable"]
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


def choose_method(configured, previous_exists):
    """'rsync' or 'linktree' (pure): linktree only pays off when there is a previous snapshot to link to."""
    if configured == "rsync" or not previous_exists:
        return "rsync"
    return "linktree"


def take_snapshot(source, backup_dir, name, log, timeout=0, method="auto", workers=4):
    """Snapshot ``source`` into ``backup_dir/contentstore/name``. Returns the metadata dict (status DONE),
    also written beside the snapshot. Raises ContentstoreError; the partial is kept for the next run,
    except after "no space left", when keeping it would only keep the disk full."""
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
    resumed = find_resumable_partial(backup_dir, name)
    if resumed:
        log.info("reusing %s left by an interrupted run", resumed)
        os.rename(resumed, partial)
    elif not os.path.isdir(partial):
        os.mkdir(partial, 0o700)
    engine = choose_method(method, previous is not None)
    log.info("snapshot engine: %s%s", engine, " (link base %s)" % previous.name if previous else "")
    if engine == "rsync":
        stats, warnings = _run_rsync(source, partial, previous, timeout, backup_dir)
    else:
        stats, warnings = _run_linktree(source, partial, previous, workers, bool(resumed), backup_dir, log)
    # The snapshot root gets the source's mode from the copy; it stays private.
    os.chmod(partial, 0o700)
    # Every copied file and new directory entry on disk before the snapshot counts: later nights hardlink
    # these files by size+mtime, so a zero-filled one after a power cut would spread into every snapshot.
    safe_files.sync_filesystem(partial)
    info = {
        "kind": "contentstore", "name": name, "status": catalog.DONE, "source": source,
        "started_at": started_iso, "ended_at": catalog.utc_now_iso(),
        "duration_s": round(time.monotonic() - started, 3),
        "link_dest": previous.name if previous else None, "resumed_partial": bool(resumed), "engine": engine,
        "files": stats.get("regular_files", stats.get("files")), "bytes_total": stats.get("bytes_total"),
        "bytes_copied": stats.get("bytes_copied"), "files_copied": stats.get("files_copied"),
        "bytes_linked": (stats.get("bytes_total") or 0) - (stats.get("bytes_copied") or 0),
        "size_bytes": stats.get("bytes_copied"), "warnings": warnings,
    }
    catalog.write_info(final, info)  # before the rename: see base_backup.take_base_backup
    os.rename(partial, final)
    catalog.fsync_dir(dest_root)
    return info


def _no_space(partial, backup_dir, detail):
    import shutil

    shutil.rmtree(partial, ignore_errors=True)
    return ContentstoreError("no space left on device in %s while copying the contentstore (%s); the partial "
                             "copy was removed: free space or lower RETENTION_DAYS" % (backup_dir, detail))


def _run_rsync(source, partial, previous, timeout, backup_dir):
    argv = rsync_argv(source, partial, previous.path if previous else None)
    warnings = []
    try:
        result = subprocess_utils.run(argv, subprocess_utils.base_env(), timeout=timeout or None,
                                      ok_codes=(0, RSYNC_VANISHED), what="rsync of the contentstore")
    except subprocess_utils.CommandError as exc:
        if "No space left" in exc.stderr_tail:
            raise _no_space(partial, backup_dir, exc)
        raise ContentstoreError("%s; the partial copy %s is kept and reused next time" % (exc, partial))
    if result.returncode == RSYNC_VANISHED:
        warnings.append("some files vanished during the copy (rsync exit 24): normal while Alfresco runs")
    return parse_stats(result.stdout), warnings


def _run_linktree(source, partial, previous, workers, resume, backup_dir, log):
    try:
        stats = linktree.snapshot(source, partial, previous.path, workers=workers, resume=resume)
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
            "bytes_copied": counts["bytes_copied"]}, warnings
