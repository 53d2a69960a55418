"""The contentstore scenarios of the benchmark: first copy, nights (ours, rsync --link-dest and the floor
``cp -al``, cold and warm cache), retention deletes, and the same on a loop-mounted btrfs.

A mixin of :class:`measure.Bench` (it uses its ``worker``, ``bare``, ``cold``, ``add`` and ``sb``).
"""

import datetime
import os
import shutil
import time

import catalog
import dataset

ROUNDS = ("cold", "warm")


def warm_up(*trees):
    """Untimed, before a warm round: lstat every entry of ``trees`` (the source and the previous snapshot),
    so that each warm sample finds the metadata of both in the cache. Without it the first warm sample after
    a cold round found the source cold again (the cold round's last drop came before ``cp -al``, which reads
    only the previous snapshot) and was the slowest of its round."""
    for tree in trees:
        for dirpath, dirs, names in os.walk(tree):
            for name in dirs + names:
                os.lstat(os.path.join(dirpath, name))


def settle():
    """Untimed, before each warm sample: write back what the previous sample left dirty (bare rsync does not
    sync), so that no sample pays for another's write-back -- ours ends with a syncfs of the whole file
    system."""
    os.sync()


def order_of(sides, run):
    """``sides`` rotated by ``run``, so that each side goes first in turn."""
    shift = run % len(sides)
    return sides[shift:] + sides[:shift]


class ContentstoreScenarios:
    """Methods of :class:`measure.Bench` for the contentstore rows."""

    def snapshots(self):
        return catalog.done_backups(self.sb.backup_dir, "contentstore")

    def rsync_argv(self, dest, link_dest=None):
        argv = ["rsync", "-a"] + (["--link-dest=%s" % link_dest] if link_dest else [])
        return argv + [self.sb.contentstore_dir.rstrip("/") + "/", dest.rstrip("/") + "/"]

    def ours_snapshot(self, op, run, position, cold, env_path=None, **facts):
        result = self.worker("snapshot", self.new_name("contentstore"), env_path=env_path)
        info = result["info"] or {}
        return self.add(op, "ours", run, position, result["seconds"], cold, call=result["call"],
                        engine=info.get("engine", "rsync"), files=info.get("files"),
                        bytes_copied=info.get("bytes_copied"), stage_duration_s=info.get("duration_s"),
                        compare=info.get("compare"), dirs_trusted=info.get("dirs_trusted"),
                        dirs_compared=info.get("dirs_compared"), name=info.get("name"),
                        workers=info.get("workers"), steps=result.get("steps"), **facts)

    def wait_until_old(self, written_at, margin):
        """Sleep until the dataset's directories are ``margin`` s older than now, as a real store's are:
        the nightly engine compares directories changed within its margin before the previous snapshot
        file by file. Records a note when it waited."""
        wait = written_at + margin + 5 - time.time()
        if wait > 0:
            self.notes.append("waited %.0f s before the first copy so that the dataset's directories are older "
                              "than the engine's trust margin (%d s), as a real store's are" % (wait, margin))
            time.sleep(wait)

    def first_copy(self, runs=1):
        """Full copies, alternating: bare ``rsync -a`` (removed) and ours (only the last one stays, as the
        base of the nights)."""
        for run in range(runs):
            for position, side in enumerate(order_of(["bare", "ours"], run)):
                cold = self.cold()
                if side == "bare":
                    dest = os.path.join(self.bare_root, "full")
                    seconds, _proc = self.bare(self.rsync_argv(dest), "rsync -a (full copy)")
                    self.add("snapshot_full", "bare", run, position, seconds, cold)
                    shutil.rmtree(dest)
                else:
                    sample = self.ours_snapshot("snapshot_full", run, position, cold)
                    if run < runs - 1:
                        self.remove_entry(os.path.join(catalog.kind_dir(self.sb.backup_dir, "contentstore"),
                                                       sample["name"]))

    def nightly(self, op, run, add_files, rounds=ROUNDS):
        """One night: ``add_files()`` (untimed), then, for each cache state in ``rounds``, ours, bare
        ``rsync -a --link-dest`` and the floor ``cp -al`` of the same previous snapshot, in alternating
        order ("cold": page cache dropped before each sample; "warm": right after the cold round, both trees
        read once before it (:func:`warm_up`) and the file system synced before each sample (:func:`settle`)).
        Ours' warm-round snapshot links to the same previous snapshot as its cold one (whose metadata is
        moved aside meanwhile) and is left without metadata afterwards. Returns (previous
        snapshot path, bare cold copy path); every tree made stays until :meth:`clean_extras`."""
        previous = self.snapshots()[-1].path
        add_files()
        bare_cold = None
        kept = None
        for cache in rounds:
            if cache == "warm":
                warm_up(self.sb.contentstore_dir, previous)
            for position, side in enumerate(order_of(["ours", "bare", "floor"], run)):
                if cache == "cold":
                    cold = self.cold()
                else:
                    settle()
                    cold = False
                if side == "ours":
                    if kept is not None:
                        os.rename(catalog.info_path(kept), catalog.info_path(kept) + ".aside")
                    sample = self.ours_snapshot(op, run, position, cold, cache=cache)
                    path = os.path.join(catalog.kind_dir(self.sb.backup_dir, "contentstore"), sample["name"])
                    if kept is None:
                        kept = path
                    else:
                        self.remove_entry_metadata(path)
                        self.extras.append(path)
                        os.rename(catalog.info_path(kept) + ".aside", catalog.info_path(kept))
                elif side == "bare":
                    dest = os.path.join(self.bare_root, "%s-%d-%s" % (op, run, cache))
                    seconds, _proc = self.bare(self.rsync_argv(dest, previous), "rsync --link-dest")
                    self.add(op, "bare", run, position, seconds, cold, cache=cache)
                    if bare_cold is None:
                        bare_cold = dest
                    else:
                        self.extras.append(dest)
                else:
                    dest = os.path.join(self.bare_root, "%s-%d-%s-floor" % (op, run, cache))
                    seconds, _proc = self.bare(["cp", "-al", previous, dest], "cp -al")
                    self.add(op, "floor", run, position, seconds, cold, cache=cache)
                    # The durable floor: ours syncs the file system before the snapshot counts (issue 10).
                    synced, _proc = self.bare(["sync", "-f", dest], "sync -f")
                    self.add(op, "floor_sync", run, position, seconds + synced, cold, cache=cache)
                    self.extras.append(dest)
        return previous, bare_cold

    def retention_delete(self, run, ours_path, bare_path, scenario):
        """Delete one snapshot each: ours with retention.remove_tree (its metadata dropped first, untimed),
        bare with ``rm -rf``; both trees hold the same files and directories."""
        self.remove_entry_metadata(ours_path)
        for position, side in enumerate(order_of(["ours", "bare"], run)):
            cold = self.cold()
            if side == "ours":
                result = self.worker("remove", ours_path)
                self.add("retention_delete", side, run, position, result["seconds"], cold, scenario=scenario)
            else:
                seconds, _proc = self.bare(["rm", "-rf", "--", bare_path], "rm -rf")
                self.add("retention_delete", side, run, position, seconds, cold, scenario=scenario)

    @staticmethod
    def remove_entry_metadata(path):
        try:
            os.unlink(catalog.info_path(path))
        except FileNotFoundError:
            pass

    def clean_extras(self):
        """Untimed: remove the trees only made to be measured (warm-round and floor copies)."""
        for path in self.extras:
            self.remove_entry(path)
        self.extras = []

    def contentstore_nights(self, runs, new_files, first_new_day, seed):
        """The nights, then the retention deletes (after all nights: ext4 avoids reusing inodes freed less
        than a minute before, which would slow the next night's directory creation; production deletes a
        day before the next snapshot)."""
        deletes = []
        for run in range(runs):
            day = first_new_day + datetime.timedelta(days=run)

            def add(day=day, run=run):
                files = dataset.add_night(self.sb.contentstore_dir, new_files, day, seed + 1000 + run, self.sb.uid,
                                          self.sb.gid)
                dataset.insert_rows(self.sb, files)
                os.sync()
            deletes.append(self.nightly("snapshot_1pct", run, add) + ("1pct",))
        for run in range(runs):
            deletes.append(self.nightly("snapshot_nochange", run, lambda: None) + ("nochange",))
        for index, (previous, bare_dest, scenario) in enumerate(deletes):
            self.retention_delete(index, previous, bare_dest, scenario)
        self.clean_extras()
        self.note_workers(("snapshot_1pct", "snapshot_nochange"))

    def note_workers(self, ops):
        """A note of the worker processes the nightly engine chose in each sample of ``ops``
        (CONTENTSTORE_PARALLEL=0 lets it decide: the numbers tell whether it added workers on a cold cache and
        kept one per core on a warm one)."""
        parts = []
        for op in ops:
            for cache in ("cold", "warm"):  # the scenario, as report.py groups the rows (not whether dropping worked)
                chosen = [str(s.get("workers") or "?") for s in self.samples.get(op, [])
                          if s["side"] == "ours" and s.get("cache", "cold") == cache]
                if chosen:
                    parts.append("%s, %s cache: %s" % (op, cache, " / ".join(chosen)))
        if parts:
            self.notes.append("worker processes the nightly engine chose (%d cores): %s" % (os.cpu_count() or 1,
                                                                                  "; ".join(parts)))

    # ---- the same on btrfs ------------------------------------------------------------------------------
    def btrfs_nights(self, runs, new_files, first_new_day, seed):
        """BACKUP_DIR on a loop-mounted btrfs (made here, removed afterwards): a first copy (untimed), then
        ``runs`` 1 % nights, ours (subvolume snapshots) against ``rsync -a --link-dest`` into the same
        file system, then the retention deletes (ours: a subvolume; bare: ``rm -rf`` of a hardlinked copy).
        Skipped with a note when no loop btrfs can be made (not root, no loop device)."""
        import btrfs_loop  # tests/btrfs_loop.py (run.py puts tests/ on sys.path)

        reason = btrfs_loop.unavailable()
        if reason:
            self.notes.append("btrfs section skipped: %s" % reason)
            return
        size = int(dataset.tree_stats(self.sb.contentstore_dir)["bytes"] * 1.6) + (3 << 30)
        loop = btrfs_loop.LoopBtrfs.create(size=size, workdir=os.path.dirname(self.sb.root))
        try:
            self._btrfs_nights(loop.mountpoint, runs, new_files, first_new_day, seed)
        finally:
            loop.destroy()

    def _btrfs_nights(self, mountpoint, runs, new_files, first_new_day, seed):
        backup_dir, bare_root = os.path.join(mountpoint, "backups"), os.path.join(mountpoint, "bare")
        for path in (backup_dir, bare_root):
            os.mkdir(path, 0o700)
            os.chown(path, self.sb.uid, self.sb.gid)
        overrides = dict(self.env_overrides, BACKUP_DIR=backup_dir, WAL_ARCHIVE_DIR=self.sb.wal_archive_dir)
        env_path = self.sb.write_env(path=os.path.join(self.sb.root, "backup-btrfs.env"), **overrides)
        first = self.worker("snapshot", self.new_name("contentstore"), env_path=env_path)["info"]
        folder = catalog.kind_dir(backup_dir, "contentstore")
        previous = os.path.join(folder, first["name"])
        bare_previous = os.path.join(bare_root, "first")
        self.bare(["cp", "-a", "--reflink=always", previous, bare_previous], "cp --reflink (untimed)")
        pairs = []
        for run in range(runs):
            files = dataset.add_night(self.sb.contentstore_dir, new_files, first_new_day + datetime.timedelta(days=run),
                                      seed + 2000 + run, self.sb.uid, self.sb.gid)
            dataset.insert_rows(self.sb, files)
            os.sync()
            bare_dest = os.path.join(bare_root, "night-%d" % run)
            for position, side in enumerate(order_of(["ours", "bare"], run)):
                cold = self.cold()
                if side == "ours":
                    sample = self.ours_snapshot("btrfs_1pct", run, position, cold, env_path=env_path)
                else:
                    seconds, _proc = self.bare(self.rsync_argv(bare_dest, bare_previous), "rsync --link-dest")
                    self.add("btrfs_1pct", "bare", run, position, seconds, cold)
            pairs.append((previous, bare_previous))
            previous, bare_previous = os.path.join(folder, sample["name"]), bare_dest
        for run, (ours_path, bare_path) in enumerate(pairs):
            self.remove_entry_metadata(ours_path)
            for position, side in enumerate(order_of(["ours", "bare"], run)):
                cold = self.cold()
                if side == "ours":
                    result = self.worker("remove", ours_path, env_path=env_path)
                    self.add("btrfs_delete", side, run, position, result["seconds"], cold)
                else:
                    seconds, _proc = self.bare(["rm", "-rf", "--", bare_path], "rm -rf")
                    self.add("btrfs_delete", side, run, position, seconds, cold)
