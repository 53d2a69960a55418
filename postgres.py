"""The PostgreSQL base backup: pick the tools, choose the flags, run pg_basebackup, check the result.

Flow: :func:`find_bin_dir` → :func:`client_version` → :func:`basebackup_plan` (pure: flags for this
client/server pair) → :func:`take_base_backup` writes ``base-TS.partial/``, checks every tar is readable,
``backup_label`` is present and the manifest (13+) matches, then renames to ``base-TS/`` and writes the
metadata with status WAITING_FOR_WAL. ``backup.py`` marks it DONE once its last WAL segment is archived.
"""

import hashlib
import json
import os
import re
import shutil
import threading
import time

import catalog
import subprocess_utils
import tar_io
import wal

MIN_TAR_SERVER_FOR_NEW_CLIENT = 90500  # a 15+ pg_basebackup cannot take tar backups of 9.4


class PostgresError(Exception):
    """The base backup could not be taken or failed its checks. The message says what and how to fix."""


def find_bin_dir(pg_bin_dir, alf_base_dir):
    """Directory of the client tools: PG_BIN_DIR, else ALF_BASE_DIR/postgresql/bin when it holds
    pg_basebackup, else the directory of pg_basebackup on PATH. Raises PostgresError when none has it."""
    if pg_bin_dir:
        if not os.access(os.path.join(pg_bin_dir, "pg_basebackup"), os.X_OK):
            raise PostgresError("PG_BIN_DIR=%s has no executable pg_basebackup" % pg_bin_dir)
        return pg_bin_dir
    bundled = os.path.join(alf_base_dir or "", "postgresql", "bin")
    if alf_base_dir and os.access(os.path.join(bundled, "pg_basebackup"), os.X_OK):
        return bundled
    found = shutil.which("pg_basebackup")
    if not found:
        raise PostgresError("pg_basebackup not found in %s nor on PATH: install the PostgreSQL client tools "
                            "of the server's version or set PG_BIN_DIR" % bundled)
    return os.path.dirname(found)


def parse_version_num(text):
    """'pg_basebackup (PostgreSQL) 15.18 (Debian ...)' → 150018; '9.4.26' → 90426; '16devel' → 160000."""
    match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?(?:\.(\d+))?", text) or \
        re.search(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", text)
    if not match:
        raise PostgresError("cannot read a PostgreSQL version from %r" % text.strip())
    major, second, third = int(match.group(1)), int(match.group(2) or 0), int(match.group(3) or 0)
    if major >= 10:
        return major * 10000 + second
    return major * 10000 + second * 100 + third


def version_label(num):
    """150018 → '15.18', 90426 → '9.4.26'."""
    if num >= 100000:
        return "%d.%d" % (num // 10000, num % 10000)
    return "%d.%d.%d" % (num // 10000, num // 100 % 100, num % 100)


def major_of(num):
    """150018 → 150000, 90426 → 90400: what version checks compare."""
    return num // 10000 * 10000 if num >= 100000 else num // 100 * 100


def client_version(bin_dir, env):
    """(path of pg_basebackup, version_num). Raises PostgresError."""
    path = os.path.join(bin_dir, "pg_basebackup")
    try:
        result = subprocess_utils.run([path, "--version"], env, timeout=30, what="pg_basebackup --version")
    except subprocess_utils.CommandError as exc:
        raise PostgresError(str(exc))
    return path, parse_version_num(result.stdout)


class BasebackupPlan:
    """What :func:`basebackup_plan` decided: ``args`` (flags after -D DIR), ``wal_method``,
    ``compression`` (method actually used), ``level``, ``extension``, ``notes`` (warnings to log),
    ``location`` ('client' or 'server')."""

    @property
    def spec(self):
        return "%s-%s%s" % (self.location, self.compression, ":%d" % self.level if self.level is not None else "")

    def __init__(self, args, wal_method, compression, level, extension, notes, location="client"):
        self.location = location
        self.args = args
        self.wal_method = wal_method
        self.compression = compression
        self.level = level
        self.extension = extension
        self.notes = notes


def basebackup_plan(client_num, server_num, compression, label):
    """Flags for ``pg_basebackup`` (pure). ``compression`` is PG_COMPRESSION ('zstd:3', 'gzip', ...).

    Raises PostgresError when this client cannot back up this server at all.
    """
    if major_of(client_num) < major_of(server_num):
        raise PostgresError(
            "pg_basebackup %s is older than the server (%s): use the server's own tools (PG_BIN_DIR, or "
            "ALF_BASE_DIR/postgresql/bin)" % (version_label(client_num), version_label(server_num)))
    if client_num >= 150000 and server_num < MIN_TAR_SERVER_FOR_NEW_CLIENT:
        raise PostgresError(
            "pg_basebackup %s cannot take tar-format backups of a %s server: set PG_BIN_DIR to the bundle's "
            "postgresql/bin" % (version_label(client_num), version_label(server_num)))
    notes = []
    location, method, level = parse_compression(compression)
    if location is None:
        # Measured here: server-side zstd 0.56-0.75 s vs client-side 0.79-0.99 s for the same 450 MB cluster.
        location = "server" if client_num >= 150000 and server_num >= 150000 else "client"
    if client_num < 150000 and method in ("zstd", "lz4"):
        notes.append("pg_basebackup %s supports only gzip; using gzip instead of %s"
                     % (version_label(client_num), method))
        method, level = "gzip", None
    if location == "server" and (client_num < 150000 or server_num < 150000 or method == "none"):
        if method != "none":
            notes.append("server-side compression needs PostgreSQL 15+ on both ends; compressing on the client")
        location = "client"
    # Before 10, tar format cannot stream WAL; fetch copies it at the end (needs wal_keep_segments).
    wal_method = "stream" if client_num >= 100000 else "fetch"
    args = ["-F", "t", "-X", wal_method, "--checkpoint=fast", "--label=%s" % label, "--no-password",
            "--verbose"]
    if method != "none":
        if client_num >= 150000:
            spec = "%s-%s" % (location, method) + (":level=%d" % level if level is not None else "")
            args.append("--compress=%s" % spec)
        elif level is not None:
            args.append("--compress=%d" % level)
        else:
            args.append("--gzip")
    if client_num >= 130000 and server_num >= 130000:
        args.append("--manifest-checksums=SHA256")
    return BasebackupPlan(args, wal_method, method, level, tar_io.EXTENSIONS[method], notes, location)


def parse_compression(text):
    """'server-zstd:5' → ('server', 'zstd', 5); 'gzip' → (None, 'gzip', None): no location means "the
    fastest that works", see :func:`basebackup_plan` (pure)."""
    location, _, rest = text.partition("-") if text.startswith(("client-", "server-")) else (None, "", text)
    method, _, level = rest.partition(":")
    return location, method, int(level) if level else None


def unsupported_compression(stderr):
    """True when pg_basebackup (or the server) was built without the requested compression library."""
    text = stderr.lower()
    return ("not supported" in text or "does not support" in text) and \
        any(m in text for m in ("zstd", "lz4", "compression"))


def parse_backup_label(text):
    """{'start_lsn', 'start_wal_file', 'timeline', 'label', 'start_time'} from a backup_label's text."""
    info = {}
    match = re.search(r"^START WAL LOCATION: ([0-9A-Fa-f]+/[0-9A-Fa-f]+) \(file ([0-9A-F]{24})\)", text, re.M)
    if not match:
        raise PostgresError("backup_label has no START WAL LOCATION line")
    info["start_lsn"], info["start_wal_file"] = match.group(1), match.group(2)
    info["timeline"] = int(info["start_wal_file"][:8], 16)
    for key, name in (("LABEL", "label"), ("START TIME", "start_time")):
        found = re.search(r"^%s: (.*)$" % key, text, re.M)
        if found:
            info[name] = found.group(1).strip()
    return info


def verify_manifest(path, base_members):
    """Check backup_manifest's own checksum and that every file it lists is in base.tar with its size.

    Returns the manifest's WAL range {'start_lsn', 'end_lsn', 'timeline'} (first/last range). Raises
    PostgresError.
    """
    with open(path, "rb") as handle:
        raw = handle.read()
    marker = raw.rfind(b'"Manifest-Checksum"')
    try:
        if marker < 0:
            raise ValueError("no Manifest-Checksum")
        manifest = json.loads(raw.decode("utf-8"))
        expected = manifest["Manifest-Checksum"]
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PostgresError("backup_manifest is damaged or truncated: %s" % exc)
    if hashlib.sha256(raw[:marker]).hexdigest() != expected:
        raise PostgresError("backup_manifest checksum mismatch: the manifest is damaged")
    problems = []
    for entry in manifest.get("Files", []):
        name = entry.get("Path")
        if name is None and entry.get("Encoded-Path"):
            # Non-UTF-8 file names are hex-encoded in the manifest; tarfile names them with surrogateescape.
            name = bytes.fromhex(entry["Encoded-Path"]).decode("utf-8", "surrogateescape")
        if name not in base_members:
            problems.append("missing from base.tar: %s" % name)
        elif base_members[name] != entry["Size"]:
            problems.append("size differs for %s: manifest %d, tar %d" % (name, entry["Size"], base_members[name]))
    if problems:
        raise PostgresError("base backup does not match its manifest: %s%s" % (
            "; ".join(problems[:5]), " (and %d more)" % (len(problems) - 5) if len(problems) > 5 else ""))
    ranges = manifest.get("WAL-Ranges") or []
    if not ranges:
        return {}
    return {"start_lsn": ranges[0]["Start-LSN"], "end_lsn": ranges[-1]["End-LSN"],
            "timeline": ranges[-1]["Timeline"]}


def check_backup_dir(directory, wal_method, server_num, base_scan=None):
    """Check a finished pg_basebackup output directory. Returns facts for the metadata:
    backup_label fields, files {name: size}, and the manifest's WAL range. ``base_scan``: base.tar's
    (sizes, contents) already read to its end while it was written, see :func:`_run_and_scan`.
    Raises PostgresError."""
    files = {n: os.path.getsize(os.path.join(directory, n)) for n in sorted(os.listdir(directory))}
    base = [n for n in files if n.startswith("base.tar")]
    if not base:
        raise PostgresError("pg_basebackup wrote no base.tar* in %s" % directory)
    try:
        members, contents = base_scan or tar_io.scan(os.path.join(directory, base[0]), ("backup_label",))
        if "backup_label" not in contents:
            raise PostgresError("%s has no backup_label: not a usable base backup" % base[0])
        facts = parse_backup_label(contents["backup_label"].decode("utf-8", "replace"))
        # Every other tar must read to its end too; tablespaces (<oid>.tar) join the manifest check.
        all_members, wal_members = dict(members), None
        for name in files:
            if ".tar" not in name or name in base:
                continue
            listed = tar_io.list_members(os.path.join(directory, name))
            if name.startswith("pg_wal.tar"):
                wal_members = listed
            elif name.split(".tar", 1)[0].isdigit():
                oid = name.split(".tar", 1)[0]
                all_members.update({"pg_tblspc/%s/%s" % (oid, m): size for m, size in listed.items()})
    except tar_io.TarError as exc:
        raise PostgresError(str(exc))
    if wal_method == "stream":
        if wal_members is None:
            raise PostgresError("pg_basebackup streamed WAL but wrote no pg_wal.tar*")
    else:
        wal_dir = "pg_wal/" if server_num >= 100000 else "pg_xlog/"
        wal_members = {k[len(wal_dir):]: v for k, v in members.items() if k.startswith(wal_dir)}
    if facts["start_wal_file"] not in wal_members:
        raise PostgresError("the backup lacks WAL segment %s, where it starts: it could not be restored"
                            % facts["start_wal_file"])
    facts["files"] = files
    if "backup_manifest" in files:
        facts["manifest_wal"] = verify_manifest(os.path.join(directory, "backup_manifest"), all_members)
    return facts


END_POINT_RE = re.compile(r"(?:write-ahead|transaction) log end point: ([0-9A-Fa-f]+/[0-9A-Fa-f]+)")


def take_base_backup(cfg, server, dest_root, name, log):
    """Run pg_basebackup into ``dest_root/name.partial``, check it, rename it to ``dest_root/name``.

    ``server`` is a dict from :func:`server_facts` (version_num, wal_segment_size). Returns the metadata
    dict (status WAITING_FOR_WAL) that has also been written beside the backup. On any failure the
    partial directory is removed and PostgresError is raised; nothing is ever reported as success.
    """
    started, started_iso = time.monotonic(), catalog.utc_now_iso()
    env = subprocess_utils.base_env({"PGHOST": cfg.PGHOST, "PGPORT": cfg.PGPORT, "PGUSER": cfg.PGUSER,
                                     "PGPASSWORD": cfg.PGPASSWORD or None, "PGCONNECT_TIMEOUT": "30",
                                     "PGAPPNAME": "alfresco-backup"})
    bin_dir = find_bin_dir(cfg.PG_BIN_DIR, cfg.ALF_BASE_DIR)
    tool, client_num = client_version(bin_dir, env)
    log.info("using %s (PostgreSQL %s) against server %s", tool, version_label(client_num),
             version_label(server["version_num"]))
    plan = basebackup_plan(client_num, server["version_num"], cfg.PG_COMPRESSION, "alfresco-backup %s" % name)
    final = os.path.join(dest_root, name)
    partial = final + catalog.PARTIAL_SUFFIX
    os.makedirs(dest_root, mode=0o700, exist_ok=True)
    os.mkdir(partial, 0o700)
    try:
        for fallback in _compression_fallbacks(plan) + [None]:
            try:
                result, base_scan = _run_and_scan(tool, partial, plan, env, cfg, log)
                break
            except subprocess_utils.CommandError as exc:
                if fallback is None or not unsupported_compression(exc.stderr_tail):
                    raise
                # e.g. a server built without zstd, or PyPI's pgserver 16 whose client lacks it.
                log.warning("%s is not available here (%s); trying %s", plan.spec,
                            subprocess_utils.reason_line(exc.stderr_tail), fallback)
                shutil.rmtree(partial)
                os.mkdir(partial, 0o700)
                plan = basebackup_plan(client_num, server["version_num"], fallback, "alfresco-backup %s" % name)
        compress_wal_tar(partial, plan.compression, plan.level, log)
        facts = check_backup_dir(partial, plan.wal_method, server["version_num"], base_scan)
    except subprocess_utils.CommandError as exc:
        _remove(partial, log)
        if "no space left on device" in exc.stderr_tail.lower():
            raise PostgresError("no space left on device in %s while taking the base backup (%s); the partial "
                                "backup was removed: free space or lower RETENTION_DAYS" % (dest_root, exc))
        raise PostgresError("%s%s" % (exc, _hint(exc.stderr_tail)))
    except (PostgresError, OSError) as exc:
        _remove(partial, log)
        raise PostgresError("checking the base backup: %s" % exc)
    match = END_POINT_RE.search(result.stderr)
    stop_lsn = match.group(1) if match else facts.get("manifest_wal", {}).get("end_lsn")
    if not stop_lsn:
        _remove(partial, log)
        raise PostgresError("pg_basebackup did not report its WAL end point; cannot tell which WAL it needs")
    seg_size = server["wal_segment_size"]
    start_lsn_int = wal.parse_lsn(facts["start_lsn"])
    for member in os.listdir(partial):
        os.chmod(os.path.join(partial, member), 0o600)
    for note in plan.notes:
        log.warning(note)
    os.rename(partial, final)
    catalog.fsync_dir(dest_root)
    info = {
        "kind": "postgres", "name": name, "status": catalog.WAITING_FOR_WAL,
        "started_at": started_iso, "ended_at": catalog.utc_now_iso(),
        "duration_s": round(time.monotonic() - started, 3),
        "start_lsn": facts["start_lsn"], "start_wal_file": facts["start_wal_file"],
        "stop_lsn": stop_lsn,
        "stop_wal_file": wal.segment_name(facts["timeline"], stop_lsn, seg_size, prev=True),
        "timeline": facts["timeline"],
        "backup_label_file": "%s.%08X.backup" % (facts["start_wal_file"], start_lsn_int % seg_size),
        "wal_segment_size": seg_size,
        "server_version": version_label(server["version_num"]), "server_version_num": server["version_num"],
        "pg_basebackup": tool, "pg_basebackup_version": version_label(client_num),
        "wal_method": plan.wal_method, "compression": plan.compression, "compression_level": plan.level,
        "compression_location": plan.location,
        "files": facts["files"], "size_bytes": sum(facts["files"].values()),
        "database_size_bytes": server.get("database_size"),
    }
    catalog.write_info(final, info)
    return info


def _compression_fallbacks(plan):
    """What to try when the tools lack ``plan``'s compression: client-side, then gzip (pure)."""
    if plan.compression in ("gzip", "none") and plan.location != "server":
        return []
    level = ":%d" % plan.level if plan.level is not None else ""
    fallbacks = ["client-%s%s" % (plan.compression, level)] if plan.location == "server" else []
    return fallbacks + (["client-gzip"] if plan.compression != "gzip" else [])


def _run_and_scan(tool, partial, plan, env, cfg, log):
    """Run pg_basebackup and, at the same time, read base.tar.* as it grows: the check that it reads to
    its end then costs little more than the copy. Returns (CommandResult, base_scan or None); None when the
    scan could not follow the file, and base.tar is then read again afterwards. Raises CommandError."""
    finished = threading.Event()
    outcome = {}

    def backup():
        try:
            outcome["result"] = _run_basebackup(tool, partial, plan, env, cfg)
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc
        finally:
            finished.set()

    worker = threading.Thread(target=backup, name="pg_basebackup")
    worker.start()
    base_scan = None
    try:
        base_scan = tar_io.scan_while_written(os.path.join(partial, "base.tar" + plan.extension),
                                              ("backup_label",), finished)
    except tar_io.TarError as exc:
        log.info("reading base.tar while it was written failed (%s); it is read again afterwards", exc)
    finally:
        worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], base_scan


def _run_basebackup(tool, partial, plan, env, cfg):
    return subprocess_utils.run([tool, "-D", partial] + plan.args, env, timeout=cfg.PG_BACKUP_TIMEOUT,
                                secrets=cfg.secrets(), what="pg_basebackup")


WAL_TAR_COMPRESSORS = {"zstd": ["zstd", "-q", "--rm", "-f"], "lz4": ["lz4", "-q", "--rm", "-f"],
                       "gzip": ["gzip", "-f"]}


def compress_wal_tar(directory, method, level, log):
    """pg_basebackup 15+ leaves pg_wal.tar uncompressed with zstd/lz4 or server-side compression (16+ MB);
    compress it the same way.

    Without the zstd/lz4 program it stays uncompressed (a note in the log). Raises CommandError.
    """
    path = os.path.join(directory, "pg_wal.tar")
    if method not in WAL_TAR_COMPRESSORS or not os.path.exists(path):
        return
    tool = WAL_TAR_COMPRESSORS[method]
    if not shutil.which(tool[0]):
        log.warning("%s not found: pg_wal.tar stays uncompressed (install %s)", tool[0], tool[0])
        return
    level_flag = ["-%d" % min(level, {"zstd": 19, "lz4": 12, "gzip": 9}[method])] if level else []
    target = path + tar_io.EXTENSIONS[method]
    output = {"zstd": ["-o", target], "lz4": [target], "gzip": []}[method]
    subprocess_utils.run(tool + level_flag + [path] + output, subprocess_utils.base_env(), timeout=600,
                         what="compressing pg_wal.tar")


def _hint(stderr):
    """A fix for the errors admins meet most often, appended to the message."""
    text = stderr.lower()
    if "no pg_hba.conf entry for replication" in text:
        return " (add a 'replication' line for this role to pg_hba.conf and reload, or run setup.py)"
    if "must be superuser or replication role" in text or "permission denied to start" in text:
        return " (grant it: ALTER ROLE <PGUSER> REPLICATION; or run setup.py)"
    if "password authentication failed" in text:
        return " (check PGPASSWORD in .env)"
    if "number of requested standby connections exceeds" in text or "max_wal_senders" in text:
        return " (raise max_wal_senders to at least 3 and restart PostgreSQL)"
    if "no space left on device" in text:
        return " (BACKUP_DIR is full: free space or lower RETENTION_DAYS)"
    if "permission denied" in text:
        return " (a file in the data directory is not readable by the server's user; see the log)"
    return ""


def _remove(path, log):
    try:
        shutil.rmtree(path)
        log.info("removed the incomplete %s", path)
    except OSError as exc:
        log.error("could not remove %s: %s", path, exc)


def connect(cfg, dbname=None):
    """A psycopg2 connection to the running server (autocommit). Raises PostgresError with a hint."""
    import psycopg2  # imported late: wal.py's environment has no psycopg2, and setup.py may lack it

    try:
        conn = psycopg2.connect(host=cfg.PGHOST, port=cfg.PGPORT, user=cfg.PGUSER,
                                password=cfg.PGPASSWORD or None, dbname=dbname or cfg.PGDATABASE,
                                connect_timeout=15, application_name="alfresco-backup")
    except psycopg2.Error as exc:
        message = str(exc).strip().replace(cfg.PGPASSWORD or "\0", "********")
        raise PostgresError("cannot connect to PostgreSQL at %s:%s as %s: %s%s" % (
            cfg.PGHOST, cfg.PGPORT, cfg.PGUSER, message, _hint(message)))
    conn.autocommit = True
    return conn


def query(conn, sql, params=None):
    """All rows of ``sql``."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else []


def server_facts(conn):
    """{'version_num', 'wal_segment_size', 'database_size' (Alfresco's), 'cluster_size' (all we can see)}."""
    num = int(query(conn, "SHOW server_version_num")[0][0])
    seg = query(conn, "SELECT setting, unit FROM pg_settings WHERE name = 'wal_segment_size'")
    seg_size = int(seg[0][0]) if seg else 16 * 1024 * 1024
    if seg and seg[0][1] == "8kB":  # 9.x..10 report it in 8 kB blocks
        seg_size *= 8192
    elif seg and seg[0][1] == "B":
        pass
    size = query(conn, "SELECT pg_database_size(current_database())")[0][0]
    # Databases this role may not connect to cannot be measured; they are small in an Alfresco cluster.
    cluster = query(conn, "SELECT sum(pg_database_size(oid)) FROM pg_database "
                          "WHERE has_database_privilege(oid, 'CONNECT')")[0][0]
    return {"version_num": num, "wal_segment_size": seg_size, "database_size": int(size),
            "cluster_size": int(cluster or size)}
