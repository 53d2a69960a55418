"""The PostgreSQL base backup stage: run pg_basebackup, check the result, record it.

:func:`take_base_backup` writes ``base-TS.partial/`` (reading ``base.tar.*`` while it is written), checks every
tar reads to its end, ``backup_label`` is present, the WAL it starts in is inside and the manifest (13+)
matches, then renames to ``base-TS/`` and writes the metadata with status WAITING_FOR_WAL. ``backup.py``
marks it DONE once its last WAL segment is archived.
"""

import os
import re
import shutil
import threading
import time

import catalog
import pg_versions
import postgres
import restore_manifest
import safe_files
import subprocess_utils
import tar_io
import wal_chain
from postgres import PostgresError, basebackup_plan, unsupported_compression


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
    try:
        manifest = restore_manifest.load(path)
    except restore_manifest.ManifestError as exc:
        raise PostgresError("backup_manifest: %s" % exc)
    problems = []
    for name, (size, _algorithm, _checksum) in manifest.files.items():
        if name not in base_members:
            problems.append("missing from base.tar: %s" % name)
        elif base_members[name] != size:
            problems.append("size differs for %s: manifest %d, tar %d" % (name, size, base_members[name]))
    if problems:
        raise PostgresError("base backup does not match its manifest: %s%s" % (
            "; ".join(problems[:5]), " (and %d more)" % (len(problems) - 5) if len(problems) > 5 else ""))
    return manifest.wal_range


def check_backup_dir(directory, wal_method, server_num, base_scan=None, wal_scan=None):
    """Check a finished pg_basebackup output directory. Returns facts for the metadata:
    backup_label fields, files {name: size}, and the manifest's WAL range. ``base_scan``: base.tar's
    (sizes, contents) already read to its end while it was written, see :func:`_run_and_scan`;
    ``wal_scan``: {file name: members} of a WAL tar already read, see :func:`compress_wal_tar`.
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
            listed = (wal_scan or {}).get(name)
            if listed is None:
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
        wal_dir = pg_versions.wal_dir(server_num) + "/"
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
    bin_dir = postgres.find_bin_dir(cfg.PG_BIN_DIR, cfg.ALF_BASE_DIR)
    tool, client_num = postgres.client_version(bin_dir, env)
    log.info("using %s (PostgreSQL %s) against server %s", tool, postgres.version_label(client_num),
             postgres.version_label(server["version_num"]))
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
        wal_scan = compress_wal_tar(partial, plan.compression, plan.level, log)
        facts = check_backup_dir(partial, plan.wal_method, server["version_num"], base_scan, wal_scan)
    except subprocess_utils.CommandError as exc:
        _remove(partial, log)
        if "no space left on device" in exc.stderr_tail.lower():
            raise PostgresError("no space left on device in %s while taking the base backup (%s); the partial "
                                "backup was removed: free space or lower RETENTION_DAYS" % (dest_root, exc))
        raise PostgresError("%s%s" % (exc, postgres.hint_for(exc.stderr_tail)))
    except (PostgresError, OSError) as exc:
        _remove(partial, log)
        raise PostgresError("checking the base backup: %s" % exc)
    match = END_POINT_RE.search(result.stderr)
    stop_lsn = match.group(1) if match else facts.get("manifest_wal", {}).get("end_lsn")
    if not stop_lsn:
        _remove(partial, log)
        raise PostgresError("pg_basebackup did not report its WAL end point; cannot tell which WAL it needs")
    seg_size = server["wal_segment_size"]
    start_lsn_int = wal_chain.parse_lsn(facts["start_lsn"])
    for member in os.listdir(partial):
        os.chmod(os.path.join(partial, member), 0o600)
    for note in plan.notes:
        log.warning(note)
    # On disk before anything says it exists: zstd --rm and 9.x pg_basebackup do not fsync what they write.
    safe_files.fsync_tree(partial)
    info = {
        "kind": "postgres", "name": name, "status": catalog.WAITING_FOR_WAL,
        "started_at": started_iso, "ended_at": catalog.utc_now_iso(),
        "duration_s": round(time.monotonic() - started, 3),
        "start_lsn": facts["start_lsn"], "start_wal_file": facts["start_wal_file"],
        "stop_lsn": stop_lsn,
        "stop_wal_file": wal_chain.segment_name(facts["timeline"], stop_lsn, seg_size, prev=True),
        "timeline": facts["timeline"],
        "backup_label_file": "%s.%08X.backup" % (facts["start_wal_file"], start_lsn_int % seg_size),
        "wal_segment_size": seg_size,
        "server_version": postgres.version_label(server["version_num"]), "server_version_num": server["version_num"],
        "pg_basebackup": tool, "pg_basebackup_version": postgres.version_label(client_num),
        "wal_method": plan.wal_method, "compression": plan.compression, "compression_level": plan.level,
        "compression_location": plan.location,
        "files": facts["files"], "size_bytes": sum(facts["files"].values()),
        "database_size_bytes": server.get("database_size"),
    }
    # Metadata first, then the rename: until the rename the directory reads PARTIAL whatever the .json says,
    # so a crash in between never leaves a backup directory without metadata.
    catalog.write_info(final, info)
    os.rename(partial, final)
    catalog.fsync_dir(dest_root)
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
    compress it the same way, reading it as a tar at the same time.

    Returns {name of the compressed file: {member: size}} of pg_wal.tar as pg_basebackup wrote it (read to
    its end marker while the compressor read it; the compressed copy carries the compressor's own checksum),
    or None when the check must read the WAL tar itself: nothing compressed (no pg_wal.tar, no compression, or
    no zstd/lz4 program: it then stays uncompressed, with a note in the log) or the reading thread died.
    Raises CommandError, or PostgresError when pg_wal.tar is unreadable.
    """
    path = os.path.join(directory, "pg_wal.tar")
    if method not in WAL_TAR_COMPRESSORS or not os.path.exists(path):
        return None
    tool = WAL_TAR_COMPRESSORS[method]
    if not shutil.which(tool[0]):
        log.warning("%s not found: pg_wal.tar stays uncompressed (install %s)", tool[0], tool[0])
        return None
    level_flag = ["-%d" % min(level, {"zstd": 19, "lz4": 12, "gzip": 9}[method])] if level else []
    target = path + tar_io.EXTENSIONS[method]
    output = {"zstd": ["-o", target], "lz4": [target], "gzip": []}[method]
    read = {}
    # Opened before the compressor starts: its --rm may unlink pg_wal.tar before the reading thread is done.
    with open(path, "rb") as handle:
        def read_tar():
            try:
                read["members"] = tar_io.scan(path, source=handle)[0]
            except tar_io.TarError as exc:
                read["error"] = exc

        reader = threading.Thread(target=read_tar, name="pg_wal.tar")
        reader.start()
        try:
            subprocess_utils.run(tool + level_flag + [path] + output, subprocess_utils.base_env(), timeout=600,
                                 what="compressing pg_wal.tar")
        finally:
            reader.join()
    if "error" in read:
        raise PostgresError(str(read["error"]))
    return {os.path.basename(target): read["members"]} if "members" in read else None


def _remove(path, log):
    try:
        shutil.rmtree(path)
        log.info("removed the incomplete %s", path)
    except OSError as exc:
        log.error("could not remove %s: %s", path, exc)
