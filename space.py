"""Free space, checked before copying anything: refuse early, with the numbers, rather than fill the disk.

A full backup disk is worse than a failed night: the WAL archive usually lives on it too, so archiving
stops and ``pg_wal`` grows on the Alfresco volume. :func:`estimate` (pure) says what tonight needs;
:func:`check` compares it with what each target file system has free.

Estimates: the database needs its last base backup's size plus 25% (or, before any base backup, the raw
cluster size: nothing is assumed about compression); the contentstore needs the largest nightly growth of
the last week plus 50%, plus ~1 KB of directory blocks per file; a first copy needs the whole store (minus
what a resumable partial copy already holds). Plus 4 WAL segments, and 2% of the file system kept free.
"""

import datetime
import os

import catalog
from catalog import human_size as human

GROWTH_DB = 1.25
GROWTH_CONTENT = 1.5
DIR_BYTES_PER_FILE = 1024
KEEP_FREE_FRACTION = 0.02
HISTORY = 7


class SpaceError(Exception):
    """Not enough free space; the message has the numbers and what to do."""


def _int(value):
    """A byte or file count from metadata; 0 for anything that is not a number (a damaged .json)."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


def estimate(cluster_bytes, bases, snapshots, store_bytes=None, partial_bytes=0, wal_segment_size=16 << 20,
             recent_bytes=0):
    """What tonight's run needs, in bytes (pure).

    ``bases``/``snapshots``: metadata dicts of DONE backups, oldest first. ``store_bytes``: the
    contentstore's size, only needed when there is no snapshot yet. ``recent_bytes``: what the
    contentstore's date buckets since the last snapshot hold (:func:`recent_bytes`). Returns
    {'database': n, 'contentstore': n, 'wal': n, 'why_database': str, 'why_contentstore': str}.
    """
    if bases and _int(bases[-1].get("size_bytes")):
        database = int(_int(bases[-1]["size_bytes"]) * GROWTH_DB)
        why_db = "last base backup %s + 25%%" % human(_int(bases[-1]["size_bytes"]))
    else:
        database = int(cluster_bytes or 0)
        why_db = "first base backup: the cluster's size %s" % human(cluster_bytes or 0)
    if snapshots:
        # First copies (no link base) copy everything: they say nothing about a night's growth.
        nightly = [s for s in snapshots if s.get("link_dest")][-HISTORY:]
        growth = max([_int(s.get("bytes_copied")) for s in nightly] + [_int(recent_bytes)])
        files = _int(snapshots[-1].get("files"))
        content = int(growth * GROWTH_CONTENT) + files * DIR_BYTES_PER_FILE
        why_content = "new content ~%s (the larger of the last %d nights' growth and what today's date " \
                      "buckets hold) + 50%%, plus directory blocks" % (human(growth), len(nightly))
    else:
        content = max(0, int(store_bytes or 0) - int(partial_bytes or 0))
        why_content = "first copy: the contentstore's size %s%s" % (
            human(store_bytes or 0), ", less %s already copied" % human(partial_bytes) if partial_bytes else "")
    return {"database": database, "contentstore": content, "wal": 4 * wal_segment_size,
            "why_database": why_db, "why_contentstore": why_content}


def recent_bytes(store, since):
    """Bytes in the contentstore's ``YYYY/M/D/H/M`` buckets at or after ``since`` (a naive local datetime).

    Alfresco writes new content into the bucket of the current minute, so this measures the growth since
    the last snapshot while reading only the newest directories. Non-numeric directories are read whole.
    """
    limits = (since.year, since.month, since.day, since.hour, since.minute)
    total = 0
    stack = [(store, 0, True)]  # (path, depth, still on the boundary of ``since``)
    while stack:
        path, depth, boundary = stack.pop()
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
            elif entry.is_dir(follow_symlinks=False):
                if boundary and depth < len(limits) and entry.name.isdigit():
                    value = int(entry.name)
                    if value < limits[depth]:
                        continue
                    stack.append((entry.path, depth + 1, value == limits[depth]))
                else:
                    stack.append((entry.path, depth + 1, False))
    return total


def tree_bytes(path):
    """Total size of the regular files under ``path`` (0 when it does not exist)."""
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    return total


def free_space(path):
    """(device id, bytes available to this user, file system size) for the file system holding ``path``."""
    st = os.statvfs(path)
    return os.stat(path).st_dev, st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def check(backup_dir, wal_archive_dir, contentstore_dir, cluster_bytes, wal_segment_size, log):
    """Raise SpaceError when tonight's estimate does not fit; return the estimate otherwise."""
    bases = [e.info for e in catalog.done_backups(backup_dir, "postgres")]
    snap_entries = catalog.done_backups(backup_dir, "contentstore")
    snaps = [e.info for e in snap_entries]
    store_bytes = partial_bytes = recent = 0
    if snaps:
        recent = recent_bytes(contentstore_dir, snap_entries[-1].taken_at - datetime.timedelta(hours=1))
    else:
        store_bytes = tree_bytes(contentstore_dir)
        partials = [e for e in catalog.list_backups(backup_dir, "contentstore") if e.status == catalog.PARTIAL]
        partial_bytes = tree_bytes(partials[-1].path) if partials else 0
    need = estimate(cluster_bytes, bases, snaps, store_bytes, partial_bytes, wal_segment_size, recent)
    targets = {"database": catalog.kind_dir(backup_dir, "postgres"),
               "contentstore": catalog.kind_dir(backup_dir, "contentstore"), "wal": wal_archive_dir}
    by_device = {}
    for part, folder in targets.items():
        probe = folder if os.path.isdir(folder) else backup_dir
        device, available, size = free_space(probe)
        entry = by_device.setdefault(device, {"available": available, "size": size, "parts": [], "path": probe})
        entry["parts"].append(part)
    for entry in by_device.values():
        needed = sum(need[p] for p in entry["parts"]) + int(entry["size"] * KEEP_FREE_FRACTION)
        details = ", ".join("%s ~%s (%s)" % (p, human(need[p]), need.get("why_" + p, "4 segments"))
                            for p in entry["parts"])
        log.info("space on %s: need ~%s, %s free (%s)", entry["path"], human(needed), human(entry["available"]),
                 details)
        if needed > entry["available"]:
            raise SpaceError("not enough space in %s: tonight needs ~%s (%s; plus 2%% of the file system kept "
                             "free), only %s free. Nothing was copied. Free space, lower RETENTION_DAYS, or "
                             "move BACKUP_DIR to a larger disk" % (entry["path"], human(needed), details,
                                                                   human(entry["available"])))
    return need
