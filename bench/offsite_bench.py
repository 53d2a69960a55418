"""The ``offsite`` section: ``backup.py --offsite`` against bare ``rclone copy`` to a loopback S3 server
(``rclone serve s3``, tests/s3server.py), in the same run, alternating, cold cache before each sample.

- ``offsite_full``: everything DONE goes to an empty prefix (our state file removed first): ours is the whole
  ``backup.py --offsite`` process; bare is ``rclone copy`` of the same directories (the newest snapshot's tree,
  each base backup and config copy, the WAL archive) to another empty prefix, timed together.
- ``offsite_1pct``: a night adds P % new files (then ``backup.py`` makes its snapshot, untimed); ours ships the
  night into the prefix of the last full upload, bare copies the new snapshot's whole tree into its prefix
  (rclone lists both sides and sends the new files). The server's request log gives each side's request count
  (in the samples and the notes).

Where ours' time goes beyond bare (``content_phases``): ``backup.py``'s log times each rclone run it starts, so
a full sample also records the seconds before the content upload (the WAL, each kept night's manifest, the
base backups and configuration copies), the content upload itself and the rest; bare's sample
records its copy of the snapshot apart from the other directories.
"""

import datetime
import os
import re
import shutil
import time

import catalog
import dataset
from s3server import S3Server


LOG_LINE_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (.*)$", re.M)


def content_phases(log_text, contentstore_dir):
    """(seconds from the log's first line to the first content upload, seconds of the content upload runs: from
    the first to the start of the next other run) from ``backup.py --offsite``'s log text; None when the log has
    no content upload followed by another run (pure)."""
    first, runs = None, []
    for match in LOG_LINE_RE.finditer(log_text):
        stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(match.group(2)) / 1e3
        first = stamp if first is None else first
        command = match.group(3).partition("running: ")[2]
        if command:
            runs.append((stamp, " copy %s/" % contentstore_dir.rstrip("/") in command))
    content = [i for i, (_stamp, is_content) in enumerate(runs) if is_content]
    if not content or content[-1] + 1 >= len(runs):
        return None
    return runs[content[0]][0] - first, runs[content[-1] + 1][0] - runs[content[0]][0]


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
        seconds, _proc = self.cli_run(env, *args)
        return seconds

    def cli_run(self, env, *args):
        started = time.monotonic()
        proc = self.sb.run_cli("backup.py", list(args), env_path=env, timeout=6 * 3600)
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            raise self.bench_error("backup.py %s failed (exit %d):\n%s" % (" ".join(args), proc.returncode,
                                                                         (proc.stdout + proc.stderr)[-4000:]))
        return seconds, proc

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
        """(seconds in all, seconds of the snapshot's copy)."""
        snap = catalog.done_backups(self.sb.backup_dir, "contentstore")[-1]
        content = seconds = self.rclone(s3, snap.path, prefix + "/content")
        for kind in ("postgres", "config"):
            for entry in catalog.done_backups(self.sb.backup_dir, kind):
                seconds += self.rclone(s3, entry.path, "%s/%s/%s" % (prefix, kind, entry.name))
        seconds += self.rclone(s3, self.sb.wal_archive_dir, prefix + "/wal")
        return seconds, content

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
                    phases = {}
                    if side == "ours":
                        self.reset_state()
                        env = self.env(s3, prefix)
                        seconds, proc = self.cli_run(env, "--offsite")
                        found = content_phases(proc.stdout + proc.stderr,
                                               catalog.kind_dir(sb.backup_dir, "contentstore"))
                        if found:
                            phases = {"before_content_s": round(found[0], 3), "content_s": round(found[1], 3)}
                    else:
                        seconds, content = self.bare_full(s3, prefix)
                        phases = {"content_s": round(content, 3)}
                    objects = len(s3.objects(prefix))
                    bench.add("offsite_full", side, run, position, seconds, cold, requests=len(s3.requests()) - mark,
                              objects=objects, size_bytes=dataset.tree_stats(s3.base(prefix)).get("bytes"),
                              nights=len(catalog.done_backups(sb.backup_dir, "contentstore")), **phases)
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
        bench.notes.append(full_note(bench.samples.get("offsite_full", [])))
        ours = [s for s in bench.samples.get("offsite_1pct", []) if s["side"] == "ours"]
        bare = [s for s in bench.samples.get("offsite_1pct", []) if s["side"] == "bare"]
        if ours and bare:
            bench.notes.append(
                "off-site 1%% night: ours %s requests for %d new files (%.1f per new file, every other object "
                "untouched), bare rclone copy of the tree %s requests (it lists the whole tree on both sides)" % (
                    "/".join(str(s["requests"]) for s in ours), ours[0]["new_files"],
                    ours[0]["requests"] / float(max(1, ours[0]["new_files"])),
                    "/".join(str(s["requests"]) for s in bare)))


def full_note(samples):
    """Where the full upload's time went, per run: ours before / during / after its content upload against
    bare's copy of the snapshot and of the rest (pure)."""
    parts = []
    for run in sorted({s["run"] for s in samples}):
        ours = [s for s in samples if s["run"] == run and s["side"] == "ours" and "content_s" in s]
        bare = [s for s in samples if s["run"] == run and s["side"] == "bare" and "content_s" in s]
        if ours and bare:
            o, b = ours[0], bare[0]
            parts.append("run %d: ours %.1f s before the content upload + %.1f s upload + %.1f s start-up and after, "
                         "bare %.1f s snapshot copy + %.1f s the rest" % (
                             run, o["before_content_s"], o["content_s"],
                             o["seconds"] - o["before_content_s"] - o["content_s"], b["content_s"],
                             b["seconds"] - b["content_s"]))
    nights = samples[0].get("nights") if samples else None
    return "off-site upload of everything (%s nights kept, each listed for its manifest): %s" % (
        nights, "; ".join(parts) or "no phases found in the log")


def s3_binary():
    import s3server

    return s3server.rclone_binary()
