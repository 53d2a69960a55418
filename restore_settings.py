"""Recovery settings per PostgreSQL version, pure: the text restore.py writes into a restored data directory.

- before 12: ``recovery.conf`` (9.4: ``pause_at_recovery_target = false``; 9.5-11: ``recovery_target_action =
  'promote'``); from 12: an empty ``recovery.signal`` plus the settings appended to ``postgresql.auto.conf``
  (a ``recovery.conf`` would make 12+ refuse to start);
- ``recovery_target_timeline`` is always written (``latest``; ``current`` for an immediate target) so every
  version behaves alike (the default is ``current`` before 12, ``latest`` from 12);
- ``recovery_target_lsn`` needs 10+; 9.4 is the oldest version supported (``recovery_target = 'immediate'``);
- ``archive_mode = off`` goes into ``postgresql.auto.conf`` (read last, so it wins) unless the copy keeps
  archiving: a restored copy must never write into the live archive.
Raises restore_plan.PlanError.
"""

import collections
import re

import pg_versions
from restore_plan import PlanError, format_pg_time

BLOCK_BEGIN = "# ---- begin restore.py"
BLOCK_END = "# ---- end restore.py ----"
# Settings that point a copy of the data directory back at the original's files.
PATH_SETTINGS = ("data_directory", "hba_file", "ident_file", "external_pid_file")
SHELL_UNSAFE = re.compile(r'["$`\\\n\r\x00]')


def conf_quote(value):
    """A postgresql.conf / recovery.conf string literal."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


def restore_command(python, wal_py, archive_dir):
    """'"<python>" "<wal.py>" archive-get "%f" "%p" "<archive>"' (shell-quoted, % doubled).

    Raises PlanError for a path the shell would expand inside double quotes."""
    for path in (python, wal_py, archive_dir):
        if SHELL_UNSAFE.search(path):
            raise PlanError("path %r contains a character (\" $ ` \\ or newline) that cannot be quoted safely in "
                            "restore_command: move or rename it" % path)
    parts = ['"%s"' % p.replace("%", "%%") for p in (python, wal_py)]
    return '%s %s archive-get "%%f" "%%p" "%s"' % (parts[0], parts[1], archive_dir.replace("%", "%%"))


# Kept under their old names: the rules live in pg_versions.
wal_dir_name = pg_versions.wal_dir
uses_recovery_conf = pg_versions.uses_recovery_conf


def recovery_lines(version_num, restore_cmd, target, timeline="latest"):
    """[(name, value)] of the recovery settings for ``version_num`` (e.g. 90424, 110022, 150004).

    Raises PlanError for versions before 9.4 and for an LSN target before 10."""
    if version_num < pg_versions.OLDEST_SUPPORTED:
        raise PlanError("PostgreSQL %d is older than 9.4: not supported" % version_num)
    if target.kind == "lsn" and not pg_versions.supports_lsn_target(version_num):
        raise PlanError("recovery_target_lsn needs PostgreSQL 10 or later (this backup is %s): use "
                        "--target-time, --target-name or --target-xid" % pg_versions.major_label(version_num))
    if not re.match(r"^(latest|current|[0-9]+)$", str(timeline)):
        raise PlanError("--timeline must be latest, current or a number, got %r" % timeline)
    lines = [("restore_command", restore_cmd)]
    if target.kind == "time":
        lines.append(("recovery_target_time", format_pg_time(target.value)))
    elif target.kind == "immediate":
        lines.append(("recovery_target", "immediate"))
    elif target.kind != "latest":
        lines.append(("recovery_target_%s" % target.kind, str(target.value)))
    if target.kind != "latest":
        # Without this 9.4 pauses (with hot_standby) and 9.5+ defaults to 'pause': never promoting.
        lines.append(pg_versions.stop_at_target(version_num))
    # 'immediate' needs only the backup's own WAL: following a newer timeline could refuse the backup.
    lines.append(("recovery_target_timeline", "current" if target.kind == "immediate" else str(timeline)))
    return lines


def render_lines(lines):
    """'name = value' lines; booleans and numbers bare, everything else quoted."""
    out = []
    for name, value in lines:
        bare = isinstance(value, int) or value in ("false", "true", "on", "off")
        out.append("%s = %s" % (name, value if bare else conf_quote(value)))
    return "\n".join(out) + "\n"


def auto_conf_lines(keep_archiving=False, port=None, socket_dir=None, listen=None, logging_collector=None,
                    durable=True):
    """[(name, value)] appended to postgresql.auto.conf besides the recovery settings. ``durable=False``: a
    throwaway copy (the drill's), deleted after its checks: ``fsync = off`` spares the start-up's fsync of every
    restored file and the checkpoints' syncs, which only matter if the copy must survive a crash."""
    lines = []
    if not keep_archiving:
        lines.append(("archive_mode", "off"))  # a restored copy must never write into the live archive
    if not durable:
        lines.append(("fsync", "off"))
    if port is not None:
        lines.append(("port", int(port)))
    if socket_dir is not None:
        lines.append(("unix_socket_directories", socket_dir))
    if listen is not None:
        lines.append(("listen_addresses", listen))
    if logging_collector is not None:
        lines.append(("logging_collector", "on" if logging_collector else "off"))
    return lines


RecoveryFiles = collections.namedtuple("RecoveryFiles", "recovery_conf signal_file auto_conf_block")
RecoveryFiles.__doc__ = ("What to write into a restored data directory: ``recovery_conf`` text or None, "
                         "``signal_file`` name or None, ``auto_conf_block`` text to append to postgresql.auto.conf.")


def recovery_files(version_num, restore_cmd, target, note, timeline="latest", **auto_kwargs):
    """The files for a restored data directory of ``version_num``. ``note`` goes into the header comment;
    ``auto_kwargs`` go to :func:`auto_conf_lines`. Raises PlanError."""
    recovery = recovery_lines(version_num, restore_cmd, target, timeline)
    extra = auto_conf_lines(**auto_kwargs)
    header = "%s: %s ----\n" % (BLOCK_BEGIN, note)
    if uses_recovery_conf(version_num):
        conf = "# recovery.conf written by restore.py: %s\n" % note + render_lines(recovery)
        block = header + render_lines(extra) + BLOCK_END + "\n" if extra else None
        return RecoveryFiles(conf, None, block)
    return RecoveryFiles(None, "recovery.signal", header + render_lines(recovery + extra) + BLOCK_END + "\n")


# What a restore writes for recovery: none of it may survive into production (every later base backup would
# carry it) or be stacked by the next restore ("multiple recovery targets specified", or a target before the new
# backup's consistent point, and the server refuses to start).
RECOVERY_SETTINGS = ("restore_command", "recovery_target", "recovery_target_name", "recovery_target_time",
                     "recovery_target_xid", "recovery_target_lsn", "recovery_target_inclusive",
                     "recovery_target_timeline", "recovery_target_action", "pause_at_recovery_target",
                     "recovery_end_command", "archive_cleanup_command")
_SETTING_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(=|\s)")


def remove_recovery_settings(conf_text):
    """(new_text, [names]): ``conf_text`` (a postgresql.auto.conf) without any active line setting one of
    RECOVERY_SETTINGS, wherever it is (inside a restore.py block or left by ``ALTER SYSTEM``, which rewrites
    the file without our markers). Pure."""
    names, out = [], []
    for line in conf_text.splitlines(True):
        match = _SETTING_RE.match(line)
        if match and match.group(1).lower() in RECOVERY_SETTINGS:
            names.append(match.group(1).lower())
            continue
        out.append(line)
    return "".join(out), names


def remove_restore_blocks(conf_text):
    """``conf_text`` without the blocks an earlier restore.py appended (BLOCK_BEGIN ... BLOCK_END). Pure."""
    out, inside = [], False
    for line in conf_text.splitlines(True):
        if line.startswith(BLOCK_BEGIN):
            inside = True
        elif inside and line.rstrip("\n") == BLOCK_END:
            inside = False
        elif not inside:
            out.append(line)
    return "".join(out)


def clean_auto_conf(conf_text):
    """What a restore does to the restored postgresql.auto.conf before appending its own block: earlier
    blocks and every recovery setting removed, so blocks never stack (pure). Returns (text, [names])."""
    return remove_recovery_settings(remove_restore_blocks(conf_text))


def neutralize_path_settings(conf_text):
    """(new_text, [names]): active data_directory / hba_file / ident_file / external_pid_file lines of a
    restored postgresql.conf commented out, so the copy never uses the original server's files."""
    names, out = [], []
    for line in conf_text.splitlines(True):
        match = re.match(r"^\s*(%s)\s*(=|\s)" % "|".join(PATH_SETTINGS), line)
        if match:
            names.append(match.group(1))
            line = "#" + line if line.startswith("#") else "# disabled by restore.py: " + line
        out.append(line)
    return "".join(out), names


def recovery_outcome(log_text):
    """(reached, message) from a PostgreSQL log: reached True when recovery stopped at its target, False when
    it ended before the target or failed, None when the log says neither."""
    patterns = [
        (False, r"FATAL:.*recovery ended before configured recovery target was reached.*"),
        (False, r"FATAL:.*(requested recovery stop point is before consistent recovery point|could not "
                r"locate required checkpoint record|invalid checkpoint record|"
                r"WAL ends before end of online backup).*"),
        (True, r"LOG:.*recovery stopping (before|after|at) .*"),
    ]
    for reached, pattern in patterns:
        match = re.search(pattern, log_text)
        if match:
            return reached, match.group(0).strip()
    return None, ""
