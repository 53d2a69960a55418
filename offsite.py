"""``backup.py --offsite``: ship everything pending to the off-site copy (what the 5-minute cron entry runs).

Remote layout under OFFSITE_REMOTE (the local names, so a listing reads like BACKUP_DIR)::

    wal/<segment>[.gz], wal/<timeline>.history, wal/<segment>.<offset>.backup
    postgres/base-TS/base.tar.zst ...       postgres/base-TS.json    (the metadata, always sent last)
    config/config-TS/...                    config/config-TS.json
    content/YYYY/M/D/H/M/<uuid>.bin         one object per content file, shared by every night
    manifests/contentstore-TS.tsv.gz        that night's store: "<path>\\t<size>" per file, sent FIRST
    manifests/contentstore-TS.json          the snapshot's metadata, sent when all its files are off-site

Order of a run: WAL (under its own lock ``offsite-wal.lock``, so that new segments keep going out every few
minutes while a first multi-TB upload holds ``offsite.lock`` for days), then every DONE local backup not yet
off-site, oldest first. Only objects are added: see rclone.copy_files. A base backup is *off-site complete*
when its metadata and the WAL segment it stopped in are off-site (verified); a night's contentstore when its
metadata is. Nothing here lists the remote: the local record (offsite_state) says what is there.
"""

import datetime
import gzip
import os
import stat
import time

import catalog
import linktree_workers
import lock
import offsite_listing
import offsite_state
import rclone
import wal_chain

WAL_LOCK_NAME = "offsite-wal.lock"
MANIFEST_DIR = os.path.join("offsite", "manifests")


class Run:
    """One shipping run: ``failures`` (messages naming the file and the remote error), ``notes``, counts."""

    def __init__(self, cfg, log, remote=None, state=None):
        self.cfg, self.log = cfg, log
        self.remote = remote or rclone.Remote(cfg, log)
        self.state = state or offsite_state.State(cfg.BACKUP_DIR, cfg.OFFSITE_REMOTE)
        self.list_dir = os.path.join(cfg.BACKUP_DIR, "offsite")
        os.makedirs(self.list_dir, mode=0o700, exist_ok=True)
        self.failures, self.notes, self.completed = [], [], []
        self.files = self.bytes = 0
        self.probed = False
        self.flushed = time.monotonic()
        self.last_listing = None  # (name, files, skipped) of the snapshot queued last: the next one's base

    # ---- sending ---------------------------------------------------------------------------------
    def send(self, rows, overwrite=False):
        """Ship ``rows`` [(key, size, source, first_set)]; record each verified object as it is reported.
        Returns the set of keys shipped. The first send of a run checks that the remote answers at all."""
        if rows and not self.probed:
            self.remote.probe()
            self.probed = True
        groups = {}
        for key, size, source, _first in rows:
            src_dir, sub, rel = self._object_group(key, source)
            groups.setdefault((src_dir, sub), []).append((rel, key, size))
        done = set()
        for (src_dir, sub), items in sorted(groups.items()):
            by_rel = {rel: (key, size) for rel, key, size in items}

            marks = []

            def on_done(rel, md5, copied, by_rel=by_rel, marks=marks):
                key, size = by_rel.get(rel, (None, 0))
                if key is None:
                    return
                marks.append((key, md5))
                # Recorded in batches, at least every second: a kill loses at most that much, and those files
                # are then found identical off-site (a HEAD each), never sent again.
                if len(marks) >= 500 or time.monotonic() - self.flushed > 1.0:
                    self._flush(marks)
                done.add(key)
                if copied:
                    self.files += 1
                    self.bytes += size or 0

            # Listing costs one request per 1,000 objects there, --no-traverse one HEAD per file sent: list only
            # while the record knows far fewer objects under ``sub`` than this group sends (a first upload).
            traverse = self.state.count_shipped(sub + "/") * 10 < len(by_rel)
            result = self.remote.copy_files(src_dir, sorted(by_rel), sub, self.list_dir, on_done, overwrite,
                                            traverse)
            self._flush(marks)
            for rel, message in sorted(result["errors"].items()):
                self.failures.append("%s: %s" % (rclone.join(self.remote.root, sub, rel), message))
            if result["fatal"]:
                self.failures.append("uploading to %s failed: %s" % (rclone.join(self.remote.root, sub),
                                                                     result["fatal"]))
            missing = [rel for rel in by_rel if by_rel[rel][0] not in done and rel not in result["errors"]]
            if missing and not result["fatal"]:
                for rel in missing:
                    if not os.path.exists(os.path.join(src_dir, rel)):
                        self._vanished(by_rel[rel][0])
                    else:
                        self.failures.append("%s: rclone did not confirm the upload" % os.path.join(src_dir, rel))
        return done

    def _object_group(self, key, source):
        """(source directory, remote directory, path under both) of one rclone run that sends ``key``: content
        from its snapshot (``source`` is the snapshot's name); every configuration copy or base backup file,
        subdirectories and metadata included, from its kind's directory (one run for all the sets of a kind, not
        one per directory of each set); anything else from its own directory."""
        kind, _slash, rel = key.partition("/")
        if kind == "content":
            return os.path.join(catalog.kind_dir(self.cfg.BACKUP_DIR, "contentstore"), source), kind, rel
        if kind in ("config", "postgres"):
            root = catalog.kind_dir(self.cfg.BACKUP_DIR, kind)
            if source == os.path.join(root, rel):
                return root, kind, rel
        return os.path.dirname(source), os.path.dirname(key), os.path.basename(key)

    def _flush(self, marks):
        self.state.mark_many(marks)
        del marks[:]
        self.flushed = time.monotonic()

    def _vanished(self, key):
        """A source left the local backups before it went off-site: try another snapshot, else it is lost."""
        if key.startswith("content/"):
            rel = key[len("content/"):]
            for entry in reversed(catalog.done_backups(self.cfg.BACKUP_DIR, "contentstore")):
                if os.path.isfile(os.path.join(entry.path, rel)):
                    self.state.set_source(key, entry.name)
                    return
        self.state.mark_lost(key)
        self.failures.append("%s left the local backups before it was shipped off-site (local retention or a "
                             "deletion): the off-site copy lacks it" % key)

    # ---- WAL -------------------------------------------------------------------------------------
    def ship_wal(self):
        archive = self.cfg.wal_archive_dir
        names = wal_chain.archive_segments(archive) if os.path.isdir(archive) else []
        keys = {"wal/" + n: n for n in names}
        known = self.state.known(keys)
        self.state.queue([(k, _size(os.path.join(archive, n)), os.path.join(archive, n))
                          for k, n in keys.items() if k not in known])
        pending = self.state.pending("wal/")
        for row in pending:
            if not os.path.exists(row[2]):
                self._vanished(row[0])
        return self.send([r for r in pending if os.path.exists(r[2])])

    # ---- backups ---------------------------------------------------------------------------------
    def queue_sets(self):
        """Put every DONE local backup that is not in the record yet into it (files first, metadata last)."""
        for kind in ("config", "postgres", "contentstore"):
            for entry in catalog.done_backups(self.cfg.BACKUP_DIR, kind):
                if self.state.set_status(kind, entry.name) is not None:
                    continue
                if kind == "contentstore":
                    self._queue_snapshot(entry)
                else:
                    rows = [("%s/%s/%s" % (kind, entry.name, rel), size, os.path.join(entry.path, rel))
                            for rel, size in offsite_listing.walk_files(entry.path)[0]]
                    self.state.queue(rows, first_set=entry.name)
                self.state.put_set(kind, entry.name, "queued", entry.info)
                self.log.info("off-site: queued %s %s", kind, entry.name)

    def _snapshot_files(self, entry):
        """(files, skipped) of snapshot ``entry`` (see offsite_listing): derived from its link base's list
        when the engine's record allows it (the base queued just before in this run, or its manifest kept
        here), else walked."""
        base = offsite_listing.derivable(entry.info)
        listing = None
        try:
            if base is not None and self.last_listing and self.last_listing[0] == base:
                listing = offsite_listing.derive_files(entry.path, entry.info, *self.last_listing[1:])
            elif base is not None:
                with open(os.path.join(self.cfg.BACKUP_DIR, MANIFEST_DIR, base + ".tsv.gz"), "rb") as handle:
                    base_files = sorted(read_manifest(handle.read()).items())
                # The base's unshippable names are not in its manifest: unknown (None).
                listing = offsite_listing.derive_files(entry.path, entry.info, base_files, None)
        except (OSError, ValueError, EOFError) as exc:  # no usable base or record: walk
            self.log.info("off-site: %s is walked (%s)", entry.name, exc)
            listing = None
        if listing is None:
            listing = offsite_listing.walk_files(entry.path)
        else:
            self.log.info("off-site: %s listed from %s and its %d changed directories", entry.name, base,
                          len(entry.info["changed_dirs"]))
        self.last_listing = (entry.name,) + listing
        return listing

    def _queue_snapshot(self, entry):
        files, skipped = self._snapshot_files(entry)
        if skipped:
            self.notes.append("%s: %d files with a newline, tab or non-UTF-8 byte in their name are not Alfresco "
                              "content and are not shipped off-site, e.g. %r" % (entry.name, len(skipped),
                                                                                 skipped[0][0]))
        manifest = write_manifest(os.path.join(self.cfg.BACKUP_DIR, MANIFEST_DIR), entry.name, files)
        self.state.queue([("manifests/%s.tsv.gz" % entry.name, _size(manifest), manifest)], first_set=entry.name)
        self.state.queue((("content/" + rel, size, entry.name) for rel, size in files), first_set=entry.name)

    def ship_sets(self):
        """Send the queued sets' objects, then each set's metadata once all of its objects are off-site."""
        manifests = self.state.pending("manifests/")
        self.send([r for r in manifests if r[0].endswith(".tsv.gz")] +
                  [r for r in self.state.pending("config/") + self.state.pending("postgres/")
                   if not r[0].endswith(".json") or r[0].count("/") > 1])
        content = self.state.pending("content/")
        snapshots = catalog.done_backups(self.cfg.BACKUP_DIR, "contentstore")
        newest = snapshots[-1].name if snapshots else None
        ready, manifest_shipped = [], {}
        for row in content:
            row = self._content_source(row, newest)
            if row is None:
                continue
            # The night's manifest goes first: retention elsewhere never deletes an object a manifest lists.
            if row[3] not in manifest_shipped:
                manifest_shipped[row[3]] = self.state.is_shipped("manifests/%s.tsv.gz" % row[3])
            if manifest_shipped[row[3]]:
                ready.append(row)
        self.send(ready)
        for kind, key_of in (("config", "config/%s.json"), ("postgres", "postgres/%s.json"),
                             ("contentstore", "manifests/%s.json")):
            complete = []
            for name, _status, info, _at in self.state.sets(kind, "queued"):
                meta = self._set_metadata(kind, name, info, key_of % name)
                if meta is not None:
                    complete.append((name, info, meta))
            # Every set's metadata of one kind lies in one directory: one rclone run sends them all.
            sent = self.send([(m["key"], m["size"], m["source"], name) for name, _info, m in complete
                              if not m["shipped_at"]])
            for name, info, meta in complete:
                if meta["shipped_at"] or meta["key"] in sent:
                    self.state.put_set(kind, name, "shipped", info)
                    self.completed.append("%s %s" % (kind, name))
                    self.log.info("off-site: %s %s is complete off-site", kind, name)
        self._prune_manifests(datetime.datetime.now())

    def _prune_manifests(self, now):
        """Delete the local copy of a night's manifest once it is off-site, the night is gone from BACKUP_DIR
        (so nothing lists from it any more) and older than OFFSITE_RETENTION_DAYS (off-site retention's
        business from then on); otherwise one per night would pile up (a 10-million-file store: ~150 MB)."""
        directory = os.path.join(self.cfg.BACKUP_DIR, MANIFEST_DIR)
        snapshots = catalog.kind_dir(self.cfg.BACKUP_DIR, "contentstore")
        cutoff = now - datetime.timedelta(days=max(1, self.cfg.OFFSITE_RETENTION_DAYS))
        for file_name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
            name = file_name[:-len(".tsv.gz")]
            when = catalog.parse_name_time(name) if file_name.endswith(".tsv.gz") else None
            if when is None or when > cutoff or os.path.lexists(os.path.join(snapshots, name)) \
                    or os.path.lexists(os.path.join(snapshots, name + catalog.PARTIAL_SUFFIX)) \
                    or not self.state.is_shipped("manifests/" + file_name):
                continue
            os.unlink(os.path.join(directory, file_name))
            self.log.info("off-site: removed the local copy of %s's manifest (off-site, gone here)", name)

    def _content_source(self, row, newest):
        """Pending content ``row`` (key, size, source, first_set) with the snapshot to read it from: the newest
        one when it holds the file with the recorded size (content never changes in place, and a first upload of
        many nights is then one rclone run instead of one per night), else the night that queued it, else
        another night that still has it. None when no snapshot has it any more (recorded as lost)."""
        snaps = catalog.kind_dir(self.cfg.BACKUP_DIR, "contentstore")
        rel = row[0][len("content/"):]
        if newest is not None and newest != row[2]:
            try:
                found = os.lstat(os.path.join(snaps, newest, rel))
                if stat.S_ISREG(found.st_mode) and found.st_size == row[1]:
                    return (row[0], row[1], newest, row[3])
            except OSError:
                pass
        if os.path.isfile(os.path.join(snaps, row[2], rel)):
            return row
        self._vanished(row[0])
        row = self.state.object(row[0])
        if row["lost"]:
            return None
        return (row["key"], row["size"], row["source"], row["first_set"])

    def _set_metadata(self, kind, name, info, meta_key):
        """The record's row of set ``name``'s metadata object when every other object of the set is off-site and
        the metadata can go (queued here if needed); None while the set waits, or when it can never complete
        (then marked incomplete, with a failure)."""
        lost = self.state.lost_in(name)
        if lost:  # its metadata must never make it look complete off-site
            self.state.put_set(kind, name, "incomplete", info)
            self.failures.append("%s %s is incomplete off-site: %d of its files left the local backups before they "
                                 "were shipped (e.g. %s)" % (kind, name, len(lost), lost[0]))
            return None
        if kind == "contentstore":
            if self.state.pending_up_to(name) or self.state.pending("manifests/%s.tsv.gz" % name):
                return None
        elif self.state.pending("%s/%s/" % (kind, name)):
            return None
        meta = self.state.object(meta_key)
        if meta is None:
            local = catalog.info_path(os.path.join(catalog.kind_dir(self.cfg.BACKUP_DIR, kind), name))
            self.state.queue([(meta_key, _size(local), local)], first_set=name)
            meta = self.state.object(meta_key)
        if not meta["shipped_at"] and not os.path.isfile(meta["source"]):
            self.state.put_set(kind, name, "incomplete", info)
            self.failures.append("%s %s was deleted locally before its metadata was shipped" % (kind, name))
            return None
        return meta


def _size(path):
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def write_manifest(directory, name, files):
    """``directory/<name>.tsv.gz``: one "<path>\\t<size>" line per file, sorted, gzip without a time stamp (the
    same snapshot always gives the same bytes, so a rerun after a crash finds it identical off-site)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, name + ".tsv.gz")
    if os.path.isfile(path):
        return path
    tmp = path + ".tmp"
    # Level 6: 0.13 s instead of 9's 0.32 s per 60,000 files, 0.5 % larger. A manifest is written once and
    # kept, so one compressed by an older version is never rewritten with other bytes.
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="", compresslevel=6) as handle:
        handle.write("".join("%s\t%d\n" % row for row in files).encode("utf-8"))
    os.chmod(tmp, 0o600)
    os.rename(tmp, path)
    return path


def read_manifest(data):
    """{relpath: size} from a manifest's gzip bytes."""
    result = {}
    for line in gzip.decompress(data).decode("utf-8").splitlines():
        rel, _tab, size = line.rpartition("\t")
        if rel:
            result[rel] = int(size)
    return result


def ship(cfg, log):
    """The whole ``--offsite`` run. Returns a Run (``failures`` empty = success). WAL first under its own lock,
    then the backups under OFFSITE_LOCK_NAME; a lock held by another shipper is not a failure (noted)."""
    job = Run(cfg, log)
    run_id = job.state.start_run("ship")
    try:
        for name, what, work in ((WAL_LOCK_NAME, "WAL", job.ship_wal),
                                 (lock.OFFSITE_LOCK_NAME, "backups", lambda: (job.queue_sets(), job.ship_sets()))):
            held = lock.BackupLock(cfg.BACKUP_DIR, name)
            try:
                held.acquire()
            except lock.LockHeld as exc:
                job.notes.append("%s: skipped, %s" % (what, exc))
                continue
            try:
                work()
            finally:
                held.release()
    except (rclone.RcloneError, OSError, linktree_workers.WorkerError) as exc:
        job.failures.append(str(exc))
    finally:
        job.state.end_run(run_id, not job.failures, job.files, job.bytes,
                          "; ".join(job.failures)[:2000] if job.failures else None)
        job.state.close()
    return job
