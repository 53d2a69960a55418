"""The local record of the off-site copy: ``BACKUP_DIR/offsite-state.sqlite`` (0600, this user's).

It is what lets the nightly shipping send only what is new without listing the bucket. Tables:

- ``objects(key, size, md5, source, first_set, shipped_at, lost)``: every object the remote must hold,
  ``key`` relative to OFFSITE_REMOTE (``wal/<name>``, ``postgres/base-X/base.tar.zst``, ``content/<rel>``...).
  ``source`` is the local file (for content: the snapshot name it is read from); ``shipped_at`` is set only
  when rclone verified the object on the remote (NULL: pending); ``lost`` marks a file that left every local
  backup before it could be shipped.
- ``sets(kind, name, status, started_at, ended_at, info, updated_at)``: each DONE local backup taken into the
  off-site copy; status ``queued`` (its objects are in ``objects``), ``shipped`` (its metadata object, always
  sent last, is off-site), ``incomplete`` (a file of it was lost).
- ``runs(started_at, ended_at, ok, files, bytes, error)`` and ``meta(key, value)`` (the remote this record
  belongs to).

sqlite's own locking makes the WAL shipper and the bulk shipper safe to run at once (busy timeout 60 s).
Raises sqlite3.Error / OSError, or StateError for a record made for another remote.
"""

import datetime
import json
import os
import sqlite3

import lock

FILE_NAME = "offsite-state.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY, size INTEGER, md5 TEXT, source TEXT, first_set TEXT,
    shipped_at TEXT, lost INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS objects_pending ON objects (shipped_at) WHERE shipped_at IS NULL;
CREATE TABLE IF NOT EXISTS sets (kind TEXT, name TEXT, status TEXT, started_at TEXT, ended_at TEXT, info TEXT,
    updated_at TEXT, PRIMARY KEY (kind, name));
CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, what TEXT, started_at TEXT, ended_at TEXT, ok INTEGER,
    files INTEGER, bytes INTEGER, error TEXT);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


class StateError(Exception):
    """The record cannot be used (made for another remote); the message says what to do."""


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def path_of(backup_dir):
    return os.path.join(backup_dir, FILE_NAME)


def exists(backup_dir):
    return os.path.isfile(path_of(backup_dir))


class State:
    """An open record (``with State(backup_dir, remote) as state:``). ``readonly`` never creates it."""

    def __init__(self, backup_dir, remote, readonly=False):
        self.path = path_of(backup_dir)
        if not readonly:
            # Created 0600 without following a symlink planted in BACKUP_DIR, and checked to be ours.
            os.close(lock.open_private(self.path, os.O_RDWR | os.O_CREAT))
        uri = "file:%s?mode=%s" % (self.path, "ro" if readonly else "rw")
        self.db = sqlite3.connect(uri, uri=True, timeout=60, check_same_thread=False, isolation_level=None)
        if not readonly:
            self.db.execute("PRAGMA journal_mode=WAL")
            # One commit per verified file: without an fsync each (WAL mode keeps the file consistent; a power cut
            # may lose the last few marks, and those files are then found identical off-site and not re-sent).
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            known = self.meta("remote")
            if known is None:
                self.set_meta("remote", remote)
            elif known != remote:
                self.db.close()
                raise StateError("%s records the off-site copy on %s, but OFFSITE_REMOTE is now %s: move that file "
                                 "aside to start a new off-site copy (everything will be sent again), or set "
                                 "OFFSITE_REMOTE back" % (self.path, known, remote))
        self.remote = remote

    def close(self):
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def meta(self, key):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key, value):
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # ---- objects ---------------------------------------------------------------------------------
    def queue(self, rows, first_set=None):
        """Add objects that must go off-site: rows of (key, size, source); ones already known are kept."""
        self.db.execute("BEGIN")
        try:
            self.db.executemany("INSERT OR IGNORE INTO objects (key, size, source, first_set) VALUES (?, ?, ?, ?)",
                                ((k, s, src, first_set) for k, s, src in rows))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def mark_shipped(self, key, md5=None):
        self.db.execute("UPDATE objects SET shipped_at = ?, md5 = coalesce(?, md5), lost = 0 WHERE key = ?",
                        (now_iso(), md5, key))

    def mark_many(self, marks):
        """mark_shipped for [(key, md5)] in one transaction."""
        if not marks:
            return
        stamp = now_iso()
        self.db.execute("BEGIN")
        try:
            self.db.executemany("UPDATE objects SET shipped_at = ?, md5 = coalesce(?, md5), lost = 0 WHERE key = ?",
                                ((stamp, md5, key) for key, md5 in marks))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def mark_unshipped(self, keys):
        """The audit found these missing or corrupted off-site: pending again."""
        self.db.executemany("UPDATE objects SET shipped_at = NULL WHERE key = ?", ((k,) for k in keys))

    def set_source(self, key, source):
        self.db.execute("UPDATE objects SET source = ? WHERE key = ?", (source, key))

    def mark_lost(self, key):
        self.db.execute("UPDATE objects SET lost = 1 WHERE key = ?", (key,))

    def is_shipped(self, key):
        row = self.db.execute("SELECT shipped_at FROM objects WHERE key = ?", (key,)).fetchone()
        return bool(row and row[0])

    def known(self, keys):
        """The subset of ``keys`` the record knows (shipped or pending)."""
        found = set()
        keys = list(keys)
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            found.update(r[0] for r in self.db.execute(
                "SELECT key FROM objects WHERE key IN (%s)" % ",".join("?" * len(chunk)), chunk))
        return found

    def pending(self, prefix):
        """[(key, size, source, first_set)] not shipped yet and not lost, whose key starts with ``prefix``."""
        return self.db.execute("SELECT key, size, source, first_set FROM objects WHERE shipped_at IS NULL AND "
                               "lost = 0 AND key >= ? AND key < ? ORDER BY key", (prefix, prefix + "\uffff")).fetchall()

    def pending_totals(self):
        """(files, bytes) of every pending object."""
        row = self.db.execute("SELECT count(*), coalesce(sum(size), 0) FROM objects WHERE shipped_at IS NULL "
                              "AND lost = 0").fetchone()
        return row[0], row[1]

    def lost_in(self, set_name):
        return [r[0] for r in self.db.execute("SELECT key FROM objects WHERE lost = 1 AND first_set = ?",
                                              (set_name,))]

    def pending_up_to(self, set_name):
        """How many content objects queued by ``set_name`` or an older set are not shipped (lost excluded)."""
        return self.db.execute("SELECT count(*) FROM objects WHERE shipped_at IS NULL AND lost = 0 AND key >= "
                               "'content/' AND key < 'content0' AND first_set <= ?", (set_name,)).fetchone()[0]

    def shipped_objects(self, prefix=""):
        """{key: (size, md5)} of shipped objects under ``prefix`` (for the audit)."""
        return {k: (s, m) for k, s, m in self.db.execute(
            "SELECT key, size, md5 FROM objects WHERE shipped_at IS NOT NULL AND key >= ? AND key < ?",
            (prefix, prefix + "\uffff"))}

    def count_shipped(self, prefix):
        return self.db.execute("SELECT count(*) FROM objects WHERE key >= ? AND key < ? AND shipped_at IS NOT NULL",
                               (prefix, prefix + "\uffff")).fetchone()[0]

    def object(self, key):
        row = self.db.execute("SELECT key, size, md5, source, first_set, shipped_at, lost FROM objects WHERE "
                              "key = ?", (key,)).fetchone()
        return dict(zip(("key", "size", "md5", "source", "first_set", "shipped_at", "lost"), row)) if row else None

    # ---- sets ------------------------------------------------------------------------------------
    def set_status(self, kind, name):
        row = self.db.execute("SELECT status FROM sets WHERE kind = ? AND name = ?", (kind, name)).fetchone()
        return row[0] if row else None

    def put_set(self, kind, name, status, info):
        self.db.execute("INSERT OR REPLACE INTO sets (kind, name, status, started_at, ended_at, info, updated_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (kind, name, status, info.get("started_at"),
                                                         info.get("ended_at"), json.dumps(info, sort_keys=True),
                                                         now_iso()))

    def sets(self, kind, status=None):
        """[(name, status, info dict, updated_at)] of ``kind``, oldest first."""
        sql = "SELECT name, status, info, updated_at FROM sets WHERE kind = ?" + (" AND status = ?" if status else "")
        rows = self.db.execute(sql + " ORDER BY name", (kind, status) if status else (kind,)).fetchall()
        return [(n, s, json.loads(i or "{}"), u) for n, s, i, u in rows]

    # ---- runs ------------------------------------------------------------------------------------
    def start_run(self, what):
        cur = self.db.execute("INSERT INTO runs (what, started_at) VALUES (?, ?)", (what, now_iso()))
        return cur.lastrowid

    def end_run(self, run_id, ok, files, size, error):
        self.db.execute("UPDATE runs SET ended_at = ?, ok = ?, files = ?, bytes = ?, error = ? WHERE id = ?",
                        (now_iso(), 1 if ok else 0, files, size, error, run_id))
        self.db.execute("DELETE FROM runs WHERE id < ? - 1000", (run_id,))  # keep the record small

    def last_runs(self):
        """(last run's started_at, last ok run's ended_at, last run's error or None)."""
        last = self.db.execute("SELECT started_at, ok, error FROM runs WHERE ended_at IS NOT NULL ORDER BY id DESC "
                               "LIMIT 1").fetchone()
        ok = self.db.execute("SELECT ended_at FROM runs WHERE ok = 1 ORDER BY id DESC LIMIT 1").fetchone()
        return (last[0] if last else None, ok[0] if ok else None, (last[2] or None) if last and not last[1] else None)
