"""The contentstore snapshot: ``rsync -a --link-dest`` on the newest complete snapshot.

Every night is a plain, browsable directory ``contentstore-TS/`` in which files unchanged since the
previous complete snapshot are hardlinks of it (same inode, no space). The copy goes to
``contentstore-TS.partial/`` and is renamed only when rsync succeeded; a partial left by an interrupted
run is reused (renamed to tonight's partial) so a multi-TB first copy never starts from zero, and it is
never a ``--link-dest`` base.
"""

import os
import re
import time

import catalog
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


def take_snapshot(source, backup_dir, name, log, timeout=0):
    """Snapshot ``source`` into ``backup_dir/contentstore/name``. Returns the metadata dict (status DONE),
    also written beside the snapshot. Raises ContentstoreError; the partial is kept for the next run."""
    started, started_iso = time.monotonic(), catalog.utc_now_iso()
    if not os.path.isdir(source):
        raise ContentstoreError("contentstore not found: %s (set CONTENTSTORE_DIR or ALF_BASE_DIR)" % source)
    dest_root = catalog.kind_dir(backup_dir, "contentstore")
    os.makedirs(dest_root, mode=0o700, exist_ok=True)
    final = os.path.join(dest_root, name)
    partial = final + catalog.PARTIAL_SUFFIX
    previous = catalog.newest_done(backup_dir, "contentstore")
    resumed = find_resumable_partial(backup_dir, name)
    if resumed:
        log.info("reusing %s left by an interrupted run", resumed)
        os.rename(resumed, partial)
    elif not os.path.isdir(partial):
        os.mkdir(partial, 0o700)
    argv = rsync_argv(source, partial, previous.path if previous else None)
    warnings = []
    try:
        result = subprocess_utils.run(argv, subprocess_utils.base_env(), timeout=timeout or None,
                                      ok_codes=(0, RSYNC_VANISHED), what="rsync of the contentstore")
    except subprocess_utils.CommandError as exc:
        hint = " (no space left in %s)" % backup_dir if "No space left" in exc.stderr_tail else ""
        raise ContentstoreError("%s%s; the partial copy %s is kept and reused next time" % (exc, hint, partial))
    if result.returncode == RSYNC_VANISHED:
        warnings.append("some files vanished during the copy (rsync exit 24): normal while Alfresco runs")
    # rsync gives the top directory the source's mode; the snapshot root stays private.
    os.chmod(partial, 0o700)
    os.rename(partial, final)
    catalog.fsync_dir(dest_root)
    stats = parse_stats(result.stdout)
    info = {
        "kind": "contentstore", "name": name, "status": catalog.DONE, "source": source,
        "started_at": started_iso, "ended_at": catalog.utc_now_iso(),
        "duration_s": round(time.monotonic() - started, 3),
        "link_dest": previous.name if previous else None, "resumed_partial": bool(resumed),
        "files": stats.get("regular_files", stats.get("files")), "bytes_total": stats.get("bytes_total"),
        "bytes_copied": stats.get("bytes_copied"), "files_copied": stats.get("files_copied"),
        "bytes_linked": (stats.get("bytes_total") or 0) - (stats.get("bytes_copied") or 0),
        "size_bytes": stats.get("bytes_copied"), "warnings": warnings,
    }
    catalog.write_info(final, info)
    return info
