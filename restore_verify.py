"""The restore drill (``restore.py verify``) and the checks it shares with the in-place restore.

:func:`verify_backup` restores a base backup into a scratch directory under BACKUP_DIR, starts a throwaway
server on a free port with archiving off, waits for recovery, counts Alfresco's main tables and checks that
every ``store://`` URL in ``alf_content_url`` is in the paired contentstore snapshot with its recorded size.
It always stops the server and deletes the scratch directory. It does not take the backup lock: the CLI
takes it, and the nightly run already holds it.
"""

import collections
import logging
import os
import shutil
import tempfile
import threading
import time

import catalog
import linktree_workers
import restore_db
import restore_plan
import restore_server

VerifyResult = collections.namedtuple("VerifyResult", "ok summary_text details")
VerifyResult.__doc__ = ("Outcome of a restore drill: ``ok`` (bool), ``summary_text`` (lines for a mail or "
                        "a terminal), ``details`` (dict: base, snapshot, counts, content, failures, timings).")
SANITY_TABLES = ("alf_node", "alf_content_url", "alf_content_data")
SHOW = 20  # missing / mismatched files listed by name; the rest are counted
SCRATCH_PREFIX = ".verify-"


def sanity_counts(conn):
    """{table: row count} for Alfresco's main tables. Raises restore_db.RestoreError when one is missing."""
    import psycopg2

    counts = {}
    with conn.cursor() as cur:
        for table in SANITY_TABLES:
            try:
                cur.execute("SELECT count(*) FROM %s" % table)
            except psycopg2.Error as exc:
                raise restore_db.RestoreError("sanity query on %s failed (not an Alfresco database?): %s"
                                              % (table, str(exc).strip()))
            counts[table] = cur.fetchone()[0]
    return counts


def check_content(conn, store_dir, fallback=None, sizes=None, seen=None):
    """Check every ``store://`` URL of ``alf_content_url`` against the files under ``store_dir``.

    Returns {'checked', 'missing' [(url, size)] (first SHOW), 'missing_total', 'mismatched'
    [(url, recorded, actual)], 'mismatched_total', 'orphans_missing', 'other_stores', 'invalid', 'filled'}.
    URLs with an orphan_time (no document uses them any more) missing from the store are only counted.
    ``fallback(relpath, size)`` may supply a missing file and return True (counted as 'filled'). ``sizes``
    ({relpath: size}, e.g. an off-site listing) replaces the look at ``store_dir``. ``seen`` ({relpath: size}
    of regular files under ``store_dir``, possibly incomplete, from :func:`warm_cache`) spares the stat of
    the files it holds; any other one is looked at."""
    result = {"checked": 0, "missing": [], "missing_total": 0, "mismatched": [], "mismatched_total": 0,
              "orphans_missing": 0, "other_stores": 0, "invalid": [], "filled": 0}
    conn.autocommit = False  # a named (server-side) cursor needs a transaction; millions of rows stream
    try:
        with conn.cursor(name="alfresco_backup_content_check") as cur:
            cur.itersize = 10000
            cur.execute("SELECT content_url, content_size, orphan_time IS NOT NULL FROM alf_content_url")
            for url, size, orphan in cur:
                rel = restore_plan.content_relpath(url)
                if rel is None:
                    if url and url.startswith("store://"):
                        result["invalid"].append(url)
                    else:
                        result["other_stores"] += 1
                    continue
                result["checked"] += 1
                try:
                    if sizes is not None:
                        actual = sizes[rel]
                    else:
                        actual = seen.get(rel) if seen else None
                        if actual is None:
                            actual = os.stat(os.path.join(store_dir, rel)).st_size
                except (FileNotFoundError, KeyError):
                    if fallback is not None and fallback(rel, size):
                        result["filled"] += 1
                        continue
                    if orphan:
                        result["orphans_missing"] += 1
                        continue
                    result["missing_total"] += 1
                    if len(result["missing"]) < SHOW:
                        result["missing"].append((url, size))
                    continue
                if size is not None and actual != size:
                    result["mismatched_total"] += 1
                    if len(result["mismatched"]) < SHOW:
                        result["mismatched"].append((url, size, actual))
        conn.rollback()
    finally:
        conn.autocommit = True
    return result


def content_problems(report, store_dir):
    """Failure lines for a check_content report (empty when the content is complete)."""
    lines = []
    if report["missing_total"]:
        lines.append("%d content files referenced by the database are missing from %s: %s%s" % (
            report["missing_total"], store_dir, ", ".join(u for u, _s in report["missing"]),
            " (and %d more)" % (report["missing_total"] - len(report["missing"]))
            if report["missing_total"] > len(report["missing"]) else ""))
    if report["mismatched_total"]:
        lines.append("%d content files have another size than recorded: %s%s" % (
            report["mismatched_total"], ", ".join("%s (recorded %s, file %s)" % m for m in report["mismatched"]),
            " (and %d more)" % (report["mismatched_total"] - len(report["mismatched"]))
            if report["mismatched_total"] > len(report["mismatched"]) else ""))
    if report["invalid"]:
        lines.append("%d store:// URLs are malformed: %s" % (len(report["invalid"]),
                                                             ", ".join(report["invalid"][:SHOW])))
    return lines


def warm_cache(store_dir, stop, seen=None):
    """Read the directories and inodes of ``store_dir`` into the page cache, so that the content check, which
    looks at one file per ``store://`` URL, finds them in memory: run in a thread while the database is
    extracted and recovers. The walk is :func:`linktree_workers.file_sizes`' (worker processes), at the lowest
    CPU priority.
    ``stop`` (a threading.Event): once set, no further subtree is started. ``seen``: a dict that gets
    {relpath: size} of every regular file looked at (the check then needs no stat of its own for them).
    Never raises."""
    try:
        linktree_workers.file_sizes(store_dir, stop=stop.is_set, nice=True, into=seen)
    except (OSError, linktree_workers.WorkerError):
        pass  # only a head start: the check itself reports what is missing


def scratch_root(cfg):
    """Where drills restore: VERIFY_SCRATCH_DIR when configured, else BACKUP_DIR (the same disk as the backups;
    a data directory on a CIFS/NFS share may be refused by PostgreSQL, which the drill then reports)."""
    return getattr(cfg, "VERIFY_SCRATCH_DIR", None) or cfg.BACKUP_DIR


def clean_stale_scratch(cfg, log):
    """Stop servers and remove scratch directories left by a drill that was killed."""
    root = scratch_root(cfg)
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(SCRATCH_PREFIX) and os.path.isdir(path) and not os.path.islink(path):
            data = os.path.join(path, "data")
            if restore_server.postmaster_alive(data):
                log.warning("stopping the server left running in %s", data)
                try:
                    pg_ctl = restore_db.pg_tool(cfg, "pg_ctl", restore_db.data_dir_version(data))
                    restore_server.Server(pg_ctl, data, os.path.join(path, "postgresql.log"), log).stop()
                except restore_db.RestoreError as exc:
                    log.warning("%s", exc)
            log.info("removing %s left by an earlier drill", path)
            shutil.rmtree(path, ignore_errors=True)


def _socket_dir(scratch):
    """A directory for the throwaway server's socket: in the scratch directory, or under /tmp when that
    path is too long for a Unix socket (about 107 bytes)."""
    run = os.path.join(scratch, "run")
    if len(os.path.join(run, ".s.PGSQL.65535")) < 100:
        os.mkdir(run, 0o700)
        return run, False
    return tempfile.mkdtemp(prefix="alfverify-"), True


def verify_backup(cfg, backup_name=None, target_time=None, log=None, timeout=None, content_sizes=None):
    """Restore drill of base backup ``backup_name`` (default: the newest DONE one).

    ``content_sizes(snapshot)`` -> {relpath: size}: check the content URLs against that (the off-site copy)
    instead of the snapshot's files.
    ``target_time`` (aware datetime or text) recovers to that moment instead of the end of the backup.
    Returns a VerifyResult; never raises for a failed drill (a bug still raises)."""
    log = log or logging.getLogger("restore")
    timeout = timeout or getattr(cfg, "VERIFY_TIMEOUT", None) or 3600
    started = time.monotonic()
    failures, warnings = [], []
    details = {"failures": failures, "warnings": warnings, "base": None, "snapshot": None, "counts": {},
               "content": None, "target": None, "timings": {}}
    scratch = server = None
    socket_dir, own_socket_dir = None, False
    stop_warming, seen, warming = threading.Event(), {}, None
    try:
        target = (restore_plan.make_target(time=target_time) if target_time is not None
                  else restore_plan.make_target(immediate=True))
        details["target"] = restore_plan.describe_target(target)
        if target.kind == "time":
            plan = restore_db.plan_database(cfg, target, backup_name)
        else:
            base = restore_plan.find_backup(catalog.list_backups(cfg.BACKUP_DIR, "postgres"), backup_name, "base")
            facts = restore_db.archive_facts(cfg.wal_archive_dir)
            plan = restore_db.DbPlan(base, target, [], facts, restore_db.chain_from(base, facts))
        base = plan.base
        details["base"] = base.name
        chain = plan.chain
        if not chain.ok:
            failures.append("WAL segment %s is missing from the archive %s: point-in-time recovery from %s stops "
                            "there (about %s)" % (chain.first_missing, cfg.wal_archive_dir, base.name,
                                                  restore_plan.show_time(chain.reach_end)))
        details["wal_chain"] = chain.report.describe() if chain.report else "no WAL archive"
        snapshot = None
        try:
            snapshot, notes = restore_plan.choose_snapshot(
                catalog.list_backups(cfg.BACKUP_DIR, "contentstore"), restore_plan.db_point(target, base))
            warnings.extend(notes)
            details["snapshot"] = snapshot.name
            if content_sizes is None:  # else the sizes come from the off-site listing
                warming = threading.Thread(target=warm_cache, args=(snapshot.path, stop_warming, seen),
                                           name="warm-snapshot", daemon=True)
                warming.start()
        except restore_plan.PlanError as exc:
            failures.append("contentstore: %s" % exc)
        if os.geteuid() == 0:
            raise restore_db.RestoreError("PostgreSQL refuses to run as root: run restore.py verify as the "
                                          "service user")
        clean_stale_scratch(cfg, log)
        scratch = os.path.join(scratch_root(cfg), "%s%s-%d" % (SCRATCH_PREFIX, time.strftime("%Y%m%d-%H%M%S"),
                                                               os.getpid()))
        os.mkdir(scratch, 0o700)
        socket_dir, own_socket_dir = _socket_dir(scratch)
        data = os.path.join(scratch, "data")
        port = restore_server.free_port()
        result = restore_db.restore_database(cfg, plan, data, log, port=port, socket_dir=socket_dir,
                                             listen="127.0.0.1", logging_collector=False,
                                             durable=False)
        warnings.extend(result["warnings"])
        details["timings"]["extract_s"] = round(result["extract_s"], 2)
        pg_ctl = restore_db.pg_tool(cfg, "pg_ctl", base.info["server_version_num"])
        server = restore_server.Server(pg_ctl, data, os.path.join(scratch, "postgresql.log"), log)
        server.start()
        conns = [restore_server.conn_settings(cfg, host, port) for host in (socket_dir, "127.0.0.1")]
        recovery_s = restore_server.wait_promoted(conns, data, timeout, server.log_file, server.log_offset)
        details["timings"]["recovery_s"] = round(recovery_s, 2)
        reached, line = server.outcome()
        if target.kind == "time" and reached is not True:
            failures.append("recovery did not stop at the target %s%s" % (details["target"],
                                                                         ": " + line if line else ""))
        checked = time.monotonic()
        conn = _connect_any(conns)
        try:
            details["counts"] = sanity_counts(conn)
            if warming is not None:
                # Its walk is the cheapest way to every file's size (directory order, several in flight):
                # waiting for it beats the check's own stats, one URL at a time.
                warming.join()
            if snapshot is not None:
                report = check_content(conn, snapshot.path,
                                       sizes=content_sizes(snapshot) if content_sizes else None, seen=seen)
                details["content"] = report
                failures.extend(content_problems(report, snapshot.path))
        finally:
            conn.close()
        details["timings"]["checks_s"] = round(time.monotonic() - checked, 2)
    except (restore_db.RestoreError, restore_plan.PlanError, OSError) as exc:
        failures.append(str(exc))
    finally:
        stop_warming.set()
        if server is not None:
            server.stop(modes=("immediate",))  # a throwaway copy, deleted next: no shutdown checkpoint
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if own_socket_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)
    details["timings"]["total_s"] = round(time.monotonic() - started, 2)
    ok = not failures
    return VerifyResult(ok, summary(details, ok), details)


def _connect_any(conns):
    import postgres

    last = None
    for settings in conns:
        try:
            return postgres.connect(settings)
        except postgres.PostgresError as exc:
            last = exc
    raise restore_db.RestoreError(str(last))


def summary(details, ok):
    """The drill's report as text (first line: the verdict)."""
    t = details["timings"]
    lines = ["Restore drill %s: base backup %s, contentstore snapshot %s" % (
        "OK" if ok else "FAILED", details["base"] or "-", details["snapshot"] or "-"),
        "  target: %s" % (details["target"] or "-")]
    if "recovery_s" in t:
        lines.append("  restore took %.1f s: extract %.1f s, recovery %.1f s (start to promotion), checks %.1f s"
                     % (t["total_s"], t.get("extract_s", 0), t["recovery_s"], t.get("checks_s", 0)))
    else:
        lines.append("  total %.1f s" % t["total_s"])
    if details["counts"]:
        lines.append("  rows: " + ", ".join("%s %d" % item for item in details["counts"].items()))
    content = details["content"]
    if content:
        lines.append("  content: %d store:// URLs checked, %d missing, %d size mismatches%s%s" % (
            content["checked"], content["missing_total"], content["mismatched_total"],
            ", %d in other stores not checked" % content["other_stores"] if content["other_stores"] else "",
            ", %d orphaned URLs without a file" % content["orphans_missing"] if content["orphans_missing"] else ""))
    if details.get("wal_chain"):
        lines.append("  " + details["wal_chain"])
    lines += ["  FAILED: %s" % f for f in details["failures"]]
    lines += ["  warning: %s" % w for w in details["warnings"]]
    return "\n".join(lines)
