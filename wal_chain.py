"""WAL arithmetic and the archive's contents, for the backup and restore side of the suite.

LSNs and segment names (pure), the chain check of an archive directory (is every segment from a base
backup's start on its timelines there?), waiting for a file to arrive, the prune plan and its application,
and the ``.ready`` backlog of a data directory. The archive command itself (and the member-name rules it
shares with this module) is :mod:`wal`, which stays free of project imports.
"""

from __future__ import annotations

import gzip
import os
import re
import time
from typing import NamedTuple

import wal

DEFAULT_SEG_SIZE = 16 * 1024 * 1024
_LSN_RE = re.compile(r"^\s*([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\s*$")
_HISTORY_LINE_RE = re.compile(r"^(\d+)\s+([0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8})(?:\s+(.*))?$")


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


def segment_number(name, seg_size=DEFAULT_SEG_SIZE):
    """Absolute segment number of a segment name (its timeline ignored). Raises ValueError when ``name`` is
    not a segment name or impossible for ``seg_size``."""
    parsed = wal.parse_segment_name(name)
    per_log = segments_per_log(seg_size)
    if parsed is None or parsed[2] >= per_log:
        raise ValueError(f"not a WAL segment name for {seg_size}-byte segments: {name!r}")
    return parsed[1] * per_log + parsed[2]


def archive_segments(archive_dir):
    """Sorted names of the WAL members of ``archive_dir``: segments, .partial, .backup, .history files and
    their .gz variants; temp files and anything else are left out. Raises OSError."""
    return sorted(n for n in os.listdir(archive_dir) if not n.startswith(".") and wal.classify(n))


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
    start = wal.parse_segment_name(start_segment)
    if start is None:
        raise ValueError(f"not a WAL segment name: {start_segment!r}")
    start_tli, start_no = start[0], segment_number(start_segment, seg_size)
    full, partial, histories = {}, {}, {}
    for name in archive_segments(archive_dir):
        kind, base = wal.classify(name)
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
    needed = wal.parse_segment_name(oldest_needed_segment)
    if needed is None:
        raise ValueError(f"not a WAL segment name: {oldest_needed_segment!r}")
    keep = set(keep)
    plan = []
    for name in archive_dir_listing:
        info = wal.classify(name)
        if info is None or info[0] == "history" or name in keep:
            continue
        tli, log, seg = wal.parse_segment_name(info[1])
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
        wal.fsync_dir(archive_dir)
    return count


def ready_backlog(pgdata):
    """Number of WAL files waiting for archive_command (``*.ready`` in pg_wal/archive_status, or
    pg_xlog/archive_status on 9.x). Raises FileNotFoundError when neither directory exists, OSError."""
    for sub in ("pg_wal", "pg_xlog"):
        status = os.path.join(pgdata, sub, "archive_status")
        if os.path.isdir(status):
            return sum(1 for n in os.listdir(status) if n.endswith(".ready"))
    raise FileNotFoundError(f"no pg_wal/archive_status or pg_xlog/archive_status under {pgdata}")
