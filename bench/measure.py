"""The measurements: each scenario runs our stage and the bare tool side by side, alternating, cold cache.

:class:`Bench` holds the sandbox and every sample. A sample is a dict: ``side`` (``ours``, ``bare``,
``bare_gzip``), ``run``, ``position`` (0 = ran first in its run), ``seconds``, ``cold`` (the page cache
was dropped just before), optionally ``ok`` (False: the step failed; kept, never counted in a median),
plus facts such as ``size_bytes``. Ours runs in bench/worker.py as the service
user (only the stage call is timed); bare tools run as the service user too, timed around the process.
Nothing here judges a timing: bench/report.py compares medians with the targets.
"""

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import snapshots
from snapshots import order_of

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
PROJECT_DIR = os.path.dirname(BENCH_DIR)
WORKER = os.path.join(BENCH_DIR, "worker.py")
STAGE_RE = re.compile(r"backup: (\w+)\s+(OK|WARN|FAILED|SKIPPED)\s+(\d+\.\d+)s")
TOTAL_RE = re.compile(r"backup: total (\d+\.\d+) s")
DB_RUNS_FACTOR = 3  # database backup: this many samples of ours and of bare per --runs (see db_backup)
EXTRACT = {".tar": ["-xf"], ".tar.gz": ["-xzf"], ".tar.zst": ["--zstd", "-xf"], ".tar.lz4": ["-I", "lz4", "-xf"]}

import catalog  # noqa: E402  (bench/run.py puts the project directory on sys.path)


class BenchError(Exception):
    """A benchmark step failed (not a timing judgement): the message shows the command and its output."""


def drop_caches():
    """sync, then ask the kernel to drop the page cache, dentries and inodes. True when that worked."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def restore_verify_available(python=sys.executable, project_dir=PROJECT_DIR):
    """True when restore.py exists and has a ``verify`` command (``restore.py verify --help`` exits 0)."""
    path = os.path.join(project_dir, "restore.py")
    if not os.path.isfile(path):
        return False
    proc = subprocess.run([python, path, "verify", "--help"], check=False, capture_output=True, cwd=project_dir,
                          timeout=120)
    return proc.returncode == 0


class Bench(snapshots.ContentstoreScenarios):
    """One benchmark session on sandbox ``sb`` with the backup configuration ``env_path`` (written with
    the ``--set`` overrides ``env_overrides``)."""

    def __init__(self, sb, env_path, log=print, env_overrides=None):
        self.sb = sb
        self.env_path = env_path
        self.env_overrides = dict(env_overrides or {})
        self.log = log
        self.samples = {}
        self.notes = []
        self.cold_ok = None
        self.bare_root = os.path.join(sb.root, "bare")
        self._mkdir(self.bare_root, 0o700)
        self._last_name = {}
        self.plan = None
        self.extras = []

    # ---- plumbing ---------------------------------------------------------------------------------
    def _mkdir(self, path, mode=0o755):
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode)
        if os.geteuid() == 0:
            os.chown(path, self.sb.uid, self.sb.gid)

    def cold(self):
        ok = drop_caches()
        self.cold_ok = ok if self.cold_ok is None else (self.cold_ok and ok)
        return ok

    def add(self, op, side, run, position, seconds, cold, **facts):
        sample = {"side": side, "run": run, "position": position, "seconds": round(seconds, 4), "cold": cold}
        sample.update(facts)
        self.samples.setdefault(op, []).append(sample)
        self.log("  %-18s %-9s run %d: %8.3f s%s%s" % (op, side, run, seconds, "" if cold else " (warm cache)",
                                                       "" if facts.get("ok", True) else " FAILED, not counted"))
        return sample

    def bare(self, argv, what, timeout=3600, extra_env=None):
        """Run ``argv`` as the service user; returns (seconds, CompletedProcess). Raises BenchError."""
        started = time.monotonic()
        proc = self.sb.run_as_service_user(argv, extra_env=extra_env, timeout=timeout)
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            raise BenchError("%s failed (exit %d): %s\n%s" % (what, proc.returncode, " ".join(argv),
                                                                (proc.stderr or proc.stdout)[-3000:]))
        return seconds, proc

    def worker(self, op, *args, timeout=3600, env_path=None):
        """Run bench/worker.py OP as the service user (with ``env_path``, default the bench's .env);
        returns its JSON result. Raises BenchError."""
        argv = [self.sb.python, WORKER, op, env_path or self.env_path] + [str(a) for a in args]
        proc = self.sb.run_as_service_user(argv, timeout=timeout)
        if proc.returncode != 0:
            raise BenchError("our %s failed (exit %d):\n%s" % (op, proc.returncode, proc.stderr[-4000:]))
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def pg_env(self):
        return {"PGHOST": self.sb.socket_dir, "PGPORT": self.sb.port, "PGUSER": "alfresco",
                "PGPASSWORD": self.sb.alfresco_password, "PGCONNECT_TIMEOUT": "30", "PGAPPNAME": "bench"}

    def new_name(self, kind):
        """A backup name for now that sorts after every name this session used (waits up to 1 s)."""
        while True:
            name = catalog.backup_name(kind, datetime.datetime.now().replace(microsecond=0))
            base = os.path.join(catalog.kind_dir(self.sb.backup_dir, kind), name)
            if name > self._last_name.get(kind, "") and not os.path.exists(base) \
                    and not os.path.exists(base + catalog.PARTIAL_SUFFIX):
                self._last_name[kind] = name
                return name
            time.sleep(0.05)

    @staticmethod
    def remove_entry(path):
        """Untimed clean-up of a backup directory and its metadata file."""
        shutil.rmtree(path, ignore_errors=True)
        for suffix in ("", ".tmp"):
            try:
                os.unlink(catalog.info_path(path) + suffix)
            except FileNotFoundError:
                pass

    # ---- database backup ----------------------------------------------------------------------------
    def basebackup_plan(self):
        if self.plan is None:
            self.plan = self.worker("plan")
        return self.plan

    def gzip_args(self):
        """Our flags with the compression replaced by ``-z`` (gzip, what the seed used)."""
        args = [a for a in self.basebackup_plan()["args"]
                if not (a.startswith("--compress") or a in ("-z", "--gzip") or re.match(r"^-Z\d*$", a))]
        return args + ["-z"]

    def db_backup(self, runs):
        """``DB_RUNS_FACTOR * runs`` samples of ours and of bare pg_basebackup with the same flags, ``runs`` of
        the gzip one (every DB_RUNS_FACTOR-th run): a cold read of the database spreads by a second between
        identical samples on a VM disk, and these samples are cheap."""
        plan = self.basebackup_plan()
        for note in plan["notes"]:
            self.notes.append("basebackup_plan: %s" % note)
        flags = {"bare": plan["args"], "bare_gzip": self.gzip_args()}
        for run in range(runs * DB_RUNS_FACTOR):
            sides = order_of(["ours", "bare", "bare_gzip"], run // DB_RUNS_FACTOR) if run % DB_RUNS_FACTOR == 0 \
                else order_of(["ours", "bare"], run)
            for position, side in enumerate(sides):
                cold = self.cold()
                if side == "ours":
                    result = self.worker("base_backup", self.new_name("postgres"))
                    info = result["info"]
                    self.add("db_backup", side, run, position, result["seconds"], cold, size_bytes=info["size_bytes"],
                             files=info["files"], stage_duration_s=info.get("duration_s"), call=result["call"],
                             compression=info.get("compression"), steps=result.get("steps"))
                    self.remove_entry(os.path.join(catalog.kind_dir(self.sb.backup_dir, "postgres"), info["name"]))
                else:
                    dest = os.path.join(self.bare_root, "db-%s-%d" % (side, run))
                    seconds, _proc = self.bare([plan["tool"], "-D", dest] + flags[side], "pg_basebackup",
                                               extra_env=self.pg_env())
                    files = {n: os.path.getsize(os.path.join(dest, n)) for n in sorted(os.listdir(dest))}
                    self.add("db_backup", side, run, position, seconds, cold, size_bytes=sum(files.values()),
                             files=files, flags=flags[side])
                    shutil.rmtree(dest)

    # ---- whole night ----------------------------------------------------------------------------------
    def nightly_runs(self, runs):
        """``backup.py`` end to end; overhead = wall time minus the stage durations of its summary."""
        for run in range(runs):
            cold = self.cold()
            started = time.monotonic()
            proc = self.sb.run_cli("backup.py", env_path=self.env_path, timeout=7200)
            wall = time.monotonic() - started
            stages = {m.group(1): (m.group(2), float(m.group(3))) for m in STAGE_RE.finditer(proc.stdout)}
            total = TOTAL_RE.search(proc.stdout)
            if not stages:
                raise BenchError("backup.py printed no summary (exit %d):\n%s%s" % (
                    proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:]))
            stage_sum = sum(d for _s, d in stages.values())
            failed = [n for n, (s, _d) in stages.items() if s == "FAILED"]
            if failed or proc.returncode != 0:
                self.notes.append("backup.py run %d exit %d, failed stages: %s" % (run, proc.returncode,
                                                                                   ", ".join(failed) or "none"))
            self.add("nightly_overhead", "ours", run, 0, wall - stage_sum, cold, ok=proc.returncode == 0,
                     wall_s=round(wall, 3),
                     stages={n: {"status": s, "seconds": d} for n, (s, d) in stages.items()},
                     stage_sum_s=round(stage_sum, 3), run_total_s=float(total.group(1)) if total else None,
                     exit_code=proc.returncode)

    # ---- restore drill ----------------------------------------------------------------------------------
    def drill_backup(self):
        """The base backup the drill restores: the newest DONE one (from backup.py's nights), else the one of
        a night of ``backup.py`` run now, untimed (``--only restore``: the stage alone leaves its backup
        WAITING_FOR_WAL, which restore.py rightly refuses). Raises BenchError when that night fails."""
        done = catalog.done_backups(self.sb.backup_dir, "postgres")
        if not done:
            proc = self.sb.run_cli("backup.py", env_path=self.env_path, timeout=7200)
            done = catalog.done_backups(self.sb.backup_dir, "postgres")
            if not done:
                raise BenchError("backup.py made no complete base backup for the drill (exit %d):\n%s%s" % (
                    proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:]))
        return done[-1].path

    def restore_drill(self, runs):
        """Per run, in turns: the drill (``restore.py verify``), ``restore.py postgres --immediate --start``
        (the restored server is stopped afterwards, untimed) and the bare restore; the bare samples are the
        reference of both rows."""
        backup = self.drill_backup()
        ours = restore_verify_available()
        if not ours:
            self.notes.append("restore drill, ours: not available yet (no restore.py with a verify command)")
        for run in range(runs):
            sides = order_of(["drill", "postgres", "bare"], run) if ours else ["bare"]
            for position, side in enumerate(sides):
                cold = self.cold()
                if side == "bare":
                    seconds = self.bare_restore(backup)
                    for op in ("restore_drill", "restore_postgres"):
                        self.add(op, "bare", run, position, seconds, cold, backup=os.path.basename(backup))
                elif side == "drill":
                    self._ours_restore("restore_drill", run, position, cold, backup,
                                       ["verify", "--backup", os.path.basename(backup)])
                else:
                    dest = os.path.join(self.sb.root, "restored-%d" % run)
                    try:
                        self._ours_restore("restore_postgres", run, position, cold, backup,
                                           ["postgres", "--to", dest, "--backup", os.path.basename(backup),
                                            "--immediate", "--start"])
                    finally:
                        self._stop_restored(dest)

    def _ours_restore(self, op, run, position, cold, backup, args):
        started = time.monotonic()
        proc = self.sb.run_as_service_user(
            [self.sb.python, os.path.join(PROJECT_DIR, "restore.py"), args[0], "--env", self.env_path] + args[1:],
            timeout=7200)
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            self.notes.append("restore.py %s run %d exit %d: %s" % (
                args[0], run, proc.returncode, (proc.stderr or proc.stdout).strip()[-300:]))
        self.add(op, "ours", run, position, seconds, cold, ok=proc.returncode == 0, exit_code=proc.returncode,
                 backup=os.path.basename(backup), output_tail=(proc.stdout + proc.stderr)[-3000:])

    def _stop_restored(self, dest):
        """Untimed: stop the server ``restore.py postgres --start`` left running on ``dest`` and remove it."""
        if os.path.exists(os.path.join(dest, "postmaster.pid")):
            self.sb.run_as_service_user([os.path.join(self.sb.pg_bin, "pg_ctl"), "-D", dest, "-m", "immediate",
                                         "-w", "stop"], timeout=120)
        shutil.rmtree(dest, ignore_errors=True)

    def bare_restore(self, backup):
        """``tar -x`` base + pg_wal into a fresh directory, start ``postgres`` on it (no archiving, own port
        and socket) and wait until it accepts connections. Returns seconds; stops it and cleans up."""
        work = os.path.join(self.sb.root, "drill")
        pgdata, sock = os.path.join(work, "pgdata"), os.path.join(work, "run")
        for path, mode in ((work, 0o755), (pgdata, 0o700), (sock, 0o755)):
            self._mkdir(path, mode)
        names = sorted(os.listdir(backup))
        base = next(n for n in names if n.startswith("base.tar"))
        wal_tar = next((n for n in names if n.startswith("pg_wal.tar")), None)
        port = _free_port()
        proc = None
        started = time.monotonic()
        try:
            self.bare(["tar"] + EXTRACT[base[len("base"):]] + [os.path.join(backup, base), "-C", pgdata], "tar -x")
            if wal_tar:
                self.bare(["tar"] + EXTRACT[wal_tar[len("pg_wal"):]] + [os.path.join(backup, wal_tar), "-C",
                                                                          os.path.join(pgdata, "pg_wal")], "tar -x")
            proc = self._start_postgres(pgdata, sock, port, os.path.join(work, "postgres.log"))
            self._wait_ready(proc, sock, port, os.path.join(work, "postgres.log"))
            return time.monotonic() - started
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGINT)  # fast shutdown
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            shutil.rmtree(work, ignore_errors=True)

    def _start_postgres(self, pgdata, sock, port, log_path):
        argv = [os.path.join(self.sb.pg_bin, "postgres"), "-D", pgdata, "-p", str(port), "-c", "listen_addresses=",
                "-c", "unix_socket_directories=%s" % sock, "-c", "archive_mode=off", "-c", "restore_command="]
        kwargs = {}
        if os.geteuid() == 0:
            kwargs = {"user": self.sb.uid, "group": self.sb.gid, "extra_groups": []}
        log = open(log_path, "ab")
        try:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.sb.root, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                    **kwargs)
        finally:
            log.close()

    def _wait_ready(self, proc, sock, port, log_path, timeout=600):
        isready = [os.path.join(self.sb.pg_bin, "pg_isready"), "-q", "-h", sock, "-p", str(port)]
        deadline = time.monotonic() + timeout
        while subprocess.run(isready, check=False).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log_path, encoding="utf-8", errors="replace") as handle:
                    tail = handle.read()[-3000:]
                raise BenchError("the restored server did not come up (exit %s):\n%s" % (proc.poll(), tail))
            time.sleep(0.02)


def _free_port():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
