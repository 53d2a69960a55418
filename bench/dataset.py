"""The benchmark's data: a synthetic Alfresco contentstore, a pgbench database, and what they cost on disk.

Contentstore (:func:`plan_contentstore` → :func:`write_contentstore`): random bytes (a seeded generator, so
a run is reproducible) in ``YYYY/M/D/H/M/<uuid>.bin`` (no zero padding), ~5.4 files per minute bucket,
~17 buckets per working day (5 business hours, 3-4 minutes each), which gives ~15,000 directories for
60,000 files as in the field notes. Sizes are log-uniform between 5 and 160 KB (mean ~45 KB), plus one
large file (2-10 MB) per thousand: 60,000 files ≈ 3.0 GB, 3,000 files ≈ 150 MB. File and directory
mtimes are their bucket's time, as on a real store. Everything belongs to the service user.

:func:`add_night` writes one night's new files into the next day's buckets; :func:`init_pgbench` fills
the sandbox's ``alfresco`` database with ``pgbench -i``; :func:`insert_rows` gives each file its Alfresco
rows (``store://`` URL), so that a restore drill has real content to check. Nothing here measures anything.
"""

import datetime
import glob
import math
import os
import random
import shutil
import subprocess
import time
import uuid

FILES_PER_BUCKET = 5.4
HOURS_PER_DAY = 5
SMALL_MIN, SMALL_MAX = 5 * 1024, 160 * 1024
LARGE_MIN, LARGE_MAX = 2 * 1024 * 1024, 10 * 1024 * 1024
LARGE_EVERY = 1000
FIRST_DAY = datetime.date(2022, 1, 3)
PGBENCH_BYTES_PER_SCALE = 15_200_000  # table + indexes per scale unit (scale 60 ≈ 905 MB with the catalogs)
PGBENCH_BASE_BYTES = 10_000_000
WAL_SEGMENT = 16 * 1024 * 1024
CHUNK = 1024 * 1024


class DatasetError(Exception):
    """The dataset cannot be built (disk too small, pgbench failed); the message says what to change."""


class ContentPlan:
    """What :func:`plan_contentstore` decided: ``files`` [(relpath, size, mtime)], ``dirs`` (set of
    relative directory paths, parents included), ``bytes_total``, ``last_day`` (datetime.date)."""

    def __init__(self, files, dirs, last_day):
        self.files = files
        self.dirs = dirs
        self.last_day = last_day
        self.bytes_total = sum(size for _p, size, _m in files)

    @property
    def large_files(self):
        return sum(1 for _p, size, _m in self.files if size >= LARGE_MIN)


def _sizes(rng, count):
    sizes = [int(SMALL_MIN * math.exp(rng.random() * math.log(SMALL_MAX / SMALL_MIN))) for _ in range(count)]
    for index in rng.sample(range(count), max(1, count // LARGE_EVERY) if count else 0):
        sizes[index] = rng.randint(LARGE_MIN, LARGE_MAX)
    return sizes


def _buckets(rng, count, first_day, one_day=False):
    """``count`` minute buckets (Y, M, D, h, m) from ``first_day`` on, in time order; ``one_day``: all on
    ``first_day`` (at most 1440)."""
    if one_day:
        minutes = sorted(rng.sample(range(24 * 60), min(count, 24 * 60)))
        return [(first_day.year, first_day.month, first_day.day, m // 60, m % 60) for m in minutes]
    buckets, day = [], first_day
    while len(buckets) < count:
        for hour in sorted(rng.sample(range(7, 20), HOURS_PER_DAY)):
            for minute in sorted(rng.sample(range(60), rng.randint(3, 4))):
                buckets.append((day.year, day.month, day.day, hour, minute))
        day += datetime.timedelta(days=1)
    return buckets[:count]


def _place(rng, n_files, first_day, one_day=False):
    """[(relpath, size, mtime)] for ``n_files`` new files, spread over buckets from ``first_day``."""
    if n_files <= 0:
        return []
    wanted = max(1, min(n_files, int(round(n_files / FILES_PER_BUCKET))))
    buckets = _buckets(rng, wanted, first_day, one_day)
    counts = [1] * len(buckets)
    for _ in range(n_files - len(buckets)):
        counts[rng.randrange(len(buckets))] += 1
    sizes = _sizes(rng, n_files)
    files = []
    for bucket, count in zip(buckets, counts):
        base = time.mktime(datetime.datetime(*bucket).timetuple())
        for _ in range(count):
            ident = uuid.UUID(int=rng.getrandbits(128), version=4)
            reldir = "/".join(str(part) for part in bucket)
            files.append(("%s/%s.bin" % (reldir, ident), sizes[len(files)], base + rng.random() * 59))
    return files


def _dirs_of(files):
    dirs = set()
    for relpath, _size, _mtime in files:
        parent = os.path.dirname(relpath)
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    return dirs


def plan_contentstore(n_files, seed):
    """A :class:`ContentPlan` for ``n_files`` files (pure: nothing is written)."""
    rng = random.Random(seed)
    files = _place(rng, n_files, FIRST_DAY)
    last = max((f[2] for f in files), default=time.mktime(FIRST_DAY.timetuple()))
    return ContentPlan(files, _dirs_of(files), datetime.date.fromtimestamp(last))


def _random_bytes(rng, size):
    if hasattr(rng, "randbytes"):  # Python 3.9+
        return rng.randbytes(size)
    return rng.getrandbits(size * 8).to_bytes(size, "little") if size else b""


def write_files(root, files, rng, uid, gid):
    """Write ``files`` [(relpath, size, mtime)] under ``root`` (0644 files, 0755 directories, owned by
    uid:gid, mtimes as planned, directories take their newest child's mtime). Returns the new directories
    (relative). Raises OSError."""
    created, dir_mtime = [], {}
    for relpath, size, mtime in files:
        parent = os.path.dirname(relpath)
        missing = []
        probe = parent
        while probe and not os.path.isdir(os.path.join(root, probe)):
            missing.append(probe)
            probe = os.path.dirname(probe)
        for rel in reversed(missing):
            os.mkdir(os.path.join(root, rel), 0o755)
            os.chown(os.path.join(root, rel), uid, gid)
            created.append(rel)
        fd = os.open(os.path.join(root, relpath), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            left = size
            while left:
                left -= os.write(fd, _random_bytes(rng, min(CHUNK, left)))
            os.fchown(fd, uid, gid)
        finally:
            os.close(fd)
        os.utime(os.path.join(root, relpath), (mtime, mtime))
        probe = parent
        while probe:
            dir_mtime[probe] = max(dir_mtime.get(probe, 0), mtime)
            probe = os.path.dirname(probe)
    for rel in sorted(created, key=lambda p: -p.count("/")):
        os.utime(os.path.join(root, rel), (dir_mtime[rel], dir_mtime[rel]))
    return created


def write_contentstore(root, plan, seed, uid, gid):
    """Write ``plan`` under ``root`` (an existing, empty directory). Returns seconds taken."""
    started = time.monotonic()
    write_files(root, plan.files, random.Random(seed + 1), uid, gid)
    return time.monotonic() - started


def add_night(root, n_files, day, seed, uid, gid):
    """Write one night's ``n_files`` new files into ``day``'s buckets (any hour). Returns them as
    [(relpath, size, mtime)]."""
    rng = random.Random(seed)
    files = _place(rng, n_files, day, one_day=True)
    write_files(root, files, rng, uid, gid)
    return files


def insert_rows(sb, files, batch=2000):
    """Give every file [(relpath, size, ...)] its Alfresco rows (alf_content_url ``store://relpath``,
    alf_content_data, alf_node), as the sandbox's schema has them, so a restore drill checks real content
    URLs. Returns the number of rows per table. Raises sandbox.SandboxError."""
    first = int(sb.psql("SELECT coalesce(max(id), 0) + 1 FROM alf_content_url"))
    for start in range(0, len(files), batch):
        urls, data, nodes = [], [], []
        for offset, item in enumerate(files[start:start + batch]):
            relpath, size = item[0], item[1]
            ident = first + start + offset
            parts = relpath.split("/")
            created = "%04d-%02d-%02dT%02d:%02d:00.000Z" % tuple(int(p) for p in parts[:5])
            urls.append("(%d, 'store://%s', %d, NULL)" % (ident, relpath, size))
            data.append("(%d, %d, 1, 1, 1)" % (ident, ident))
            nodes.append("(%d, '%s', 1, '%s')" % (ident, parts[5][:-len(".bin")], created))
        sb.psql("BEGIN;\nINSERT INTO alf_content_url VALUES %s;\nINSERT INTO alf_content_data VALUES %s;\n"
                "INSERT INTO alf_node VALUES %s;\nCOMMIT;\n" % (",".join(urls), ",".join(data), ",".join(nodes)))
    return len(files)


def tree_stats(root):
    """{'files', 'dirs', 'bytes'} of the tree under ``root`` (lstat, symlinks not followed)."""
    files = dirs = size = 0
    for _dirpath, dirnames, names in os.walk(root):
        dirs += len(dirnames)
        for name in names:
            files += 1
            size += os.lstat(os.path.join(_dirpath, name)).st_size
    return {"files": files, "dirs": dirs, "bytes": size}


def estimate_db_bytes(scale):
    return PGBENCH_BASE_BYTES + scale * PGBENCH_BYTES_PER_SCALE


def space_needed(content_bytes, db_bytes, content_dirs, n_files, runs):
    """Bytes and inodes the benchmark needs at its peak: the contentstore twice (source + first snapshot,
    the bare full copy is removed before ours is taken) and once more for the btrfs image, the directory
    blocks of every tree the nights keep until their deletes (ours, rsync and cp -al, cold and warm: six a
    night), the database twice (data directory + the restore drill's copy), the backups kept at a time
    and their WAL (a quarter of the database each: a pessimistic compression ratio). Returns (bytes,
    inodes)."""
    snapshots = 3 + 12 * runs
    need = 3 * content_bytes + 2 * db_bytes + snapshots * (content_dirs + 1) * 4096
    need += (runs + 3) * (db_bytes // 4 + 3 * WAL_SEGMENT)  # backup.py's runs keep theirs; the others go at once
    inodes = 2 * n_files + snapshots * (content_dirs + 1) + 10000
    return int(need * 1.1), inodes


def check_space(directory, content_bytes, db_bytes, content_dirs, n_files, runs):
    """Raise DatasetError, with the numbers, when ``directory``'s filesystem cannot hold the benchmark.
    Returns {'free_bytes', 'need_bytes', 'free_inodes', 'need_inodes'}."""
    need, inodes = space_needed(content_bytes, db_bytes, content_dirs, n_files, runs)
    stat = os.statvfs(directory)
    free, free_inodes = stat.f_bavail * stat.f_frsize, stat.f_favail
    facts = {"free_bytes": free, "need_bytes": need, "free_inodes": free_inodes, "need_inodes": inodes}
    if free < need or (stat.f_files and free_inodes < inodes):
        raise DatasetError(
            "not enough space in %s: the benchmark needs about %.1f GB and %d inodes (a %.1f GB contentstore and "
            "a %.1f GB database, each held twice, plus backups and WAL); the filesystem has %.1f GB and %d inodes "
            "free. Use --workdir on a larger filesystem, or lower --files / --db-scale (or --quick)." % (
                directory, need / 1e9, inodes, content_bytes / 1e9, db_bytes / 1e9, free / 1e9, free_inodes))
    return facts


def init_pgbench(sb, scale, timeout=3600):
    """``pgbench -i -s scale`` into the sandbox's alfresco database (as the service user, password in the
    environment), then CHECKPOINT, wait for the archiver, and drop the WAL archived so far (no base backup
    needs it). Returns {'seconds', 'database_bytes', 'cluster_bytes'}. Raises DatasetError."""
    started = time.monotonic()
    proc = sb.run_as_service_user(
        [os.path.join(sb.pg_bin, "pgbench"), "-i", "-q", "-s", str(scale), "-h", sb.socket_dir, "-p",
         str(sb.port), "-U", "alfresco", "alfresco"],
        extra_env={"PGPASSWORD": sb.alfresco_password}, timeout=timeout, input="")
    if proc.returncode != 0:
        raise DatasetError("pgbench -i -s %d failed (exit %d): %s" % (scale, proc.returncode, proc.stderr[-2000:]))
    sb.psql("CHECKPOINT;", db="postgres", user="postgres")
    wait_archiver_idle(sb)
    for path in glob.glob(os.path.join(sb.wal_archive_dir, "[0-9A-F]" * 24)):
        os.unlink(path)
    seconds = time.monotonic() - started
    db_bytes = int(sb.psql("SELECT pg_database_size('alfresco')"))
    cluster = int(sb.psql("SELECT sum(pg_database_size(datname)) FROM pg_database", db="postgres",
                          user="postgres"))
    return {"seconds": round(seconds, 3), "database_bytes": db_bytes, "cluster_bytes": cluster}


def wait_archiver_idle(sb, timeout=600):
    """Wait until no WAL segment waits for archive_command. Raises DatasetError after ``timeout`` s."""
    status_dir = os.path.join(sb.pgdata, "pg_wal", "archive_status")
    deadline = time.monotonic() + timeout
    while True:
        ready = glob.glob(os.path.join(status_dir, "*.ready"))
        if not ready:
            return
        if time.monotonic() > deadline:
            raise DatasetError("%d WAL segments still wait for archiving after %d s" % (len(ready), timeout))
        time.sleep(0.2)


def fs_type(path):
    """Filesystem type of ``path`` (from /proc/self/mountinfo), or None."""
    path, best, best_type = os.path.realpath(path), "", None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            for line in handle:
                left, _sep, right = line.partition(" - ")
                mount = left.split()[4].replace("\\040", " ")
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, best_type = mount, right.split()[0]
    except (OSError, IndexError):
        return None
    return best_type


def tool_version(argv):
    """First line of ``argv``'s output (e.g. ``rsync --version``), or None."""
    if not shutil.which(argv[0]):
        return None
    proc = subprocess.run(argv, check=False, capture_output=True, text=True)
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    return " ".join(lines[0].split()) if lines else None
