"""Pure text rules for the set-up wizard, part 2: pg_hba.conf lines, the crontab entry, and the install's
alfresco-global.properties. No disk access, no programs run (unit-tested in tests/test_setup.py).
"""

import re

import pg_versions
from setup_files import MARKER, TextError

PASSWORD_METHODS = ("scram-sha-256", "md5", "password")


# ---- pg_hba.conf ----------------------------------------------------------------------------------------
def _hba_fields(line):
    fields, current, quoted = [], "", False
    for char in line:
        if char == '"':
            quoted = not quoted
            current += char
        elif char == "#" and not quoted:
            break
        elif char.isspace() and not quoted:
            if current:
                fields.append(current)
            current = ""
        else:
            current += char
    if current:
        fields.append(current)
    return fields


def parse_hba(text):
    """[(line index, fields)] for the active lines of pg_hba.conf (comments and blank lines skipped)."""
    result = []
    for number, line in enumerate(text.splitlines()):
        fields = _hba_fields(line)
        if fields:
            result.append((number, fields))
    return result


def _record(fields):
    """(type, databases, users, address or None, method) of a parsed hba line, or None."""
    kind = fields[0]
    if kind == "local" and len(fields) >= 4:
        return kind, fields[1].split(","), fields[2].split(","), None, fields[3]
    if kind.startswith("host") and len(fields) >= 5:
        address, method_at = fields[3], 4
        if "/" not in address and len(fields) >= 6 and re.match(r"^[0-9.]+$", fields[4]):
            address, method_at = address + "/" + fields[4], 5  # address + netmask form
        return kind, fields[1].split(","), fields[2].split(","), address, fields[method_at]
    return None


def hba_method(text, server_num):
    """The password method to use for new lines: the one the file's lines already use (scram-sha-256
    before md5 before password); when none uses a password, scram-sha-256 from 10, else md5. Never trust."""
    methods = [rec[4] for rec in (_record(f) for _n, f in parse_hba(text)) if rec]
    for method in PASSWORD_METHODS:
        if method in methods:
            return method
    return pg_versions.new_hba_password_method(server_num)


def hba_role(role):
    """A role name as pg_hba.conf needs it (double-quoted unless plain lower-case)."""
    if re.match(r"^[a-z_][a-z0-9_]*$", role):
        return role
    if '"' in role:
        raise TextError("a role name with a double quote cannot be written to pg_hba.conf: %r" % role)
    return '"%s"' % role


def _covers(record, kind, address, role):
    rtype, dbs, users, raddr, method = record
    if "replication" not in dbs or method == "reject":
        return False
    if not (role in users or hba_role(role) in users or "all" in users):
        return False
    if kind == "local":
        return rtype == "local"
    return rtype in ("host", "hostssl", "hostnossl") and raddr in (address, "all", "samehost")


def hba_plan(text, role, server_num):
    """(new text, [added lines], method): replication lines for ``role`` over the Unix socket, 127.0.0.1/32
    and ::1/128, each only when no line already allows it. They go before the first existing replication
    line (the first matching line wins), else at the end, under a MARKER comment. Never a trust line."""
    method = hba_method(text, server_num)
    if method not in PASSWORD_METHODS:
        raise TextError("refusing to write pg_hba.conf method %r" % method)
    records = [(n, _record(f)) for n, f in parse_hba(text)]
    records = [(n, r) for n, r in records if r]
    who = hba_role(role)
    wanted = [("local", None, "local\treplication\t%s\t\t\t%s" % (who, method)),
              ("host", "127.0.0.1/32", "host\treplication\t%s\t127.0.0.1/32\t\t%s" % (who, method)),
              ("host", "::1/128", "host\treplication\t%s\t::1/128\t\t\t%s" % (who, method))]
    added = [line for kind, addr, line in wanted if not any(_covers(r, kind, addr, role) for _n, r in records)]
    if not added:
        return text, [], method
    lines = text.splitlines()
    block = ["# %s: replication for the backup role %s (pg_basebackup)" % (MARKER, who)] + added
    first_repl = [n for n, r in records if "replication" in r[1]]
    if first_repl:
        lines[first_repl[0]:first_repl[0]] = block
    else:
        if lines and lines[-1].strip():
            lines.append("")
        lines.extend(block)
    return "\n".join(lines) + "\n", added, method


# ---- crontab --------------------------------------------------------------------------------------------
_CRON_FIELD = r"[0-9A-Za-z*/,\-]+"
_CRON_RE = re.compile(r"^(@(reboot|yearly|annually|monthly|weekly|daily|midnight|hourly)|(%s\s+){4}%s)$"
                      % (_CRON_FIELD, _CRON_FIELD))


def valid_schedule(schedule):
    """True for a five-field cron schedule ('0 2 * * *') or an @daily-style nickname."""
    return bool(_CRON_RE.match(schedule.strip()))


def _sh(text):
    return "'" + text.replace("'", "'\\''") + "'"


sh_quote = _sh


def cron_escape(command):
    """``command`` as a crontab line must hold it: cron turns an unescaped ``%`` into a newline (the rest
    becomes the command's stdin) and ``\\%`` into ``%``. Raises TextError for what a crontab line cannot
    hold: a line break, or a backslash right before a ``%`` (cron would eat that backslash)."""
    if "\n" in command or "\r" in command:
        raise TextError("a line break cannot be part of a cron command: %r" % command)
    if "\\%" in command:
        raise TextError("a backslash before %% cannot be part of a cron command: %r" % command)
    return command.replace("%", "\\%")


def cron_runs(line):
    """(command, stdin) cron makes of a crontab ``line`` (five time fields or an @nickname, then the
    command): a backslash pairs with the next character, a ``\\%`` pair becomes ``%`` and any other pair stays
    as it is; the first unpaired ``%`` ends the command and the rest, its ``%`` turned into newlines, is the
    command's stdin (cron's own rule, as in cronie and Vixie cron)."""
    fields = line.strip().split(None, 1 if line.strip().startswith("@") else 5)
    text, out, at = fields[-1] if len(fields) > 1 else "", [], 0
    while at < len(text):
        if text[at] == "\\" and at + 1 < len(text):
            out.append("%" if text[at + 1] == "%" else text[at:at + 2])
            at += 2
        elif text[at] == "%":
            return "".join(out), text[at + 1:].replace("%", "\n")
        else:
            out.append(text[at])
            at += 1
    return "".join(out), ""


def cron_entry(schedule, project_dir, python, env_path, log_dir):
    """(marker line, command line) for the nightly run; the log file name carries the date. Every ``%``
    (the date format's, and any in a path) is escaped for cron. Raises TextError for a path a crontab line
    cannot hold (see cron_escape)."""
    for path in (project_dir, python, env_path, log_dir):
        cron_escape(path)
    command = "cd %s && %s backup.py --env %s >> %s/cron-$(date +%%Y-%%m-%%d).log 2>&1" % (
        _sh(project_dir), _sh(python), _sh(env_path), _sh(log_dir))
    line = "%s %s" % (" ".join(schedule.split()), cron_escape(command))
    if cron_runs(line) != (command, ""):
        raise TextError("cron would not read this entry back as written: %r" % line)
    return "# %s --env %s" % (MARKER, env_path), line


def offsite_cron_entry(project_dir, python, env_path, log_dir):
    """(marker line, command line) for ``backup.py --offsite`` every 5 minutes (new WAL and backups go
    off-site; it exits at once when there is nothing to send). Its own dated log, ``%`` escaped."""
    command = "cd %s && %s backup.py --env %s --offsite >> %s/offsite-$(date +\\%%Y-\\%%m-\\%%d).log 2>&1" % (
        _sh(project_dir), _sh(python), _sh(env_path), _sh(log_dir))
    return "# %s --offsite --env %s" % (MARKER, env_path), "*/5 * * * * %s" % command


def merge_crontab(text, marker, entry):
    """(new text, note) with ``entry`` on the line after ``marker`` (replacing the one there), or both
    appended. A line without our marker that already runs backup.py with this .env is left alone and no
    second one is added (note says so). Nothing else is touched."""
    lines = text.splitlines()
    if marker in lines:
        at = lines.index(marker)
        if at + 1 < len(lines) and not lines[at + 1].lstrip().startswith("#") and lines[at + 1].strip():
            lines[at + 1] = entry
        else:
            lines.insert(at + 1, entry)
        return "\n".join(lines) + "\n", None
    env_arg = marker.split(" --env ", 1)[1]
    for line in lines:
        if not line.lstrip().startswith("#") and "backup.py" in line and env_arg in line and (
                ("--offsite" in line) == ("--offsite" in entry)):
            return text, "an entry for this .env already exists (not made by setup.py), left as it is: %s" % line
    if lines and lines[-1].strip():
        lines.append("")
    lines += [marker, entry]
    return "\n".join(lines) + "\n", None


# ---- alfresco-global.properties -------------------------------------------------------------------------
def parse_properties(text):
    """{key: value} of a Java .properties text (continuations, ``=``/``:``/space separators, escapes),
    with ${other.key} references resolved from the same file."""
    values, logical, pending = {}, [], ""
    for raw in text.splitlines():
        line = pending + raw.lstrip() if pending else raw.lstrip()
        if not pending and (not line or line[0] in "#!"):
            continue
        if (len(line) - len(line.rstrip("\\"))) % 2 == 1:
            pending = line[:-1]
            continue
        pending = ""
        logical.append(line)
    if pending:
        logical.append(pending)
    for line in logical:
        match = re.match(r"^((?:\\.|[^=:\s\\])+)\s*[=:\s]?\s*(.*)$", line)
        if match:
            values[_unescape(match.group(1))] = _unescape(match.group(2))
    for key, value in values.items():
        for _ in range(5):  # nested references, bounded
            new = re.sub(r"\$\{([^}]+)\}", lambda m: values.get(m.group(1), m.group(0)), value)
            if new == value:
                break
            value = new
        values[key] = value
    return values


def _unescape(text):
    text = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)
    return re.sub(r"\\(.)", lambda m: {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}.get(m.group(1), m.group(1)),
                  text)


def parse_jdbc_url(url):
    """{'host', 'port', 'database'} from jdbc:postgresql://host[:port]/db[?...] (missing parts absent)."""
    match = re.match(r"^jdbc:postgresql://(\[[^\]]+\]|[^:/?]*)(?::(\d+))?(?:/([^?;]*))?", (url or "").strip())
    if not match:
        return {}
    result = {}
    if match.group(1):
        result["host"] = match.group(1).strip("[]")
    if match.group(2):
        result["port"] = match.group(2)
    if match.group(3):
        result["database"] = match.group(3)
    return result
