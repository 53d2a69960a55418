"""Restoring the database: archive facts, the plan, extraction into a data directory, recovery files.

Used by ``restore.py postgres``, the restore drill (restore_verify.py) and the in-place restore
(restore_full.py). Raises :class:`RestoreError` (or restore_plan.PlanError) with a message that says what to do.
"""

import collections
import datetime
import json
import os
import shutil
import sys
import time

import catalog
import pg_versions
import postgres
import restore_manifest
import restore_plan
import restore_settings
import safe_files
import subprocess_utils
import tar_extract
import tar_io
import wal
import wal_chain

PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))
SYSTEM_PYTHON = "/usr/bin/python3"


class RestoreError(Exception):
    """A restore step failed; the message names the step, the path and the fix."""


class Refused(RestoreError):
    """Refused before anything was changed (directory not empty, not enough space, not confirmed...)."""


ArchiveFacts = collections.namedtuple("ArchiveFacts", "archive_dir mtimes newest_at")
Chain = collections.namedtuple("Chain", "ok first_missing reach_end report")
DbPlan = collections.namedtuple("DbPlan", "base target notes archive chain")


def archive_facts(archive_dir):
    """ArchiveFacts: {segment name: aware mtime} of the archived WAL segments and the newest of them."""
    mtimes = {}
    if os.path.isdir(archive_dir):
        for name in wal_chain.archive_segments(archive_dir):
            base = name[:-3] if name.endswith(".gz") else name
            if wal.is_segment_name(base):
                stamp = os.stat(os.path.join(archive_dir, name)).st_mtime
                mtimes[base] = datetime_utc(stamp)
    return ArchiveFacts(archive_dir, mtimes, max(mtimes.values()) if mtimes else None)


def datetime_utc(timestamp):
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)


def chain_from(base, facts):
    """Chain: is the archived WAL continuous from ``base``'s start segment? ``reach_end`` is the time of
    the last segment before the first gap (or of the newest segment)."""
    seg_size = base.info.get("wal_segment_size") or wal_chain.DEFAULT_SEG_SIZE
    start = base.info.get("start_wal_file")
    if not start:
        raise RestoreError("backup %s has no start_wal_file in its metadata" % base.name)
    if not os.path.isdir(facts.archive_dir):
        return Chain(False, start, None, None)
    report = wal_chain.check_chain(facts.archive_dir, start, seg_size)
    if report.ok:
        return Chain(True, None, facts.newest_at, report)
    missing = report.gaps[0][0]
    limit = wal_chain.segment_number(missing, seg_size)
    before = [t for n, t in facts.mtimes.items() if wal_chain.segment_number(n, seg_size) < limit]
    return Chain(False, missing, max(before) if before else None, report)


def lineage(archive_dir, timeline):
    """{timeline: fork LSN or None} that recovery follows for recovery_target_timeline ``timeline``
    ('latest': the highest .history in the archive), or None when any base backup will do."""
    if timeline == "current" or not os.path.isdir(archive_dir):
        return None
    histories = {int(n[:8], 16): n for n in wal_chain.archive_segments(archive_dir) if wal.is_history_name(n)}
    if timeline != "latest":
        wanted = int(timeline)
    elif histories:
        wanted = max(histories)
    else:
        return None  # no timeline switch ever archived
    result = {wanted: None}
    if wanted in histories:
        for parent, switch_lsn, _reason in wal_chain.read_history_file(os.path.join(archive_dir, histories[wanted])):
            result[parent] = switch_lsn
    return result


def plan_database(cfg, target, backup_id=None, timeline="latest"):
    """DbPlan for restoring the database to ``target``. Raises PlanError when it cannot be reached."""
    bases = catalog.list_backups(cfg.BACKUP_DIR, "postgres")
    facts = archive_facts(cfg.wal_archive_dir)
    follow = None if target.kind == "immediate" else lineage(cfg.wal_archive_dir, str(timeline))
    base, notes = restore_plan.choose_base(bases, target, backup_id, facts.newest_at, follow)
    chain = chain_from(base, facts)
    restore_plan.check_wal_reach(target, chain.ok, chain.reach_end, chain.first_missing)
    return DbPlan(base, target, notes, facts, chain)


def restore_command(cfg):
    python = SYSTEM_PYTHON if os.access(SYSTEM_PYTHON, os.X_OK) else sys.executable
    return restore_settings.restore_command(python, os.path.join(PROJECT_DIR, "wal.py"), cfg.wal_archive_dir)


def pg_tool(cfg, name, version_num, newer_ok=False, fits=None):
    """Path of server tool ``name`` (pg_ctl, pg_verifybackup) of the backup's major version (or, with
    ``newer_ok``, a later one; or one for which ``fits(tool_num, version_num)`` is true): next to the client
    tools, else in /usr/lib/postgresql/<major>/bin, else on PATH. Raises RestoreError."""
    label = pg_versions.major_label(version_num)
    candidates = []
    try:
        candidates.append(postgres.find_bin_dir(cfg.PG_BIN_DIR, cfg.ALF_BASE_DIR))
    except postgres.PostgresError:
        pass
    candidates.append("/usr/lib/postgresql/%s/bin" % label)
    found = shutil.which(name)
    if found:
        candidates.append(os.path.dirname(found))
    seen = []
    for directory in candidates:
        path = os.path.join(directory, name)
        if not os.access(path, os.X_OK) or path in seen:
            continue
        seen.append(path)
        try:
            out = subprocess_utils.run([path, "--version"], subprocess_utils.base_env(), timeout=30,
                                       what="%s --version" % name).stdout
            found_num = postgres.parse_version_num(out)
            found_major, wanted = postgres.major_of(found_num), postgres.major_of(version_num)
            if fits(found_num, version_num) if fits else (found_major == wanted or (newer_ok and found_major > wanted)):
                return path
        except (subprocess_utils.CommandError, postgres.PostgresError):
            continue
    raise RestoreError("%s of PostgreSQL %s not found (looked in %s): install that version's server tools "
                       "or set PG_BIN_DIR" % (name, label, ", ".join(candidates)))


def data_dir_version(data_dir):
    """server_version_num-style major of a data directory from its PG_VERSION ('9.4' -> 90400, '15' ->
    150000). Raises RestoreError."""
    try:
        with open(os.path.join(data_dir, "PG_VERSION")) as handle:
            return pg_versions.major_from_label(handle.read())
    except (OSError, ValueError) as exc:
        raise RestoreError("cannot read %s/PG_VERSION: %s" % (data_dir, exc))


def base_files(base):
    """(base tar, WAL tar or None) of a base backup directory. Raises RestoreError for tablespace tars."""
    names = sorted(os.listdir(base.path))
    base_tar = [n for n in names if n.startswith("base.tar")]
    wal_tar = [n for n in names if n.startswith("pg_wal.tar")]
    others = [n for n in names if ".tar" in n and n not in base_tar + wal_tar]
    if not base_tar:
        raise RestoreError("%s holds no base.tar*: not a usable base backup" % base.path)
    if others:
        raise RestoreError("%s has tablespace archives (%s): restore them by hand, see RESTORE.md"
                           % (base.path, ", ".join(others)))
    return os.path.join(base.path, base_tar[0]), os.path.join(base.path, wal_tar[0]) if wal_tar else None


def space_needed(base):
    """Bytes a restored data directory of ``base`` needs (manifest sizes, else the database size + 20 %)."""
    manifest = os.path.join(base.path, "backup_manifest")
    wal_bytes = 64 * 1024 * 1024
    if os.path.isfile(manifest):
        try:
            with open(manifest, encoding="utf-8") as handle:
                return sum(f.get("Size", 0) for f in json.load(handle).get("Files", [])) + wal_bytes
        except (OSError, ValueError):
            pass
    return int((base.info.get("database_size_bytes") or 0) * 1.2) + wal_bytes


def check_free_space(path, needed, what):
    """Raise Refused when the file system of ``path`` (or its nearest existing parent) has less than
    ``needed`` bytes free."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise Refused("not enough free space for %s in %s: need about %d MB, %d MB free"
                      % (what, probe, needed // 2**20, free // 2**20))


def prepare_dir(path):
    """Create ``path`` (0700) or accept it when it is an empty directory. Raises Refused."""
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise Refused("%s exists and is not a directory" % path)
        if os.listdir(path):
            raise Refused("%s is not empty: restore into an empty or new directory (nothing was changed)" % path)
    else:
        os.makedirs(path, mode=0o700)
    os.chmod(path, 0o700)


def load_manifest(base):
    """The base backup's restore_manifest.Manifest (13+ with a backup_manifest), else None. Raises
    RestoreError for a damaged manifest."""
    path = os.path.join(base.path, "backup_manifest")
    if not os.path.isfile(path) or not pg_versions.backup_has_manifest(base.info.get("server_version_num") or 0):
        return None
    try:
        return restore_manifest.load(path)
    except (restore_manifest.ManifestError, OSError) as exc:
        raise RestoreError("the base backup %s is damaged: %s" % (base.name, exc))


def extract(base, dest, log, manifest=None, durable=True):
    """Extract ``base`` (base.tar and its WAL) into the empty ``dest``. Returns a list of warnings.

    ``manifest`` (restore_manifest.Manifest with a SHA algorithm): every file's size and digest are checked
    against it as it is written. ``durable``: the copy will be fsynced (PostgreSQL does so when it starts on
    it): its data is sent to disk while the extraction goes on. Removes postmaster.pid/.opts, comments out
    settings that point at the original's files, and creates an empty postgresql.conf when the backup has none.
    Raises RestoreError."""
    version = base.info.get("server_version_num") or 0
    base_tar, wal_tar = base_files(base)
    warnings = []
    digest = manifest.algorithm if manifest is not None else None
    try:
        log.info("extracting %s into %s%s", base_tar, dest, " (checking %s digests against backup_manifest)"
                 % digest if digest else "")
        digests = tar_extract.extract(base_tar, dest, digest=digest, writeback=durable)
        if digest:
            restore_manifest.check(manifest, digests)
        wal_dir = os.path.join(dest, restore_settings.wal_dir_name(version))
        if os.path.islink(wal_dir):  # tar_io refuses such a member; a second guard costs nothing
            raise RestoreError("%s is a symbolic link in the restored copy: refusing to extract WAL through it"
                               % wal_dir)
        if not os.path.isdir(wal_dir):
            os.mkdir(wal_dir, 0o700)
        if wal_tar:
            log.info("extracting %s into %s", wal_tar, wal_dir)
            tar_extract.extract(wal_tar, wal_dir, writeback=durable)
    except (tar_io.TarError, restore_manifest.ManifestError) as exc:
        raise RestoreError("the base backup %s is damaged: %s" % (base.name, exc))
    os.chmod(dest, 0o700)
    if not os.path.isfile(os.path.join(dest, "backup_label")):
        raise RestoreError("%s has no backup_label: recovery would start from the wrong checkpoint" % base_tar)
    for stale in ("postmaster.pid", "postmaster.opts", "standby.signal"):
        if os.path.lexists(os.path.join(dest, stale)):
            os.unlink(os.path.join(dest, stale))
            if stale == "standby.signal":  # a standby's backup: it would wait for a primary, never promote
                warnings.append("removed standby.signal from the restored copy (the backup was taken on a standby)")
    conf = os.path.join(dest, "postgresql.conf")
    if os.path.lexists(conf):
        text, names = restore_settings.neutralize_path_settings(safe_files.read_text(conf))
        if names:
            warnings.append("commented out %s in the restored postgresql.conf: they pointed at the original "
                            "server's files" % ", ".join(names))
            _write(conf, text, append=False)
    else:
        warnings.append("the backup holds no postgresql.conf (the server keeps it outside its data directory): "
                        "an empty one was written; copy the original settings into %s if needed" % conf)
        _write(conf, "# restore.py: the backup held no postgresql.conf\n", append=False)
    return warnings


def verify_manifest(cfg, base, dest, log, manifest):
    """Run pg_verifybackup (13+) on the freshly extracted ``dest`` when the backup has a manifest
    (``manifest``, from :func:`load_manifest`; None: it does not apply). When the extraction checked every
    file's digest against it (a SHA algorithm), with ``--skip-checksums`` (no second read of the data).
    Returns a note, or None when it does not apply. Raises RestoreError when the files differ."""
    if manifest is None:
        return None
    digests_checked = manifest.algorithm is not None
    try:
        tool = pg_tool(cfg, "pg_verifybackup", base.info["server_version_num"], fits=pg_versions.verifybackup_fits)
    except RestoreError as exc:
        log.warning("%s; the manifest is not checked%s", exc, " by pg_verifybackup (every file's size and digest "
                    "was checked against it during the extraction)" if digests_checked else "")
        return None
    try:
        # --no-parse-wal: pg_verifybackup would run pg_waldump through /bin/sh with our paths in it; the WAL
        # is proven by recovery itself and by the archive's chain check.
        subprocess_utils.run([tool, "--quiet", "--no-parse-wal"] + (["--skip-checksums"] if digests_checked else [])
                             + ["-m", manifest.path, dest], subprocess_utils.base_env(), timeout=3600,
                             what="pg_verifybackup", log=log)
    except subprocess_utils.CommandError as exc:
        raise RestoreError("the restored files do not match the backup's manifest: %s" % exc)
    return "pg_verifybackup: the restored files match backup_manifest%s" % (
        " (their SHA-256 digests checked while they were extracted)" if digests_checked else "")


def _write(path, text, append):
    # Never through a symlink: the restored tree came from an archive.
    safe_files.write_text(path, text, append=append)


def write_recovery(dest, files, log=None):
    """Write restore_settings.RecoveryFiles into the data directory ``dest``. An earlier restore's block and
    every recovery setting the backup carried (a server restored in place before it was backed up) are
    removed from postgresql.auto.conf first: blocks never stack. Returns the names removed."""
    if files.recovery_conf is not None:
        _write(os.path.join(dest, "recovery.conf"), files.recovery_conf, append=False)
    if files.signal_file:
        _write(os.path.join(dest, files.signal_file), "", append=False)
    auto = os.path.join(dest, "postgresql.auto.conf")
    text = safe_files.read_text(auto) if os.path.lexists(auto) else ""
    text, removed = restore_settings.clean_auto_conf(text)
    if removed and log is not None:
        log.info("removed stale recovery settings from the backup's postgresql.auto.conf: %s", ", ".join(removed))
    if files.auto_conf_block:
        text += ("" if not text or text.endswith("\n") else "\n") + files.auto_conf_block
    if text or os.path.lexists(auto):
        _write(auto, text, append=False)
    return removed


def clean_after_promotion(data_dir, keep_block, log):
    """Remove the recovery settings restore.py wrote into ``data_dir``/postgresql.auto.conf once the server
    has promoted (they are read only at start-up): the next base backup must not carry them. ``keep_block``
    keeps the rest of our block (archive_mode = off, port... of a throwaway copy). Never raises."""
    auto = os.path.join(data_dir, "postgresql.auto.conf")
    try:
        text = safe_files.read_text(auto)
        cleaned, names = restore_settings.remove_recovery_settings(text)
        if not keep_block:
            cleaned = restore_settings.remove_restore_blocks(cleaned)
        if cleaned != text:
            _write(auto, cleaned, append=False)
            log.info("removed the recovery settings from %s (%s)", auto, ", ".join(names) or "restore.py block")
    except OSError as exc:
        log.warning("could not remove the recovery settings from %s: %s; remove the restore.py block by hand "
                    "before the next base backup", auto, exc)


def restore_database(cfg, plan, dest, log, timeline="latest", **auto_kwargs):
    """Extract ``plan.base`` into ``dest`` and write its recovery settings (``auto_kwargs``: keep_archiving,
    port, socket_dir, listen, logging_collector, durable). Returns {'warnings', 'notes', 'extract_s'}.
    Raises RestoreError, PlanError."""
    base = plan.base
    version = base.info.get("server_version_num")
    if not version:
        raise RestoreError("backup %s has no server_version_num in its metadata" % base.name)
    note = "backup %s, target %s" % (base.name, restore_plan.describe_target(plan.target))
    files = restore_settings.recovery_files(version, restore_command(cfg), plan.target, note, timeline, **auto_kwargs)
    check_free_space(dest, space_needed(base), "the restored data directory")
    prepare_dir(dest)
    started = time.monotonic()
    manifest = load_manifest(base)
    warnings = extract(base, dest, log, manifest, durable=auto_kwargs.get("durable", True))
    notes = [n for n in [verify_manifest(cfg, base, dest, log, manifest)] if n]
    write_recovery(dest, files, log)
    return {"warnings": warnings, "notes": notes, "extract_s": time.monotonic() - started}
