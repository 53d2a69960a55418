"""Checks the *running* server's WAL settings before a backup.

:func:`read_settings` asks the server (pg_settings, pg_roles); :func:`evaluate` (pure) turns the answers
into named :class:`Check` results. A FAIL names the setting and the line to change.
"""

import pg_versions
import postgres

OK, WARN, FAIL = "OK", "WARN", "FAIL"
MIN_WAL_SENDERS = 3
SETTINGS = ("wal_level", "archive_mode", "archive_command", "max_wal_senders", "archive_timeout",
            "wal_keep_segments", "wal_keep_size", "config_file")


class Check:
    """One named check: ``name``, ``status`` (OK/WARN/FAIL), ``message``."""

    def __init__(self, name, status, message):
        self.name = name
        self.status = status
        self.message = message

    def __repr__(self):
        return "Check(%s, %s, %s)" % (self.name, self.status, self.message)


def read_settings(conn):
    """{'server_version_num': int, settings by name (missing ones absent), 'rolreplication': bool,
    'rolsuper': bool, 'role': str}. Needs only a normal login."""
    facts = {"server_version_num": int(postgres.query(conn, "SHOW server_version_num")[0][0])}
    rows = postgres.query(conn, "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(SETTINGS),))
    facts.update({name: setting for name, setting in rows})
    role = postgres.query(conn, "SELECT rolname, rolreplication, rolsuper FROM pg_roles "
                                "WHERE rolname = current_user")
    facts["role"], facts["rolreplication"], facts["rolsuper"] = role[0] if role else ("?", False, False)
    facts["switch_direct"], facts["switch_helper"] = postgres.query(
        conn, pg_versions.switch_access_sql(facts["server_version_num"]))[0]
    facts["database"] = postgres.query(conn, "SELECT current_database()")[0][0]
    return facts


def switch_check(facts):
    """The wal_switch Check: may the role switch WAL and create restore points (directly, or on 9.x through
    the helper functions setup.py creates)? WARN with the exact fix when not (``--check`` then fails)."""
    num, role = facts["server_version_num"], facts.get("role")
    if facts.get("switch_direct"):
        return Check("wal_switch", OK, "role %s may switch WAL (%s())" % (role, pg_versions.wal_functions(num).switch))
    if facts.get("switch_helper"):
        return Check("wal_switch", OK, "role %s may switch WAL through %s (set up by setup.py)"
                     % (role, pg_versions.HELPER_SWITCH))
    fix = " ".join(s + ";" for s in pg_versions.switch_fix(num, '"%s"' % str(role).replace('"', '""')))
    why = ("on PostgreSQL %s only a superuser may call %s() and pg_create_restore_point(), and the functions "
           "%s and %s that setup.py creates for the backup role are missing or not granted"
           % (pg_versions.major_label(num), pg_versions.wal_functions(num).switch, pg_versions.HELPER_SWITCH,
              pg_versions.HELPER_RESTORE_POINT)) if pg_versions.switch_needs_superuser(num) else \
        "it lacks EXECUTE on %s" % " and ".join(pg_versions.switch_grants(num))
    return Check("wal_switch", WARN, "role %s may not switch WAL or create restore points, so backup.py --check "
                 "cannot test the archive: %s. Run setup.py (with PGSUPERUSER), or as a superuser in database %s "
                 "run: %s" % (role, why, facts.get("database") or "PGDATABASE", fix))


def evaluate(facts):
    """The list of Check results for ``facts`` from :func:`read_settings` (pure)."""
    num = facts["server_version_num"]
    conf = facts.get("config_file") or "postgresql.conf"
    checks = []
    wanted_level = pg_versions.archive_wal_level(num)
    level = facts.get("wal_level")
    if pg_versions.wal_level_ok(num, level):
        checks.append(Check("wal_level", OK, "wal_level = %s" % level))
    else:
        checks.append(Check("wal_level", FAIL, "wal_level is '%s'; set wal_level = %s in %s (or ALTER SYSTEM) "
                            "and restart PostgreSQL" % (level, wanted_level, conf)))
    mode = facts.get("archive_mode")
    if mode in ("on", "always"):
        checks.append(Check("archive_mode", OK, "archive_mode = %s" % mode))
    else:
        checks.append(Check("archive_mode", FAIL, "archive_mode is '%s'; set archive_mode = on in %s and restart "
                            "PostgreSQL" % (mode, conf)))
    command = (facts.get("archive_command") or "").strip()
    if command and command != "(disabled)":
        checks.append(Check("archive_command", OK, "archive_command = %s" % command))
    else:
        checks.append(Check("archive_command", FAIL, "archive_command is not set; set archive_command = "
                            "'/usr/bin/python3 \"/path/to/wal.py\" archive-push \"%%p\" \"<WAL_ARCHIVE_DIR>\"' "
                            "in %s and reload (setup.py does this)" % conf))
    senders = int(facts.get("max_wal_senders") or 0)
    if senders >= MIN_WAL_SENDERS:
        checks.append(Check("max_wal_senders", OK, "max_wal_senders = %d" % senders))
    else:
        checks.append(Check("max_wal_senders", FAIL, "max_wal_senders is %d; set max_wal_senders = %d in %s and "
                            "restart PostgreSQL (a streamed base backup uses two connections)"
                            % (senders, MIN_WAL_SENDERS, conf)))
    if facts.get("rolsuper") or facts.get("rolreplication"):
        checks.append(Check("replication_privilege", OK, "role %s may replicate" % facts.get("role")))
    else:
        checks.append(Check("replication_privilege", FAIL, "role %s may not replicate; run as a superuser: "
                            "ALTER ROLE \"%s\" REPLICATION;" % (facts.get("role"), facts.get("role"))))
    timeout = int(facts.get("archive_timeout") or 0)
    if timeout == 0:
        checks.append(Check("archive_timeout", WARN, "archive_timeout is 0: on a quiet server the current WAL "
                            "segment may stay open for hours and its changes are not in the archive; set "
                            "archive_timeout = 300 (seconds) in %s and reload" % conf))
    else:
        checks.append(Check("archive_timeout", OK, "archive_timeout = %d s" % timeout))
    if "switch_direct" in facts:
        checks.append(switch_check(facts))
    return checks


def failed(checks):
    return [c for c in checks if c.status == FAIL]
