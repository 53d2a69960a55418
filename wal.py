#!/usr/bin/env python3
"""WAL archiving for PostgreSQL (archive_command / restore_command) and the names of archive members.

Standard library only, Python 3.8+, imports no project module: PostgreSQL runs this file with the system
python3, and it must keep working whatever else in the suite is broken or half-upgraded. LSN math, the
archive chain check and WAL pruning, which the archive command does not need, are in :mod:`wal_chain`.

CLI (messages go to stderr, which lands in PostgreSQL's log):
  wal.py archive-push <path> <archive_dir>          archive_command = '... archive-push "%p" "<dir>"'
  wal.py archive-get <name> <path> <archive_dir>    restore_command = '... archive-get "%f" "%p" "<dir>"'

archive-push exits 0 only when the file is durably in the archive (or an identical copy already is), else 1
and PostgreSQL retries the same file. It never overwrites an archived file, and never creates the archive
directory: an unmounted backup share must fail loudly, not fill the local disk. The copy goes to
``.<name>.tmp.<pid>`` (dot-prefixed: nothing takes it for a segment), is fsynced, then published with
``os.link(tmp, final)``: link fails with EEXIST instead of replacing, so even two concurrent pushes cannot
clobber each other, and the loser compares contents. Where the file system has no hard links (some
SMB/CIFS mounts) it falls back to rename after an existence check (a tiny race, only with concurrent
pushes of one name, which a single archiver never does). The directory is fsynced afterwards. Temp files of
the same name left by killed runs (pid gone, or older than 10 minutes) are removed first.

archive-get exit codes: 0 = copied; 1 = not in the archive (normal: recovery asks for files past the
end); 200 = the file or the archive is there but could not be read or copied, or the arguments are wrong.
Why: PostgreSQL takes any exit status <= 125 for "no such file" and ends recovery right there, opening the
database at an older point on a new timeline -- silent data loss when the cause is an unmounted share or an
I/O error. An exit status > 125 (or a signal) makes recovery abort with FATAL; the operator sees our
message in the log, fixes the cause and starts the server again, and recovery resumes. 126/127 are avoided
because PostgreSQL logs them as "command not executable"/"command not found". Trade-off: a standby that
meets such an error stops instead of retrying. ``<name>.gz`` is read when ``<name>`` is absent. The
restored file is not fsynced: PostgreSQL fetches it again after a crash and fsyncs what it keeps.

Segment names assume PostgreSQL 9.3+ numbering (no skipped 0xFF segment). Files written by an older
``test ! -f DIR/%f && cp %p DIR/%f`` set-up are plain copies and read the same way.
"""

from __future__ import annotations

import errno
import gzip
import os
import re
import signal
import sys
import time
import types
import zlib

EXIT_ABORT_RECOVERY = 200
STALE_TEMP_SECONDS = 600
CHUNK = 1024 * 1024

_SEGMENT_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_HISTORY_RE = re.compile(r"^([0-9A-F]{8})\.history$")
_BACKUP_RE = re.compile(r"^([0-9A-F]{24})\.[0-9A-F]{8}\.backup$")
_PARTIAL_RE = re.compile(r"^([0-9A-F]{24})\.partial$")


# ---------------------------------------------------------------- names and LSNs (pure)

def parse_segment_name(name):
    """'000000010000000A000000A8' -> (timeline, log, seg) as ints, or None when not a segment name."""
    match = _SEGMENT_RE.match(name or "")
    if not match or int(match.group(1), 16) == 0:
        return None
    return tuple(int(part, 16) for part in match.groups())


def is_segment_name(name):
    """True for a 24-hex-digit segment name (no suffix)."""
    return parse_segment_name(name) is not None


def segment_file_base(name):
    """The segment name of an archive member that is a WAL segment, plain or ``.gz``; else None."""
    kind = classify(name)
    return kind[1] if kind and kind[0] == "segment" else None


def is_history_name(name):
    """True for a timeline history file name such as '00000002.history'."""
    return bool(_HISTORY_RE.match(name or ""))


def is_backup_label_name(name):
    """True for a backup history file name such as '000000010000000000000002.00000028.backup'."""
    return bool(_BACKUP_RE.match(name or ""))


def classify(name):
    """Archive member -> (kind, 24-digit segment or 8-digit timeline), or None. Kinds: 'segment',
    'partial', 'backup', 'history'; a '.gz' suffix is looked through."""
    base = name[:-3] if name.endswith(".gz") else name
    if is_segment_name(base):
        return "segment", base
    for kind, regex in (("partial", _PARTIAL_RE), ("backup", _BACKUP_RE), ("history", _HISTORY_RE)):
        match = regex.match(base)
        if match and (kind == "history" or is_segment_name(match.group(1))):
            return kind, match.group(1)
    return None


# ---------------------------------------------------------------- file helpers for the CLI

class _Failed(Exception):
    """A CLI step failed; ``code`` is the exit status to use."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


ArchiveFailed = _Failed  # the public name, for callers of archive_push/archive_get as a library


class _Interrupted(BaseException):
    """A termination signal arrived; raised so that ``finally`` blocks remove temp files."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def fsync_dir(path):
    """fsync directory ``path`` (following a symlink: the archive may be one); ignores file systems that
    cannot. Raises OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some network file systems cannot fsync a directory; PostgreSQL ignores this case too.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quiet(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _pid_alive(text):
    """True when ``text`` names a live process (another user's counts); False for a dead or invalid pid."""
    try:
        pid = int(text)
        if pid > 0:
            os.kill(pid, 0)
        return pid > 0
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True


def _remove_stale_temps(directory, name):
    """Remove ``.<name>.tmp.<pid>`` files whose pid is gone or that are older than STALE_TEMP_SECONDS."""
    prefix = f".{name}.tmp."
    now = time.time()
    for entry in os.scandir(directory):
        if entry.name.startswith(prefix):
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if age > STALE_TEMP_SECONDS or not _pid_alive(entry.name[len(prefix):]):
                _unlink_quiet(entry.path)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy_to_new_file(source, target, durable, compress=False):
    """Copy the open binary file ``source`` into a new file ``target`` (mode 0600, must not exist),
    gzip-compressed (level 6, no file name or time in the header) when ``compress``."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    packer = zlib.compressobj(6, zlib.DEFLATED, 31) if compress else None
    try:
        while True:
            chunk = source.read(CHUNK)
            if not chunk:
                break
            _write_all(fd, packer.compress(chunk) if packer else chunk)
        if packer:
            _write_all(fd, packer.flush())
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _same_content(path, archived, path_gz=False):
    """True when file ``path`` (gzip-compressed when ``path_gz``) has the same bytes as ``archived`` (read
    through gzip when it ends .gz)."""
    gz = archived.endswith(".gz")
    if not gz and not path_gz and os.path.getsize(path) != os.path.getsize(archived):
        return False
    with (gzip.open if path_gz else open)(path, "rb") as one, (gzip.open if gz else open)(archived, "rb") as other:
        while True:
            chunk = one.read(CHUNK)
            if chunk != other.read(CHUNK):
                return False
            if not chunk:
                return True


def _existing(local, final, local_gz=False):
    """Compare ``local`` with an archived ``final`` or ``final``.gz: None (neither exists), else the
    message to exit 0 with; raises _Failed when the archive holds different content."""
    for candidate in (final, final + ".gz"):
        if os.path.lexists(candidate):
            if _same_content(local, candidate, local_gz):
                # The copy found may be one an interrupted push (or another tool) never made durable:
                # exit 0 promises PostgreSQL it is on disk, so make it so (as basic_archive does).
                _fsync_file(candidate)
                fsync_dir(os.path.dirname(candidate) or ".")
                return f"already archived, identical: {candidate}"
            raise _Failed(f"{candidate} already exists in the archive with DIFFERENT content; not overwriting "
                          "it. Find out why (two servers archiving into one directory? a restored copy still "
                          "archiving?) before removing anything.")
    return None


# ---------------------------------------------------------------- commands

def _raise_vanished(final):
    raise _Failed(f"{final} appeared and vanished while archiving; will retry")


def archive_push(source, archive_dir, compress=False):
    """Archive ``source`` into ``archive_dir`` durably. Returns a message for stderr (None when there is
    nothing to say); raises _Failed. ``compress``: WAL segments (and .partial ones) are stored as
    ``NAME.gz``; .history and .backup files stay plain, for people and other tools to read."""
    name = os.path.basename(source)
    if not name or name.startswith("."):
        raise _Failed(f"refusing to archive {source!r}: not a WAL file name")
    if not os.path.isdir(archive_dir):
        raise _Failed(f"archive directory {archive_dir} does not exist or is not a directory "
                      "(is the backup file system mounted?)")
    kind = classify(name)
    compress = compress and kind is not None and kind[0] in ("segment", "partial")
    final = os.path.join(archive_dir, name + (".gz" if compress else ""))
    try:
        handle = open(source, "rb")
    except FileNotFoundError:
        raise _Failed(f"source file not found: {source} (cwd {os.getcwd()})")
    try:
        with handle:
            plain = os.path.join(archive_dir, name)
            message = _existing(source, plain)
            if message:
                return message
            _remove_stale_temps(archive_dir, name)
            temp = os.path.join(archive_dir, f".{name}.tmp.{os.getpid()}")
            try:
                _copy_to_new_file(handle, temp, durable=True, compress=compress)
                try:
                    os.link(temp, final)
                except FileExistsError:
                    return _existing(temp, plain, compress) or _raise_vanished(final)
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                        raise
                    message = _existing(temp, plain, compress)
                    if message:
                        return message
                    os.rename(temp, final)
            finally:
                _unlink_quiet(temp)
            fsync_dir(archive_dir)
            return None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _Failed(f"no space left on device: {archive_dir}")
        raise


def archive_get(name, target, archive_dir):
    """Copy archived ``name`` (or ``name``.gz, decompressed) to ``target``. Returns None; raises _Failed
    with code 1 when it is not in the archive, EXIT_ABORT_RECOVERY for any real error."""
    if not name or name != os.path.basename(name) or name.startswith("."):
        raise _Failed(f"bad file name {name!r} (arguments in the wrong order?)", EXIT_ABORT_RECOVERY)
    if not os.path.isdir(archive_dir):
        raise _Failed(f"archive directory {archive_dir} is not available (not mounted?); aborting recovery "
                      "rather than ending it early", EXIT_ABORT_RECOVERY)
    source = os.path.join(archive_dir, name)
    target_dir = os.path.dirname(target) or "."
    temp = os.path.join(target_dir, f".{os.path.basename(target)}.tmp.{os.getpid()}")
    try:
        try:
            handle = open(source, "rb")
        except FileNotFoundError:
            try:
                source += ".gz"
                handle = gzip.open(source, "rb")
            except FileNotFoundError:
                raise _Failed(f"not in archive: {name}", 1)
        _remove_stale_temps(target_dir, os.path.basename(target))
        try:
            with handle:
                _copy_to_new_file(handle, temp, durable=False)
            os.replace(temp, target)
        finally:
            _unlink_quiet(temp)
    except (OSError, EOFError, zlib.error) as exc:
        raise _Failed(f"cannot restore {source} to {target}: {exc}; aborting recovery (exit "
                      f"{EXIT_ABORT_RECOVERY}) rather than ending it early", EXIT_ABORT_RECOVERY)


def _plain_args(argv):
    """The argument lists PostgreSQL's archive_command and restore_command pass (``archive-push [--gzip] PATH
    DIR``, ``archive-get NAME PATH DIR``, no other option) parsed without argparse, whose import is a third of
    this script's start-up, paid once per WAL file; None for anything else (argparse then parses it)."""
    values = list(argv[1:])
    gzip_flag = argv[:1] == ["archive-push"] and values[:1] == ["--gzip"]
    if gzip_flag:
        values = values[1:]
    if any(not value or value.startswith("-") for value in values):
        return None
    if argv[:1] == ["archive-push"] and len(values) == 2:
        return types.SimpleNamespace(command="archive-push", gzip=gzip_flag, path=values[0], archive_dir=values[1])
    if argv[:1] == ["archive-get"] and len(values) == 3:
        return types.SimpleNamespace(command="archive-get", name=values[0], path=values[1], archive_dir=values[2])
    return None


def _parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="wal.py", description="WAL archive_command / restore_command for the Alfresco backup suite.",
        epilog=f"archive-get exits 1 when the file is not archived, {EXIT_ABORT_RECOVERY} on real errors so "
               "that PostgreSQL aborts recovery instead of ending it early.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    push = commands.add_parser("archive-push", help="archive a WAL file (archive_command, %%p)")
    push.add_argument("--gzip", action="store_true",
                      help="store WAL segments as NAME.gz (a quiet server's forced segments shrink ~1000x)")
    push.add_argument("path", help="file to archive, relative to the data directory (%%p)")
    push.add_argument("archive_dir")
    get = commands.add_parser("archive-get", help="restore a WAL file (restore_command, %%f %%p)")
    get.add_argument("name", help="file name in the archive (%%f)")
    get.add_argument("path", help="where to write it (%%p)")
    get.add_argument("archive_dir")
    return parser


def _on_signal(signum, _frame):
    raise _Interrupted(signum)


def main(argv=None):
    """CLI entry point; returns the exit status (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    is_get = bool(argv) and argv[0] == "archive-get"
    try:
        args = _plain_args(argv) or _parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code and is_get:
            return EXIT_ABORT_RECOVERY
        raise
    prefix = f"wal.py {args.command}: "
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    try:
        if args.command == "archive-push":
            message = archive_push(args.path, args.archive_dir, compress=args.gzip)
        else:
            message = archive_get(args.name, args.path, args.archive_dir)
        if message:
            sys.stderr.write(prefix + message + "\n")
        return 0
    except _Failed as exc:
        sys.stderr.write(prefix + str(exc) + "\n")
        return exc.code
    except _Interrupted as exc:
        # Die by the same signal, as PostgreSQL expects of an interrupted command.
        signal.signal(exc.signum, signal.SIG_DFL)
        os.kill(os.getpid(), exc.signum)
        return 128 + exc.signum
    except Exception as exc:  # noqa: BLE001 - PostgreSQL only sees the exit status; say why in its log
        sys.stderr.write(f"{prefix}failed: {type(exc).__name__}: {exc}\n")
        return EXIT_ABORT_RECOVERY if is_get else 1


if __name__ == "__main__":
    sys.exit(main())
