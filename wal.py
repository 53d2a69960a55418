#!/usr/bin/env python3
"""WAL archiving for PostgreSQL (archive_command / restore_command) and WAL-name math for the suite.

Standard library only, Python 3.8+, imports no project module: PostgreSQL runs this file with the system
python3. The library part is pure (callers pass in values read from the server); only the CLI and the
functions named as such touch the file system.

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

import argparse
import errno
import gzip
import os
import re
import signal
import sys
import time
import zlib
from typing import NamedTuple

DEFAULT_SEG_SIZE = 16 * 1024 * 1024
EXIT_ABORT_RECOVERY = 200
STALE_TEMP_SECONDS = 600
CHUNK = 1024 * 1024

_SEGMENT_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_HISTORY_RE = re.compile(r"^([0-9A-F]{8})\.history$")
_BACKUP_RE = re.compile(r"^([0-9A-F]{24})\.[0-9A-F]{8}\.backup$")
_PARTIAL_RE = re.compile(r"^([0-9A-F]{24})\.partial$")
_LSN_RE = re.compile(r"^\s*([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\s*$")
_HISTORY_LINE_RE = re.compile(r"^(\d+)\s+([0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8})(?:\s+(.*))?$")


# ---------------------------------------------------------------- names and LSNs (pure)

def parse_lsn(text):
    """'16/B374D848' -> int. Raises ValueError for anything else."""
    match = _LSN_RE.match(text or "")
    if not match:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(value):
    """int -> 'X/Y' as PostgreSQL prints it (upper-case hex). Raises ValueError outside 0..2**64-1."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"LSN out of range: {value!r}")
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def segments_per_log(seg_size=DEFAULT_SEG_SIZE):
    """Segments per xlogid ('log', the middle 8 hex digits): 256 for 16 MB. Raises ValueError for a size
    PostgreSQL does not allow (a power of two from 1 MB to 1 GB)."""
    if not (1 << 20 <= seg_size <= 1 << 30) or seg_size & (seg_size - 1):
        raise ValueError(f"invalid WAL segment size: {seg_size!r}")
    return 0x100000000 // seg_size


def segment_from_number(timeline, segno, seg_size=DEFAULT_SEG_SIZE):
    """(timeline, absolute segment number) -> 24-hex-digit segment name. Raises ValueError when out of range."""
    per_log = segments_per_log(seg_size)
    if not 1 <= timeline <= 0xFFFFFFFF or segno < 0 or segno // per_log > 0xFFFFFFFF:
        raise ValueError(f"timeline {timeline!r} / segment {segno!r} out of range")
    return f"{timeline:08X}{segno // per_log:08X}{segno % per_log:08X}"


def segment_name(timeline, lsn, seg_size=DEFAULT_SEG_SIZE, prev=False):
    """Name of the segment holding ``lsn`` ('0/3000028' or an int) on ``timeline``. With ``prev`` the
    segment holding lsn-1, as pg_walfile_name() and a backup's stop point use. Raises ValueError."""
    value = parse_lsn(lsn) if isinstance(lsn, str) else int(lsn)
    if prev:
        if value <= 0:
            raise ValueError("no segment before LSN 0/0")
        value -= 1
    return segment_from_number(timeline, value // seg_size, seg_size)


def parse_segment_name(name):
    """'000000010000000A000000A8' -> (timeline, log, seg) as ints, or None when not a segment name."""
    match = _SEGMENT_RE.match(name or "")
    if not match or int(match.group(1), 16) == 0:
        return None
    return tuple(int(part, 16) for part in match.groups())


def segment_number(name, seg_size=DEFAULT_SEG_SIZE):
    """Absolute segment number of a segment name (its timeline ignored). Raises ValueError when ``name`` is
    not a segment name or impossible for ``seg_size``."""
    parsed = parse_segment_name(name)
    per_log = segments_per_log(seg_size)
    if parsed is None or parsed[2] >= per_log:
        raise ValueError(f"not a WAL segment name for {seg_size}-byte segments: {name!r}")
    return parsed[1] * per_log + parsed[2]


def is_segment_name(name):
    """True for a 24-hex-digit segment name (no suffix)."""
    return parse_segment_name(name) is not None


def segment_file_base(name):
    """The segment name of an archive member that is a WAL segment, plain or ``.gz``; else None."""
    kind = _classify(name)
    return kind[1] if kind and kind[0] == "segment" else None


def is_history_name(name):
    """True for a timeline history file name such as '00000002.history'."""
    return bool(_HISTORY_RE.match(name or ""))


def is_backup_label_name(name):
    """True for a backup history file name such as '000000010000000000000002.00000028.backup'."""
    return bool(_BACKUP_RE.match(name or ""))


def _classify(name):
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


# ---------------------------------------------------------------- archive contents

def archive_segments(archive_dir):
    """Sorted names of the WAL members of ``archive_dir``: segments, .partial, .backup, .history files and
    their .gz variants; temp files and anything else are left out. Raises OSError."""
    return sorted(n for n in os.listdir(archive_dir) if not n.startswith(".") and _classify(n))


def read_history_file(path):
    """Parse a timeline history file (plain or .gz) -> [(parent_tli, switch_lsn, reason), ...] in file
    order. Raises OSError, or ValueError for a malformed line."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        lines = handle.read().splitlines()
    entries = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _HISTORY_LINE_RE.match(line)
        if not match:
            raise ValueError(f"{path} line {number}: not a timeline history line: {line!r}")
        entries.append((int(match.group(1)), parse_lsn(match.group(2)), match.group(3) or ""))
    return entries


class ChainReport(NamedTuple):
    """Result of check_chain. ``first``/``last``: names of the first and last files present in the chain
    (``last`` is the newest archived WAL; it may be an old timeline's ``.partial``); ``gaps``: [(first
    missing, last missing)]; ``timelines``: timelines the chain follows; ``segments``: files counted."""
    ok: bool
    first: str | None
    last: str | None
    gaps: list[tuple[str, str]]
    timelines: list[int]
    segments: int

    def describe(self):
        """One human-readable line for logs and mails."""
        gaps = ", ".join(f"{a}..{b}" for a, b in self.gaps) or "none"
        timelines = ",".join(str(t) for t in self.timelines)
        return (f"WAL chain {'complete' if self.ok else 'BROKEN'}: {self.segments} segments "
                f"{self.first}..{self.last} on timelines {timelines}; gaps: {gaps}")


def _lineage(archive_dir, history_names, timeline, seg_size):
    """[(tli, begin_segno, end_segno or None)] for ``timeline``: each ancestor serves segments from its
    begin up to (excluding) the segment holding the switch point; the newest serves the rest."""
    entries = []
    if timeline in history_names:
        entries = read_history_file(os.path.join(archive_dir, history_names[timeline]))
    ranges, begin = [], 0
    for parent, switch_lsn, _reason in entries:
        end = switch_lsn // seg_size
        ranges.append((parent, begin, end))
        begin = end
    ranges.append((timeline, begin, None))
    return ranges


def check_chain(archive_dir, start_segment, seg_size=DEFAULT_SEG_SIZE):
    """Check that WAL from ``start_segment`` on is continuous in ``archive_dir``, following timeline
    switches recorded in .history files up to the highest timeline reachable from the start.

    Like recovery, segment N is read from the newest timeline of the lineage that began at or before N,
    so the segment holding a switch point comes from the new timeline; the old timeline's copy (full or
    .partial) is optional and only counts as the chain's end while the new timeline has none yet.
    Returns a ChainReport; raises ValueError (bad name, bad history file) or OSError."""
    start = parse_segment_name(start_segment)
    if start is None:
        raise ValueError(f"not a WAL segment name: {start_segment!r}")
    start_tli, start_no = start[0], segment_number(start_segment, seg_size)
    full, partial, histories = {}, {}, {}
    for name in archive_segments(archive_dir):
        kind, base = _classify(name)
        if kind == "history":
            histories.setdefault(int(base, 16), name)
        elif kind in ("segment", "partial"):
            key = (int(base[:8], 16), segment_number(base, seg_size))
            (full if kind == "segment" else partial).setdefault(key, base + ("" if kind == "segment" else ".partial"))

    lineage = _lineage(archive_dir, histories, start_tli, seg_size)
    for tli in sorted((t for t in histories if t > start_tli), reverse=True):
        ranges = _lineage(archive_dir, histories, tli, seg_size)
        if any(t == start_tli and (end is None or start_no <= end) for t, _b, end in ranges):
            lineage = ranges
            break
    path = [(t, b, e) for t, b, e in lineage if e is None or e > start_no or (t == start_tli and e == start_no)]

    def tli_of(segno):
        return [t for t, b, e in lineage if b <= segno and (e is None or segno < e)][-1]

    present = {}
    for (tli, segno), name in full.items():
        if segno >= start_no and tli_of(segno) == tli:
            present[segno] = name
    for tli, _begin, end in path:
        if end is not None and end >= start_no and max(present, default=-1) < end:
            old = full.get((tli, end)) or partial.get((tli, end))
            if old:
                present[end] = old
    if not present:
        missing = segment_from_number(tli_of(start_no), start_no, seg_size)
        return ChainReport(False, None, None, [(missing, missing)], [t for t, _b, _e in path], 0)
    gaps, expected = [], start_no
    for segno in sorted(present):
        if segno > expected:
            gaps.append((segment_from_number(tli_of(expected), expected, seg_size),
                         segment_from_number(tli_of(segno - 1), segno - 1, seg_size)))
        expected = segno + 1
    return ChainReport(not gaps, present[min(present)], present[max(present)], gaps,
                       [t for t, _b, _e in path], len(present))


def wait_for_file(archive_dir, name, timeout, poll=0.5):
    """Wait up to ``timeout`` seconds for ``name`` (or ``name``.gz) in ``archive_dir``; True when it is there."""
    deadline = time.monotonic() + timeout
    while True:
        if any(os.path.exists(os.path.join(archive_dir, n)) for n in (name, name + ".gz")):
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(poll, remaining))


def wal_prune_plan(archive_dir_listing, oldest_needed_segment, keep=()):
    """Names from a listing that may be deleted when ``oldest_needed_segment`` is the oldest WAL any kept
    backup needs. Deletable: segments, .partial and .backup files (and .gz variants) on the needed timeline
    or an older one whose segment is strictly older. Never: .history files, names in ``keep``, anything
    on a higher timeline, unknown files. Pure; raises ValueError for a bad needed segment."""
    needed = parse_segment_name(oldest_needed_segment)
    if needed is None:
        raise ValueError(f"not a WAL segment name: {oldest_needed_segment!r}")
    keep = set(keep)
    plan = []
    for name in archive_dir_listing:
        info = _classify(name)
        if info is None or info[0] == "history" or name in keep:
            continue
        tli, log, seg = parse_segment_name(info[1])
        if tli <= needed[0] and (log, seg) < needed[1:]:
            plan.append(name)
    return sorted(plan)


def apply_prune(archive_dir, names):
    """Delete ``names`` (plain file names) from ``archive_dir``; already-missing ones are skipped. Returns
    how many were deleted. Raises ValueError for a name with a path in it, OSError otherwise."""
    count = 0
    for name in names:
        if not name or name != os.path.basename(name) or name in (".", ".."):
            raise ValueError(f"refusing to delete {name!r}")
        try:
            os.unlink(os.path.join(archive_dir, name))
            count += 1
        except FileNotFoundError:
            pass
    if count:
        _fsync_dir(archive_dir)
    return count


def ready_backlog(pgdata):
    """Number of WAL files waiting for archive_command (``*.ready`` in pg_wal/archive_status, or
    pg_xlog/archive_status on 9.x). Raises FileNotFoundError when neither directory exists, OSError."""
    for sub in ("pg_wal", "pg_xlog"):
        status = os.path.join(pgdata, sub, "archive_status")
        if os.path.isdir(status):
            return sum(1 for n in os.listdir(status) if n.endswith(".ready"))
    raise FileNotFoundError(f"no pg_wal/archive_status or pg_xlog/archive_status under {pgdata}")


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


def _fsync_dir(path):
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
    try:
        pid = int(text)
    except ValueError:
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
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
                _fsync_dir(os.path.dirname(candidate) or ".")
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
    kind = _classify(name)
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
            _fsync_dir(archive_dir)
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


def _parser():
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
        args = _parser().parse_args(argv)
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
