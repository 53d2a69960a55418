"""Reading the off-site copy (restore, audit, retention): what sets and WAL the remote holds.

:func:`read_catalog` lists the remote's top-level metadata (``postgres/*.json``, ``config/*.json``,
``manifests/*.json``), the WAL and, on request, the content objects, and returns a :class:`RemoteCatalog`:
:class:`catalog.BackupEntry` objects like the local catalog's, so the planning code (restore_plan,
retention) works on them unchanged. A base backup is DONE off-site only when its metadata is there and the
WAL segment it stopped in too; a snapshot or a config copy when its metadata is (sent after all its files).
:func:`stage` writes that catalog into a private directory laid out like BACKUP_DIR (metadata files and
empty backup directories), which restore.py's commands read.
Raises rclone.RcloneError.
"""

import datetime
import json
import os
import shutil
import tempfile

import catalog
import wal
import wal_chain

META_DIRS = {"postgres": "postgres", "config": "config", "contentstore": "manifests"}


class RemoteCatalog:
    """``entries`` {kind: [BackupEntry] oldest first} (``path``: the remote directory, for snapshots the
    manifest's name), ``wal`` {name: (size, aware mtime)}, ``content`` {relpath: (size, md5)} or None when not
    listed, ``manifests`` {snapshot name: size} of the manifest objects present."""

    def __init__(self, entries, wal_files, content, manifests):
        self.entries, self.wal, self.content, self.manifests = entries, wal_files, content, manifests

    def done(self, kind):
        return [e for e in self.entries[kind] if e.status == catalog.DONE]

    def newest_wal_at(self):
        times = [t for name, (_s, t) in self.wal.items() if wal.segment_file_base(name)]
        return max(times) if times else None


def _mtime(text):
    value = catalog.parse_iso((text or "").replace("Z", "+00:00")) if text else None
    if value is None:
        return None
    return value.astimezone(datetime.timezone.utc)


def has_wal(wal_files, segment):
    return bool(segment) and (segment in wal_files or segment + ".gz" in wal_files)


def read_catalog(remote, with_content=False, content_hashes=False):
    """The remote's sets, WAL and (``with_content``) content objects. Reads each metadata object (small)."""
    wal_files = {}
    for item in remote.lsjson("wal", modtimes=True):  # each segment's time: a HEAD each, the WAL kept only
        name = item["Path"]
        if not name.startswith(".") and _is_wal(name):
            wal_files[name] = (item.get("Size", 0), _mtime(item.get("ModTime")))
    entries, manifests = {}, {}
    scratch = tempfile.mkdtemp(prefix="alfoffsite-meta-")
    try:
        for kind, folder in META_DIRS.items():
            entries[kind], names = [], []
            for item in remote.lsjson(folder):
                name = item["Path"]
                if name.endswith(".tsv.gz"):
                    manifests[name[:-len(".tsv.gz")]] = item.get("Size", 0)
                elif name.endswith(".json") and catalog.parse_name_time(name[:-5]) is not None:
                    names.append(name)
            if names:  # one rclone call per folder, not one per night
                remote.download(folder, os.path.join(scratch, folder), rels=names,
                                what="reading the metadata in %s" % remote.path(folder))
            for name in names:
                try:
                    with open(os.path.join(scratch, folder, name), encoding="utf-8") as handle:
                        info = json.load(handle)
                except (OSError, ValueError):
                    info = {}
                entries[kind].append(_entry(kind, name[:-5], info if isinstance(info, dict) else {},
                                            remote.path(folder, name[:-5]), wal_files))
            entries[kind].sort(key=lambda e: (e.taken_at, e.name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for entry in entries["contentstore"]:
        if entry.name not in manifests and entry.status == catalog.DONE:
            entry.status = catalog.INCOMPLETE  # metadata without its manifest: not restorable
    content = None
    if with_content:
        content = {item["Path"]: (item.get("Size"), (item.get("Hashes") or {}).get("md5"))
                   for item in remote.lsjson("content", recursive=True, hashes=content_hashes)
                   if not os.path.basename(item["Path"]).startswith(".")}
    return RemoteCatalog(entries, wal_files, content, manifests)


def _is_wal(name):
    return wal.segment_file_base(name) is not None or wal.is_history_name(name) or \
        wal.is_backup_label_name(name[:-3] if name.endswith(".gz") else name) or name.endswith(".partial") or \
        name.endswith(".partial.gz")


def _entry(kind, name, info, path, wal_files):
    status = catalog.DONE if info.get("status") == catalog.DONE else catalog.INCOMPLETE
    if kind == "postgres" and status == catalog.DONE and not has_wal(wal_files, info.get("stop_wal_file")):
        status = catalog.WAITING_FOR_WAL  # its last WAL segment is not off-site (yet)
    return catalog.BackupEntry(kind, name, path, status, catalog.parse_name_time(name), info)


def stage(cat, staging):
    """Write ``cat``'s metadata into ``staging`` laid out like BACKUP_DIR (``<kind>/<name>.json`` with the
    off-site status, ``<kind>/<name>/`` directories, existing ones kept) and return the staged catalog
    {kind: [BackupEntry]} as catalog.list_backups reads it. Raises OSError."""
    os.makedirs(staging, mode=0o700, exist_ok=True)
    os.chmod(staging, 0o700)
    for kind, entries in cat.entries.items():
        folder = catalog.kind_dir(staging, kind)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        for entry in entries:
            path = os.path.join(folder, entry.name)
            os.makedirs(path, mode=0o700, exist_ok=True)
            catalog.write_info(path, dict(entry.info, status=entry.status))
    return {kind: catalog.list_backups(staging, kind) for kind in catalog.KINDS}


def download_wal(remote, cat, start_segment, dest, seg_size=wal_chain.DEFAULT_SEG_SIZE):
    """Download into ``dest`` every history file and every WAL file from ``start_segment`` on (any timeline):
    what a recovery from a base backup that started there can ask for. Returns the names."""
    start = wal_chain.segment_number(start_segment, seg_size)
    names = []
    for name in cat.wal:
        base = wal.segment_file_base(name) or (name.split(".")[0] if not wal.is_history_name(name) else None)
        if wal.is_history_name(name) or (base and wal.is_segment_name(base) and
                                         wal_chain.segment_number(base, seg_size) >= start):
            names.append(name)
    os.makedirs(dest, mode=0o700, exist_ok=True)
    if names:
        remote.download("wal", dest, rels=sorted(names), what="downloading %d WAL files" % len(names))
    return sorted(names)


def placeholder_archive(remote, cat, dest):
    """A directory with an empty file per off-site WAL file (its off-site time as mtime) and the real
    history files: enough for the chain check and the recovery window of ``list``, never for a recovery."""
    os.makedirs(dest, mode=0o700, exist_ok=True)
    for old in os.listdir(dest):
        os.unlink(os.path.join(dest, old))
    histories = [n for n in cat.wal if wal.is_history_name(n)]
    if histories:
        remote.download("wal", dest, rels=histories, what="downloading the timeline history files")
    for name, (_size, mtime) in cat.wal.items():
        path = os.path.join(dest, name)
        if not os.path.exists(path):
            open(path, "wb").close()
        if mtime is not None:
            os.utime(path, (mtime.timestamp(), mtime.timestamp()))


def manifest(remote, name):
    """{relpath: size} of snapshot ``name``'s manifest. Raises rclone.RcloneError."""
    import offsite

    return offsite.read_manifest(remote.read("manifests/%s.tsv.gz" % name))
