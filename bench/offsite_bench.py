"""The ``offsite`` section: ``backup.py --offsite`` against bare ``rclone copy`` to a loopback S3 server
(``rclone serve s3``, tests/s3server.py), in the same run, alternating, cold cache before each sample.

- ``offsite_full``: everything DONE goes to an empty prefix (our state file removed first): ours is the whole
  ``backup.py --offsite`` process; bare is ``rclone copy`` of the same directories (the newest snapshot's tree,
  each base backup and config copy, the WAL archive) to another empty prefix, timed together.
- ``offsite_1pct``: a night adds P % new files (then ``backup.py`` makes its snapshot, untimed); ours ships the
  night into the prefix of the last full upload, bare copies the new snapshot's whole tree into its prefix
  (rclone lists both sides and sends the new files). The server's request log gives each side's request count
  (in the samples and the notes).
"""

import datetime
import os
import shutil
import time

import catalog
import dataset
from s3server import S3Server


def _env_values(path):
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


class OffsiteBench:
    def __init__(self, bench):
        self.bench, self.sb = bench, bench.sb
        self.values = _env_values(bench.env_path)

    def env(self, s3, prefix):
        return self.sb.write_env(path=os.path.join(self.sb.root, "offsite-%s.env" % prefix),
                                 **dict(self.values, **s3.env("s3test:alfresco-backups/" + prefix)))

    def cli(self, env, *args):
        started = time.monotonic()
        proc = self.sb.run_cli("backup.py", list(args), env_path=env, timeout=6 * 3600)
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            raise self.bench_error("backup.py %s failed (exit %d):\n%s" % (" ".join(args), proc.returncode,
                                                                         (proc.stdout + proc.stderr)[-4000:]))
        return seconds

    def bench_error(self, message):
        import measure

        return measure.BenchError(message)

    def rclone(self, s3, src, dest):
        argv = [s3_binary(), "--config", s3.conf, "copy", src, "s3test:alfresco-backups/" + dest, "--transfers", "4"]
        seconds, _proc = self.bench.bare(argv, "rclone copy %s" % src, timeout=6 * 3600)
        return seconds

    def reset_state(self):
        for name in os.listdir(self.sb.backup_dir):
            if name.startswith("offsite-state.sqlite"):
                os.unlink(os.path.join(self.sb.backup_dir, name))
        shutil.rmtree(os.path.join(self.sb.backup_dir, "offsite"), ignore_errors=True)

    def bare_full(self, s3, prefix):
        seconds = 0.0
        snap = catalog.done_backups(self.sb.backup_dir, "contentstore")[-1]
        seconds += self.rclone(s3, snap.path, prefix + "/content")
        for kind in ("postgres", "config"):
            for entry in catalog.done_backups(self.sb.backup_dir, kind):
                seconds += self.rclone(s3, entry.path, "%s/%s/%s" % (prefix, kind, entry.name))
        seconds += self.rclone(s3, self.sb.wal_archive_dir, prefix + "/wal")
        return seconds

    def run(self, runs, new_files, first_day, seed):
        sb, bench = self.sb, self.bench
        self.cli(bench.env_path)  # a complete night to ship (untimed)
        with S3Server(owner=sb.user, root=os.path.join(sb.root, "s3")) as s3:
            last = {}
            for run in range(runs):
                for position, side in enumerate(("ours", "bare")[::1 if run % 2 == 0 else -1]):
                    prefix = "%s-%d" % (side, run)
                    cold = bench.cold()
                    mark = s3.request_mark()
                    if side == "ours":
                        self.reset_state()
                        env = self.env(s3, prefix)
                        seconds = self.cli(env, "--offsite")
                    else:
                        seconds = self.bare_full(s3, prefix)
                    objects = len(s3.objects(prefix))
                    bench.add("offsite_full", side, run, position, seconds, cold, requests=len(s3.requests()) - mark,
                              objects=objects, size_bytes=dataset.tree_stats(s3.base(prefix)).get("bytes"))
                    if side in last:
                        shutil.rmtree(s3.base(last[side]), ignore_errors=True)  # disk: keep one copy per side
                    last[side] = prefix
            ours_env = self.env(s3, last["ours"])
            for run in range(runs):
                day = first_day + datetime.timedelta(days=run)
                files = dataset.add_night(sb.contentstore_dir, new_files, day, seed + 5000 + run, sb.uid, sb.gid)
                dataset.insert_rows(sb, files)
                self.cli(bench.env_path)  # tonight's snapshot (untimed)
                snap = catalog.done_backups(sb.backup_dir, "contentstore")[-1]
                for position, side in enumerate(("ours", "bare")[::1 if run % 2 == 0 else -1]):
                    cold = bench.cold()
                    mark = s3.request_mark()
                    if side == "ours":
                        seconds = self.cli(ours_env, "--offsite")
                    else:
                        seconds = self.rclone(s3, snap.path, last["bare"] + "/content")
                    requests = s3.requests()[mark:]
                    bench.add("offsite_1pct", side, run, position, seconds, cold, requests=len(requests),
                              new_files=len(files), lists=len([r for r in requests if r[0].startswith("LIST")]))
        ours = [s for s in bench.samples.get("offsite_1pct", []) if s["side"] == "ours"]
        bare = [s for s in bench.samples.get("offsite_1pct", []) if s["side"] == "bare"]
        if ours and bare:
            bench.notes.append(
                "off-site 1%% night: ours %s requests for %d new files (%.1f per new file, every other object "
                "untouched), bare rclone copy of the tree %s requests (it lists the whole tree on both sides)" % (
                    "/".join(str(s["requests"]) for s in ours), ours[0]["new_files"],
                    ours[0]["requests"] / float(max(1, ours[0]["new_files"])),
                    "/".join(str(s["requests"]) for s in bare)))


def s3_binary():
    import s3server

    return s3server.rclone_binary()
