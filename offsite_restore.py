"""``restore.py COMMAND --from offsite``: restore from the off-site copy, e.g. on a new host after the server
was lost. The only input is the ``.env`` (OFFSITE_REMOTE, OFFSITE_RCLONE_CONFIG and, for an encrypted copy,
the crypt remote's key in that config file); BACKUP_DIR need not exist yet.

Everything is read into a private staging directory laid out like BACKUP_DIR (``--staging``, default
``BACKUP_DIR/offsite-restore``): the metadata of every set off-site (offsite_remote.stage), then the files
the command needs: the chosen base backup, the WAL from its start segment on (into ``pg_wal/``, which the
restored server's ``restore_command`` reads through ``wal.py archive-get``: keep the staging directory until
its recovery has finished), the paired night's content files (``full``). The planning and the restore are
restore.py's own (restore_plan, restore_db, restore_full, restore_verify) run on that staging directory, so
the off-site restore follows exactly the rules of a local one. Downloads resume: files already staged with
the same size and time are not fetched again.
"""

import copy
import logging
import os
import random
import shutil
import tempfile

import catalog
import email_alert
import lock
import mail_report
import monitor
import offsite_cli
import offsite_remote
import rclone
import restore_db
import restore_plan

LOG = logging.getLogger("restore")


def staging_config(cfg, staging, wal_dir="pg_wal"):
    """A copy of ``cfg`` whose BACKUP_DIR is ``staging`` and whose WAL archive is ``staging/<wal_dir>``."""
    staged = copy.copy(cfg)
    staged.BACKUP_DIR = staging
    staged.WAL_ARCHIVE_DIR = os.path.join(staging, wal_dir)
    staged.VERIFY_SCRATCH_DIR = getattr(cfg, "VERIFY_SCRATCH_DIR", "") or staging
    return staged


class Source:
    """The remote, its catalog and the staging directory of one ``--from offsite`` command."""

    def __init__(self, cfg, staging=None):
        self.cfg = cfg
        self.staging = os.path.abspath(staging or os.path.join(cfg.BACKUP_DIR, "offsite-restore"))
        os.makedirs(self.staging, mode=0o700, exist_ok=True)
        self.lock = lock.BackupLock(self.staging, "staging.lock", what="another restore uses this staging directory")
        self.lock.acquire()
        self.remote = rclone.Remote(cfg, LOG)
        LOG.info("reading the off-site copy %s (staging in %s)", cfg.OFFSITE_REMOTE, self.staging)
        self.cat = offsite_remote.read_catalog(self.remote)
        offsite_remote.stage(self.cat, self.staging)
        self.staged = staging_config(cfg, self.staging)

    def close(self):
        self.lock.release()

    def fetch_base(self, base):
        """Download base backup ``base`` (a staged entry) and the WAL from its start on. Returns the entry as
        restore_db sees it after the download."""
        LOG.info("downloading base backup %s", base.name)
        self.remote.download("postgres/%s" % base.name, os.path.join(self.staging, "postgres", base.name))
        offsite_remote.download_wal(self.remote, self.cat, base.info["start_wal_file"],
                                    self.staged.wal_archive_dir, base.info.get("wal_segment_size") or 16 << 20)
        return base

    def choose_base(self, target, backup_id, timeline="latest"):
        """The base backup a restore to ``target`` starts from, chosen on the off-site catalog, downloaded."""
        bases = catalog.list_backups(self.staging, "postgres")
        base, _notes = restore_plan.choose_base(bases, target, backup_id, self.cat.newest_wal_at())
        return self.fetch_base(base)

    def fetch_snapshot(self, snapshot, dest, rels=None):
        """Download snapshot ``snapshot``'s files (the night's manifest; only ``rels`` when given) into
        ``dest`` and check each size. Returns the number of files. Raises RestoreError."""
        files = offsite_remote.manifest(self.remote, snapshot.name)
        wanted = sorted(rels) if rels is not None else sorted(files)
        missing = [r for r in wanted if r not in files]
        if missing:
            raise restore_db.RestoreError("%s is not in the off-site manifest of %s" % (missing[0], snapshot.name))
        LOG.info("downloading %d content files of %s into %s", len(wanted), snapshot.name, dest)
        os.makedirs(dest, mode=0o700, exist_ok=True)
        self.remote.download("content", dest, rels=wanted, what="downloading the content of %s" % snapshot.name)
        wrong = [r for r in wanted if not os.path.isfile(os.path.join(dest, r)) or
                 os.path.getsize(os.path.join(dest, r)) != files[r]]
        if wrong:
            raise restore_db.RestoreError("%d content files of %s did not arrive whole from %s, e.g. %s" % (
                len(wrong), snapshot.name, self.remote.path("content"), wrong[0]))
        return len(wanted)


def run(env_path, args):
    """Dispatch one restore.py command with ``--from offsite``. Returns restore.py's exit code."""
    import restore

    try:
        # BACKUP_DIR holds the staging directory (unless --staging): required; it need not exist yet.
        cfg = offsite_cli.remote_config(env_path, ("PGUSER", "ALF_BASE_DIR") + (
            ("BACKUP_DIR",) if getattr(args, "staging", None) else ()))
        offsite_cli.require_remote(cfg)
        if not getattr(args, "staging", None):
            os.makedirs(cfg.BACKUP_DIR, mode=0o700, exist_ok=True)
    except (offsite_cli.config.ConfigError, OSError) as exc:
        LOG.error("%s", exc)
        print(str(exc))
        return restore.EXIT_CONFIG
    os.umask(0o077)
    restore.setup_logging(cfg, to_file=args.command != "list" and os.access(cfg.BACKUP_DIR, os.W_OK))
    source = None
    try:
        source = Source(cfg, getattr(args, "staging", None))
        if args.command == "list":
            return cmd_list(source, args)
        if args.command == "postgres":
            args.backup = source.choose_base(restore.target_of(args), args.backup, args.timeline).name
            return restore.cmd_postgres(source.staged, args)
        if args.command == "contentstore":
            return cmd_contentstore(source, args, restore)
        if args.command == "full":
            return cmd_full(source, args, restore)
        return cmd_verify(source, args, restore)
    except lock.LockHeld as exc:
        LOG.error("%s", exc)
        return restore.EXIT_LOCKED
    except (restore_plan.PlanError, restore_db.Refused) as exc:
        LOG.error("refused: %s", exc)
        return restore.EXIT_REFUSED
    except (rclone.RcloneError, restore_db.RestoreError, restore.postgres.PostgresError,
            restore.subprocess_utils.CommandError, OSError) as exc:
        LOG.error("FAILED: %s", exc)
        return restore.EXIT_FAILED
    finally:
        if source is not None:
            source.close()


def cmd_list(source, args):
    import restore

    listing = offsite_remote.placeholder_archive
    listing(source.remote, source.cat, os.path.join(source.staging, "wal-listing"))
    print("Off-site copy %s (a base backup counts once the WAL segment it stopped in is off-site too):"
          % source.cfg.OFFSITE_REMOTE)
    return restore.cmd_list(staging_config(source.cfg, source.staging, "wal-listing"), args.json)


def cmd_contentstore(source, args, restore):
    snapshots = catalog.list_backups(source.staging, "contentstore")
    snapshot, warnings = restore_plan.snapshot_to_restore(snapshots, args.for_time, args.snapshot)
    for warning in warnings:
        LOG.warning("%s", warning)
    rels = []
    for url in args.url:
        rel = restore_plan.content_relpath(url)
        if rel is None:
            raise restore_plan.PlanError("not a store:// content URL: %r" % url)
        rels.append(rel)
    dest = os.path.abspath(args.to)
    if not rels:
        restore_db.check_free_space(dest, int((snapshot.info.get("bytes_total") or 0) * 1.05), "the contentstore")
    restore_db.prepare_dir(dest)
    count = source.fetch_snapshot(snapshot, dest, rels or None)
    restore.say("Restored contentstore snapshot %s (started %s) from %s into %s: %d files." % (
        snapshot.name, restore_plan.show_time(restore_plan.started_at(snapshot)), source.cfg.OFFSITE_REMOTE, dest,
        count))
    return restore.EXIT_OK


def cmd_full(source, args, restore):
    base = source.choose_base(restore.target_of(args), args.backup, args.timeline)
    plan = restore_db.plan_database(source.staged, restore.target_of(args), base.name, args.timeline)
    snapshot, _warnings = restore_plan.choose_snapshot(
        catalog.list_backups(source.staging, "contentstore"), restore_plan.db_point(plan.target, plan.base),
        args.snapshot, plan.archive.newest_at)
    source.fetch_snapshot(snapshot, snapshot.path)
    if args.with_config:
        config = restore_plan.choose_config(catalog.list_backups(source.staging, "config"), plan.base)
        if config is not None:
            source.remote.download("config/%s" % config.name, config.path)
    args.backup = base.name
    return restore.cmd_full(source.staged, args)


def cmd_verify(source, args, restore):
    import restore_verify

    staged = catalog.list_backups(source.staging, "postgres")
    target = restore_plan.make_target(time=args.target_time) if args.target_time else restore_plan.LATEST
    if args.target_time:
        base = source.choose_base(target, args.backup)
    else:
        base = source.fetch_base(restore_plan.find_backup(staged, args.backup, "base"))
    LOG.info("listing the content objects off-site (sizes only, nothing downloaded)")
    listing = {item["Path"]: item.get("Size") for item in source.remote.lsjson("content", recursive=True)}
    manifests = {}

    def sizes(snapshot):
        files = manifests.setdefault(snapshot.name, offsite_remote.manifest(source.remote, snapshot.name))
        return {rel: listing[rel] for rel in files if rel in listing}

    result = restore_verify.verify_backup(source.staged, base.name, args.target_time, LOG, args.timeout,
                                          content_sizes=sizes)
    failures = list(result.details["failures"])
    lines = [result.summary_text]
    snapshot = result.details.get("snapshot")
    if snapshot:
        failures += sample_check(source, snapshot, manifests.get(snapshot) or {}, listing, lines)
    ok = not failures
    text = "\n".join(lines).replace(os.path.join(source.staging, "contentstore") + "/",
                                    "the off-site copy %s, night " % source.remote.path("content"))
    if ok != result.ok:
        text = text.replace("Restore drill OK", "Restore drill FAILED", 1) + "\n" + "\n".join(
            "  FAILED: %s" % f for f in failures[len(result.details["failures"]):])
    restore.say("Off-site copy %s:\n%s" % (source.cfg.OFFSITE_REMOTE, text))
    stage = {"name": "verify_offsite", "status": "OK" if ok else "FAILED", "duration":
             result.details["timings"].get("total_s"), "detail": failures[0] if failures else "off-site drill"}
    subject, body = mail_report.build_report(monitor.mail_host(source.cfg), ok, [stage],
                                             extra_sections=[("Off-site restore drill", text)])
    email_alert.notify(source.cfg, ok, subject, body, LOG, secrets=source.cfg.secrets())
    return restore.EXIT_OK if ok else restore.EXIT_FAILED


def sample_check(source, snapshot_name, files, listing, lines):
    """Download OFFSITE_VERIFY_SAMPLE random content files of the paired night and compare their bytes: with
    the manifest's size, the remote's MD5 where the backend has one, and the local snapshot when this host
    still has it. Returns failure lines; appends a report line to ``lines``."""
    count = min(len(files), max(0, source.cfg.OFFSITE_VERIFY_SAMPLE))
    if not count:
        return []
    chosen = sorted(random.sample(sorted(files), count))
    scratch = tempfile.mkdtemp(prefix=".sample-", dir=source.staging)
    failures, compared = [], 0
    try:
        source.remote.download("content", scratch, rels=chosen, what="downloading %d sample files" % count)
        hashes = {item["Path"]: (item.get("Hashes") or {}).get("md5") for item in _stat_many(source, chosen)}
        local_root = os.path.join(source.cfg.BACKUP_DIR, "contentstore", snapshot_name)
        for rel in chosen:
            path = os.path.join(scratch, rel)
            if not os.path.isfile(path):
                failures.append("sample %s: could not be downloaded from %s" % (rel, source.remote.path("content")))
                continue
            if os.path.getsize(path) != files[rel]:
                failures.append("sample %s: %d bytes off-site, %d in the manifest" % (rel, os.path.getsize(path),
                                                                                     files[rel]))
                continue
            digest = rclone.md5_of(path)
            if hashes.get(rel) and hashes[rel] != digest:
                failures.append("sample %s: MD5 %s of the downloaded bytes differs from the remote's %s" % (
                    rel, digest, hashes[rel]))
            local = os.path.join(local_root, rel)
            if os.path.isfile(local):
                compared += 1
                if rclone.md5_of(local) != digest:
                    failures.append("sample %s: the off-site bytes differ from the local snapshot %s" % (rel, local))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines.append("  sample: %d content files downloaded and checked (size%s%s), %d problems" % (
        count, ", MD5" if any(hashes.values()) else "", ", bytes against %d local copies" % compared if compared
        else "", len(failures)))
    return failures


def _stat_many(source, rels):
    items = []
    for rel in rels:
        try:
            items += [dict(i, Path=rel) for i in source.remote.lsjson("content/" + rel, hashes=True)]
        except rclone.RcloneError:
            continue
    return items
