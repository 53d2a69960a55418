"""``BACKUP_DIR/status.json`` and the Prometheus text file (``METRICS_FILE``) for monitoring from one place.

The status document is what ``backup.py --status --json`` prints (state, reasons, recovery window, facts)
plus ``installation``, ``host``, ``generated_at``, ``last_run`` (the last nightly run: times, exit code, its
stages, sizes) and ``last_success_at``. Both files are written atomically (a temporary file in the same
directory, then a rename) at the end of every run and by ``--status``; a run keeps the previous document's
``last_success_at``, ``--status`` keeps its ``last_run``. A short-lived ``status.lock`` keeps a ``--status``
from overwriting a run's fresh ``last_run`` with the one it read before.

:func:`render` is pure: the document as Prometheus text exposition format (``alfresco_backup_`` prefix,
``_seconds``/``_bytes``/``_timestamp_seconds`` units, an ``installation`` label on every sample).
"""

import datetime
import errno
import fcntl
import json
import os
import socket
import time

import catalog
import lock
import status
from monitor import installation_name

STATUS_FILE = "status.json"
STATUS_LOCK = "status.lock"
METRICS_MODE = 0o644  # node_exporter runs as its own user and must read it
STAGE_STATUSES = ("OK", "WARN", "FAILED", "SKIPPED")
PREFIX = "alfresco_backup_"


def _ts(iso):
    value = catalog.parse_iso(iso) if isinstance(iso, str) else None
    return value.timestamp() if value else None


class _Exposition:
    """Collects metric families in order; each family is written once with its HELP and TYPE."""

    def __init__(self, installation):
        self.base = {"installation": installation}
        self.families = {}

    def add(self, name, help_text, value, labels=None, kind="gauge"):
        if value is None:
            return
        family = self.families.setdefault(PREFIX + name, (help_text, kind, []))
        family[2].append((dict(self.base, **(labels or {})), value))

    def text(self):
        lines = []
        for name, (help_text, kind, samples) in self.families.items():
            lines += ["# HELP %s %s" % (name, help_text), "# TYPE %s %s" % (name, kind)]
            for labels, value in samples:
                pairs = ",".join('%s="%s"' % (k, _escape(v)) for k, v in sorted(labels.items()))
                lines.append("%s{%s} %s" % (name, pairs, _number(value)))
        return "\n".join(lines) + "\n"


def _escape(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def render(doc, now=None):
    """Prometheus text for a status document (see the module docstring). Pure; ``now`` (epoch seconds,
    default ``doc["generated_at"]``) is used for nothing but the generation time metric."""
    out = _Exposition(doc.get("installation") or "unknown")
    add = out.add
    add("info", "Constant 1; labels name this installation and its host", 1, {"host": doc.get("host") or ""})
    add("metrics_generated_timestamp_seconds", "When this file was written",
        now if now is not None else _ts(doc.get("generated_at")))
    state = {"OK": 0, "WARNING": 1, "CRITICAL": 2}.get(doc.get("state"))
    add("status", "backup.py --status result: 0 OK, 1 WARNING, 2 CRITICAL", state)
    _run_metrics(add, doc.get("last_run"), doc.get("last_success_at"))
    _fact_metrics(add, doc.get("facts") or {}, doc.get("window"))
    return out.text()


def _run_metrics(add, run, last_success_at):
    add("last_success_timestamp_seconds", "End of the last run that exited 0", _ts(last_success_at))
    if not run:
        return
    add("last_run_start_timestamp_seconds", "Start of the last backup run", _ts(run.get("started_at")))
    add("last_run_end_timestamp_seconds", "End of the last backup run", _ts(run.get("ended_at")))
    add("last_run_duration_seconds", "Duration of the last backup run", run.get("duration_seconds"))
    add("last_run_exit_code", "Exit code of the last backup run (0 OK, 1 failed)", run.get("exit_code"))
    add("last_run_success", "1 when the last backup run exited 0", int(run.get("exit_code") == 0))
    for stage in run.get("stages") or ():
        labels = {"stage": stage.get("name", "?")}
        add("stage_duration_seconds", "Duration of each stage of the last run", stage.get("duration_seconds"),
            labels)
        for word in STAGE_STATUSES:
            add("stage_status", "1 for the status each stage of the last run ended in", int(
                stage.get("status") == word), dict(labels, status=word))
    sizes = run.get("sizes") or {}
    add("last_run_database_backup_bytes", "Size of the last run's base backup files",
        sizes.get("database_backup_bytes"))
    add("last_run_contentstore_copied_bytes", "Bytes the last contentstore snapshot copied (new content)",
        sizes.get("contentstore_copied_bytes"))
    add("last_run_contentstore_linked_bytes", "Bytes the last contentstore snapshot hardlinked (unchanged)",
        sizes.get("contentstore_linked_bytes"))
    add("last_run_contentstore_files", "Files in the last contentstore snapshot", sizes.get("contentstore_files"))
    add("last_run_config_bytes", "Size of the last keystore and configuration copy", sizes.get("config_bytes"))


def _fact_metrics(add, facts, window):
    for kind, info in sorted((facts.get("backups") or {}).items()):
        labels = {"kind": kind}
        add("newest_complete_timestamp_seconds", "End of the newest complete (DONE) backup of each kind",
            _ts(info.get("newest_ended_at")), labels)
        add("oldest_complete_timestamp_seconds", "End of the oldest complete (DONE) backup of each kind",
            _ts(info.get("oldest_ended_at")), labels)
        add("newest_complete_size_bytes", "Size of the newest complete backup of each kind (a snapshot: what it "
            "copied)", info.get("newest_size_bytes"), labels)
        add("complete_backups", "Complete (DONE) backups of each kind", info.get("done_count"), labels)
        add("backups", "Backup directories of each kind, complete or not", info.get("total_count"), labels)
    add("wal_archive_segments", "WAL segments in the archive", facts.get("archive_segments"))
    add("wal_newest_segment_timestamp_seconds", "Modification time of the newest archived WAL segment",
        _ts(facts.get("newest_segment_at")))
    add("wal_ready_segments", "WAL segments waiting for archive_command (.ready files): the archive backlog",
        facts.get("backlog"))
    chain = facts.get("chain")
    if chain:
        add("wal_chain_ok", "1 when the WAL chain from the oldest complete base backup is unbroken",
            int(bool(chain.get("ok"))))
        add("wal_chain_gaps", "Gaps in the WAL chain", len(chain.get("gaps") or ()))
    archiver = facts.get("archiver")
    add("archiver_up", "1 when pg_stat_archiver could be read", int(archiver is not None))
    if archiver:
        add("archiver_failing", "1 when archive_command's last failure is newer than its last success",
            int(status.archiver_failing(archiver)))
        add("archiver_archived_total", "WAL segments archived (pg_stat_archiver, since its last reset)",
            archiver.get("archived_count"), kind="counter")
        add("archiver_failed_total", "Failed archive_command attempts (pg_stat_archiver, since its last reset)",
            archiver.get("failed_count"), kind="counter")
        add("archiver_last_archived_timestamp_seconds", "Last successful archive_command",
            _ts(archiver.get("last_archived_time")))
        add("archiver_last_failed_timestamp_seconds", "Last failed archive_command",
            _ts(archiver.get("last_failed_time")))
    start, end = (_ts(window.get("from")), _ts(window.get("to"))) if window else (None, None)
    add("recovery_window_start_timestamp_seconds", "Earliest moment the database can be restored to", start)
    add("recovery_window_end_timestamp_seconds", "Latest moment the database can be restored to", end)
    add("recovery_window_seconds", "Length of the recovery window (0: no restorable base backup)",
        max(0.0, end - start) if start is not None and end is not None else 0)
    _offsite_metrics(add, facts)


def _offsite_metrics(add, facts):
    offsite = facts.get("offsite")
    if not isinstance(offsite, dict):
        return
    labels = {"remote": offsite.get("remote") or ""}
    base_at, wal_at = _ts(offsite.get("newest_complete_base_ended_at")), _ts(offsite.get("newest_wal_at"))
    add("offsite_last_run_timestamp_seconds", "Last off-site upload run", _ts(offsite.get("last_run_at")), labels)
    add("offsite_last_success_timestamp_seconds", "Last off-site upload run without an error",
        _ts(offsite.get("last_ok_at")), labels)
    add("offsite_error", "1 when the last off-site upload ended in an error", int(bool(offsite.get("last_error"))),
        labels)
    add("offsite_newest_base_timestamp_seconds", "End of the newest complete base backup off site", base_at, labels)
    add("offsite_newest_wal_timestamp_seconds", "Time of the newest WAL segment off site", wal_at, labels)
    add("offsite_pending_files", "Files waiting to be copied off site", offsite.get("pending_files"), labels)
    add("offsite_pending_bytes", "Bytes waiting to be copied off site", offsite.get("pending_bytes"), labels)
    local_base = _ts(((facts.get("backups") or {}).get("postgres") or {}).get("newest_ended_at"))
    local_wal = _ts(facts.get("newest_segment_at"))
    if local_base is not None and base_at is not None:
        add("offsite_lag_seconds", "How far the off-site copy is behind the local one", max(0.0, local_base -
                                                                                            base_at),
            dict(labels, what="base"))
    if local_wal is not None and wal_at is not None:
        add("offsite_lag_seconds", "How far the off-site copy is behind the local one", max(0.0, local_wal - wal_at),
            dict(labels, what="wal"))


# ---------------------------------------------------------------------------------------------- the run

def run_record(night, started_at, ended_at, duration, exit_code, log_path):
    """The ``last_run`` entry for a finished :class:`runner.Night` (times as ISO strings)."""
    stages = [{"name": s.name, "status": s.status, "duration_seconds": round(s.duration, 3), "size_bytes": s.size,
               "detail": s.error or s.detail} for s in night.stages]
    by_name = {s.name: s for s in night.stages}
    snapshot = getattr(night, "snapshot_info", None) or {}
    base = night.base_info or {}
    sizes = {"database_backup_bytes": base.get("size_bytes"),
             "contentstore_copied_bytes": snapshot.get("bytes_copied"),
             "contentstore_linked_bytes": snapshot.get("bytes_linked"),
             "contentstore_files": snapshot.get("files"),
             "config_bytes": by_name["config"].size if "config" in by_name else None}
    statuses = {s["status"] for s in stages}
    result = "FAILED" if exit_code != 0 else ("WARN" if "WARN" in statuses else "OK")
    return {"started_at": started_at, "ended_at": ended_at, "duration_seconds": round(duration, 3),
            "exit_code": exit_code, "result": result, "pid": os.getpid(), "log_file": log_path, "stages": stages,
            "sizes": {k: v for k, v in sizes.items() if v is not None}, "backups": sorted(night.current_names)}


def publish_run(cfg, night, last_run, warn):
    """status.json and METRICS_FILE after a run: the night's facts (collected again when the WAL stage did not
    get to it), assessed like --status. Never raises: problems go to ``warn(message)``."""
    try:
        facts = getattr(night, "facts", None) or status.collect(cfg)
        now = datetime.datetime.now(datetime.timezone.utc)
        state, reasons, window = status.assess(facts, now, cfg.BACKUP_MAX_AGE_HOURS, cfg.WAL_MAX_AGE_HOURS)
        doc = {"state": status.STATE_NAMES[state], "reasons": reasons, "window": window, "facts": facts}
        publish(cfg, doc, warn, last_run=last_run)
    except Exception as exc:  # monitoring files must never change the run's result
        warn("cannot write the status and metrics files: %s: %s" % (type(exc).__name__, exc))


def publish(cfg, doc, warn, last_run=None):
    """Complete ``doc`` (installation, host, generated_at, last_run, last_success_at) and write
    ``BACKUP_DIR/status.json`` (0600) and METRICS_FILE (0644). ``last_run`` None keeps the previous one
    (--status). Returns the completed document; never raises (problems go to ``warn``)."""
    doc = dict(doc, installation=installation_name(cfg), host=socket.gethostname(),
               generated_at=catalog.utc_now_iso())
    have_dir = os.path.isdir(cfg.BACKUP_DIR)
    fd = _status_lock(cfg.BACKUP_DIR, warn) if have_dir else None
    try:
        previous = read_status(cfg.BACKUP_DIR) if have_dir else {}
        doc["last_run"] = last_run if last_run is not None else previous.get("last_run")
        doc["last_success_at"] = (last_run["ended_at"] if last_run and last_run.get("exit_code") == 0
                                  else previous.get("last_success_at"))
        if have_dir:
            _try(warn, "status file", write_atomic, os.path.join(cfg.BACKUP_DIR, STATUS_FILE),
                 json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n", 0o600)
        if getattr(cfg, "METRICS_FILE", ""):
            _try(warn, "METRICS_FILE", write_atomic, cfg.METRICS_FILE, render(doc, time.time()), METRICS_MODE)
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock
    return doc


def _try(warn, what, func, *args):
    try:
        func(*args)
    except (OSError, ValueError, TypeError) as exc:
        warn("cannot write the %s %s: %s" % (what, args[0], getattr(exc, "strerror", None) or exc))


def _status_lock(backup_dir, warn, wait=10.0):
    """An fd holding ``status.lock`` exclusively (held for milliseconds), or None after ``wait`` s or when it
    cannot be opened (the files are then written without it)."""
    try:
        fd = lock.open_private(os.path.join(backup_dir, STATUS_LOCK), os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        warn("cannot open %s: %s" % (os.path.join(backup_dir, STATUS_LOCK), exc.strerror or exc))
        return None
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                os.close(fd)
                warn("%s stays locked; writing without it" % STATUS_LOCK)
                return None
            time.sleep(0.05)


def read_status(backup_dir):
    """The previous status document, or {} when missing or unreadable."""
    try:
        with open(os.path.join(backup_dir, STATUS_FILE), encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_atomic(path, text, mode):
    """Write ``text`` to ``path`` through a new temporary file in the same directory (``O_EXCL``, never
    following a symlink; its name does not end in .prom, so node_exporter never reads half a file), with
    ``mode``, fsynced, then renamed over ``path``. Raises OSError."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, ".%s.%d.tmp" % (name, os.getpid()))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode)
    except FileExistsError:  # left by a killed run whose PID came round again
        os.unlink(tmp)
        fd = os.open(tmp, flags, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask (077 in backup.py) must not take the read bits
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
