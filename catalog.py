"""What is in BACKUP_DIR: backup names, their metadata files, and their status.

Layout (every kind has its own folder under BACKUP_DIR)::

    postgres/base-YYYY-MM-DD_HH-MM-SS/              base.tar.<ext>, pg_wal.tar.<ext>, backup_manifest
    postgres/base-YYYY-MM-DD_HH-MM-SS.json          metadata, see below
    contentstore/contentstore-YYYY-MM-DD_HH-MM-SS/  the snapshot, a plain tree
    contentstore/contentstore-YYYY-MM-DD_HH-MM-SS.json
    config/config-YYYY-MM-DD_HH-MM-SS/              keystore/, alfresco-global.properties, extension/
    config/config-YYYY-MM-DD_HH-MM-SS.json
    <kind>/<name>.partial/                          being written, or left behind by a failed run

The metadata file sits *beside* the directory (so a restored contentstore holds no foreign file) and is
written atomically once the ``.partial`` tree is on disk, just before the rename (a ``.partial`` directory reads
PARTIAL whatever its metadata says, so a crash in between never leaves a directory without metadata). Its
``status`` is one of :data:`STATUSES`; a directory without a readable
metadata file is INCOMPLETE. Only DONE backups are link-dest bases, retention survivors that count and
restore sources.

Names carry the local time the run started; the metadata holds exact UTC times (``started_at``,
``ended_at``, ISO 8601).
"""

import datetime
import json
import os
import re

KINDS = {"postgres": "base", "contentstore": "contentstore", "config": "config"}
PARTIAL_SUFFIX = ".partial"
NAME_TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"

DONE = "DONE"
WAITING_FOR_WAL = "WAITING_FOR_WAL"
FAILED = "FAILED"
INCOMPLETE = "INCOMPLETE"  # directory present, metadata missing or unreadable
PARTIAL = "PARTIAL"  # NAME.partial directory
STATUSES = (DONE, WAITING_FOR_WAL, FAILED, INCOMPLETE, PARTIAL)

_NAME_RE = re.compile(r"^(base|contentstore|config)-(\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2})(\.partial)?$")


class BackupEntry:
    """One backup directory: ``kind``, ``name`` (without .partial), ``path``, ``status``, ``taken_at``
    (naive local datetime from the name, or from mtime when the name cannot be parsed), ``info`` (the
    metadata dict, empty when missing)."""

    def __init__(self, kind, name, path, status, taken_at, info, name_parsed=True):
        self.kind = kind
        self.name = name
        self.path = path
        self.status = status
        self.taken_at = taken_at
        self.info = info
        self.name_parsed = name_parsed

    @property
    def is_partial(self):
        return self.status == PARTIAL

    def __repr__(self):
        return "BackupEntry(%s, %s, %s)" % (self.kind, self.name, self.status)


def backup_name(kind, when):
    """``base-2024-01-31_02-00-00`` for kind ``postgres`` and that local datetime."""
    return "%s-%s" % (KINDS[kind], when.strftime(NAME_TIME_FORMAT))


def parse_name_time(name):
    """The local datetime in a backup name (``.partial`` allowed), or None when it is not backup-shaped."""
    match = _NAME_RE.match(name)
    if not match:
        return None
    try:
        return datetime.datetime.strptime(match.group(2), NAME_TIME_FORMAT)
    except ValueError:
        return None


def kind_dir(backup_dir, kind):
    return os.path.join(backup_dir, kind)


def info_path(directory):
    """The metadata file that belongs to backup directory ``directory`` (``.partial`` stripped)."""
    if directory.endswith(PARTIAL_SUFFIX):
        directory = directory[: -len(PARTIAL_SUFFIX)]
    return directory.rstrip("/") + ".json"


def read_info(directory):
    """The metadata dict of a backup directory, or None when missing or unreadable."""
    try:
        with open(info_path(directory), encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def write_info(directory, info):
    """Write the metadata of ``directory`` atomically and durably (temp file, fsync, rename, fsync dir).

    The file is created 0600. Raises OSError.
    """
    path = info_path(directory)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))


def fsync_dir(path):
    """fsync a directory so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_backups(backup_dir, kind):
    """Every backup directory of ``kind`` under ``backup_dir``, oldest first (by ``taken_at``).

    Directories whose names are not backup-shaped but start with the kind's prefix are listed with
    ``name_parsed=False`` and their mtime as ``taken_at``; anything else in the folder is ignored.
    """
    folder = kind_dir(backup_dir, kind)
    prefix = KINDS[kind] + "-"
    entries = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return entries
    for entry_name in names:
        path = os.path.join(folder, entry_name)
        if not entry_name.startswith(prefix) or not os.path.isdir(path) or os.path.islink(path):
            continue
        partial = entry_name.endswith(PARTIAL_SUFFIX)
        name = entry_name[: -len(PARTIAL_SUFFIX)] if partial else entry_name
        taken_at = parse_name_time(entry_name)
        parsed = taken_at is not None
        if not parsed:
            taken_at = datetime.datetime.fromtimestamp(os.stat(path).st_mtime)
        info = read_info(path) or {}
        if partial:
            status = PARTIAL
        elif not info or info.get("status") not in (DONE, WAITING_FOR_WAL, FAILED):
            status = INCOMPLETE
        else:
            status = info["status"]
        entries.append(BackupEntry(kind, name, path, status, taken_at, info, parsed))
    entries.sort(key=lambda e: (e.taken_at, e.name))
    return entries


def done_backups(backup_dir, kind):
    """Only the DONE backups of ``kind``, oldest first."""
    return [e for e in list_backups(backup_dir, kind) if e.status == DONE]


def newest_done(backup_dir, kind):
    """The newest DONE backup of ``kind``, or None."""
    done = done_backups(backup_dir, kind)
    return done[-1] if done else None


def utc_now_iso():
    """Now, UTC, ISO 8601 with microseconds: pairing a snapshot with a base backup compares these times,
    and two stages often start within the same second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def parse_iso(text):
    """An aware datetime from an ISO 8601 string written by :func:`utc_now_iso`, or None."""
    if not text:
        return None
    try:
        value = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value


def human_size(size):
    """Bytes as ``"512 B"``, ``"1.5 MiB"``...; ``"-"`` for None."""
    if size is None:
        return "-"
    size = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024.0
    return "-"  # unreachable
