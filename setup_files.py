"""Pure text rules for the set-up wizard, part 1: ``.env`` files, postgresql.conf, and the PostgreSQL
settings each server version needs (part 2, pg_hba.conf/crontab/properties: setup_formats.py).

Nothing here touches the disk or runs a program: every function takes text and returns text or values, so
each rule is unit-tested on its own (tests/test_setup.py). Standard library only (setup.py creates the venv).
"""

import difflib
import os
import re

import pg_versions

MARKER = "alfresco-backup setup.py"
MIN_WAL_SENDERS = 3
ARCHIVE_TIMEOUT = 300
WAL_KEEP_SEGMENTS = 64  # 1 GB at 16 MB: before 10, tar backups fetch their WAL from pg_wal at the end


class TextError(Exception):
    """A file's text cannot be used as asked (the message says which file/line and why)."""


# ---- .env (python-dotenv compatible) -------------------------------------------------------------------
_DQ_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
               "t": "\t", "v": "\v"}
_LINE_RE = re.compile(r"""^[ \t]*(?:export[ \t]+)?(?:'([^']+)'|([^=#\s]+))[ \t]*(?:=[ \t]*(.*))?$""")
_VAR_RE = re.compile(r"\$\{([^}:]*)(?::-([^}]*))?\}")


def parse_env(text, environ=None):
    """{key: value} from ``.env`` text, as python-dotenv's ``dotenv_values`` reads it (quotes, escapes,
    ``export``, comments, ``${VAR}`` / ``${VAR:-default}`` in every value; later keys win).
    ``environ`` is consulted for ${VAR} not set earlier in the file. Raises TextError for a line it cannot
    read (python-dotenv would skip it with a warning; the wizard prefers to say so)."""
    environ = {} if environ is None else environ
    values = {}
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE_RE.match(line)
        if not match:
            raise TextError("line %d: cannot read %r" % (index, line))
        key = match.group(1) or match.group(2)
        rest = match.group(3)
        if rest is None:
            values[key] = ""
            continue
        quote = rest[:1]
        if quote in ("'", '"'):
            # A quoted value may span lines; find its unescaped closing quote.
            body = rest[1:]
            while True:
                end = _closing_quote(body, quote)
                if end is not None or index >= len(lines):
                    break
                body += "\n" + lines[index]
                index += 1
            if end is None:
                raise TextError("line %d: unterminated %s quote" % (index, quote))
            tail = body[end + 1:].strip()
            if tail and not tail.startswith("#"):
                raise TextError("line %d: unexpected text after the closing quote: %r" % (index, tail))
            raw = body[:end]
            if quote == "'":
                values[key] = _expand(re.sub(r"\\([\\'])", r"\1", raw), values, environ)
            else:
                values[key] = _expand(re.sub(r"\\([\\'\"abfnrtv])", lambda m: _DQ_ESCAPES[m.group(1)], raw),
                                      values, environ)
        else:
            values[key] = _expand(re.sub(r"\s+#.*$", "", rest).strip(), values, environ)
    return values


def _closing_quote(body, quote):
    # As python-dotenv's pattern: a backslash escapes only a following quote of the same kind.
    i = 0
    while i < len(body):
        if body[i] == "\\" and body[i + 1:i + 2] == quote:
            i += 2
            continue
        if body[i] == quote:
            return i
        i += 1
    return None


def _expand(value, values, environ):
    # python-dotenv 1.0 expands ${VAR} in every value, quoted or not; the file's own keys win.
    def repl(match):
        name, default = match.group(1), match.group(2)
        if name in values:
            return values[name]
        return environ.get(name, default or "")
    return _VAR_RE.sub(repl, value)


def quote_env(value):
    """``value`` for a python-dotenv file: single-quoted, or bare when it ends with a backslash
    (python-dotenv's quote patterns would read that backslash as escaping the closing quote).
    Raises ValueError for a value python-dotenv cannot hold: a line break, ``${`` (expanded even inside
    quotes), or a trailing backslash together with spaces, '#' or a leading quote."""
    value = str(value)
    if "\n" in value or "\r" in value:
        raise ValueError("a .env value cannot contain a line break")
    if "${" in value:
        raise ValueError("python-dotenv would expand '${' in a .env value")
    if value.endswith("\\"):
        if re.search(r"\s|#", value) or value[:1] in ("'", '"'):
            raise ValueError("python-dotenv cannot hold a value that ends with a backslash and contains spaces, "
                             "'#' or starts with a quote")
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def format_env(values, options):
    """The text of a ``.env``: every key of ``options`` (config.OPTIONS rows) with its description, in table
    order, plus ``values`` keys not in the table at the end."""
    lines = ["# Alfresco backup configuration, written by setup.py (python3 setup.py to change it).",
             "# Keep it private: chmod 600.", ""]
    names = []
    for name, _kind, default, required, description, secret in options:
        names.append(name)
        lines.append("# %s%s%s" % (description, " (required)" if required else "",
                                   " (secret)" if secret else ""))
        lines.append("%s=%s" % (name, quote_env(values.get(name, default or ""))))
    extra = [k for k in values if k not in names]
    if extra:
        lines.append("")
        lines.append("# Not in the option table (kept from the earlier file):")
        lines.extend("%s=%s" % (k, quote_env(values[k])) for k in extra)
    return "\n".join(lines) + "\n"


def effective_env(values, options):
    """``values`` with every option's default filled in (to compare two .env files by meaning)."""
    result = {name: (default or "") for name, _k, default, _r, _d, _s in options}
    result.update({k: (v or "").strip() for k, v in values.items()})
    for name, _k, default, _r, _d, _s in options:
        if not result[name]:
            result[name] = default or ""
    return result


def unified_diff(old, new, name):
    """A unified diff of two texts (empty string when equal). ``old`` None means the file is new."""
    if old == new:
        return ""
    return "".join(difflib.unified_diff((old or "").splitlines(True), new.splitlines(True),
                                        "a/" + name if old is not None else "/dev/null", "b/" + name))


# ---- postgresql.conf ------------------------------------------------------------------------------------
_CONF_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(?:=\s*|\s+)(.*)$")


def _conf_value(rest):
    """The value of a postgresql.conf line after ``name =`` (quotes and trailing comment handled)."""
    rest = rest.strip()
    if rest.startswith("'"):
        out, i = [], 1
        while i < len(rest):
            char = rest[i]
            if char == "\\" and i + 1 < len(rest):
                out.append(rest[i + 1])
                i += 2
                continue
            if char == "'":
                if rest[i + 1:i + 2] == "'":
                    out.append("'")
                    i += 2
                    continue
                return "".join(out)
            out.append(char)
            i += 1
        raise TextError("unterminated quote in %r" % rest)
    return rest.split("#", 1)[0].strip()


def parse_conf(text):
    """{lower-case name: value} of the active lines of a postgresql.conf (the last one wins, as in
    PostgreSQL). ``include`` directives are reported under the key '<include>' (a list)."""
    values = {}
    for line in text.splitlines():
        match = _CONF_RE.match(line)
        if not match or line.lstrip().startswith("#"):
            continue
        name, rest = match.group(1).lower(), match.group(2)
        if name in ("include", "include_if_exists", "include_dir"):
            values.setdefault("<include>", []).append(_conf_value(rest))
            continue
        values[name] = _conf_value(rest)
    return values


def conf_quote(value):
    """A postgresql.conf value: numbers bare, everything else single-quoted."""
    value = str(value)
    if re.match(r"^-?[0-9]+$", value):
        return value
    return "'" + value.replace("'", "''") + "'"


def set_conf(text, changes):
    """``text`` with each name of ``changes`` ({name: value}) set: the last active line for it is replaced
    in place (earlier ones are overridden by it anyway); a missing one is appended in a block marked with
    MARKER. Returns the new text (unchanged when nothing differs)."""
    lines = text.splitlines()
    appended = []
    for name, value in changes.items():
        wanted = "%s = %s" % (name, conf_quote(value))
        last = None
        for number, line in enumerate(lines):
            match = _CONF_RE.match(line)
            if match and not line.lstrip().startswith("#") and match.group(1).lower() == name.lower():
                last = number
        if last is None:
            appended.append(wanted)
        elif parse_conf(lines[last]).get(name.lower()) != str(value):
            lines[last] = "%s\t\t# %s" % (wanted, MARKER)
    if appended:
        if lines and lines[-1].strip():
            lines.append("")
        lines.append("# ---- %s: WAL archiving for backups ----" % MARKER)
        lines.extend(appended)
    return "\n".join(lines) + "\n"


def archive_command(python, wal_py, archive_dir):
    """This project's archive_command with each path double-quoted for /bin/sh. Raises TextError for a
    path the shell or PostgreSQL's %-escapes would change (quote, $, backquote, backslash, newline, %)."""
    for path in (python, wal_py, archive_dir):
        if re.search(r"[\"$`\\\n%]", path) or not os.path.isabs(path):
            raise TextError("path not usable in archive_command (absolute, without \" $ ` \\ %% or a "
                            "newline): %r" % path)
    # --gzip: a segment closed by archive_timeout is mostly zeros (16 MB -> ~16 KB).
    return '"%s" "%s" archive-push --gzip "%%p" "%s"' % (python, wal_py, archive_dir)


_UNITS = {"kB": 1, "MB": 1024, "GB": 1024 ** 2, "TB": 1024 ** 3,
          "ms": 0.001, "s": 1, "min": 60, "h": 3600, "d": 86400}


def pg_number(value, unit="s"):
    """A PostgreSQL integer setting in ``unit`` ('s' for seconds, 'kB' for sizes): '5min' → 300,
    '300' → 300, '1GB' (unit kB) → 1048576. Returns None when it cannot be read."""
    match = re.match(r"^\s*(-?[0-9]+)\s*([A-Za-z]*)\s*$", str(value))
    if not match:
        return None
    number, suffix = int(match.group(1)), match.group(2)
    if not suffix:
        return number
    if suffix not in _UNITS or unit not in _UNITS:
        return None
    return int(number * _UNITS[suffix] / _UNITS[unit])


class Setting:
    """One setting the backups need: ``name``, ``value`` (what to write), ``restart`` (True when the
    server must restart for it), ``ok(current)`` whether a current value already satisfies it."""

    def __init__(self, name, value, restart, ok):
        self.name = name
        self.value = value
        self.restart = restart
        self.ok = ok

    def __repr__(self):
        return "Setting(%s=%r)" % (self.name, self.value)


def wal_keep_name(server_num):
    """The name of the keep-WAL setting on this version: wal_keep_segments up to 12, wal_keep_size from 13
    (each version refuses to start with the other name)."""
    return pg_versions.wal_keep_setting(server_num)


def desired_settings(server_num, command):
    """The settings a server of version ``server_num`` needs for this project's backups (pure).

    wal_level: hot_standby before 9.6 (replica from 9.6; logical is kept); archive_mode on (always kept);
    archive_command ``command``; max_wal_senders at least 3 (a higher value is kept); archive_timeout 300
    when it is 0; before 10 (tar base backups fetch WAL from pg_wal at the end) wal_keep_segments 64 when it
    is lower. From 10 pg_basebackup streams WAL through a temporary slot, so no keep setting is written.
    """
    settings = [
        Setting("wal_level", pg_versions.archive_wal_level(server_num), True,
                lambda v: pg_versions.wal_level_ok(server_num, v, wizard=True)),
        Setting("archive_mode", "on", True, lambda v: (v or "").lower() in ("on", "always", "true", "yes", "1")),
        Setting("archive_command", command, False, lambda v: (v or "") == command),
        Setting("max_wal_senders", str(MIN_WAL_SENDERS), True,
                lambda v: (pg_number(v, "s") or 0) >= MIN_WAL_SENDERS),
        Setting("archive_timeout", str(ARCHIVE_TIMEOUT), False, lambda v: (pg_number(v, "s") or 0) > 0),
    ]
    if pg_versions.needs_wal_keep(server_num):
        settings.append(Setting(wal_keep_name(server_num), str(WAL_KEEP_SEGMENTS), False,
                                lambda v: (pg_number(v, "s") or 0) >= WAL_KEEP_SEGMENTS))
    return settings
