"""What differs between PostgreSQL majors, in one place (standard library only, pure).

Versions are ``server_version_num`` integers: 90426 is 9.4.26, 100023 is 10.23, 180006 is 18.6. Every rule
below takes one (or a client's and a server's) and answers without talking to anything; the callers
(postgres, base_backup, wal_config_check, status, setup_files, setup_formats, setup_pg, restore_settings,
restore_db, restore_full) ask here instead of comparing numbers themselves.

The oldest supported major is 9.4, the one Alfresco 5.2 bundles. Differences covered:

- names: ``pg_xlog``/``pg_switch_xlog()``/``pg_xlogfile_name()``/``pg_current_xlog_location()`` before 10,
  ``pg_wal``/``pg_switch_wal()``/``pg_walfile_name()``/``pg_current_wal_lsn()`` from 10; from 17
  ``pg_walfile_name()`` of a segment boundary names the next segment (before: the one that ends there),
  so a WAL switch is always preceded by a record of ours (a restore point): never a no-op switch, whose
  boundary result would name a segment that is not complete;
- settings: ``wal_level`` hot_standby before 9.6 (replica from 9.6); ``wal_keep_segments`` up to 12,
  ``wal_keep_size`` from 13 (each refuses the other name); pg_file_settings from 9.5, pg_hba_file_rules from 10;
- pg_basebackup: ``-X fetch`` for tar before 10 (stream from 10); ``--compress=METHOD`` and server-side
  compression from 15; a 15+ client cannot take tar backups of a server older than 9.5; backup_manifest
  from 13 on both ends; pg_verifybackup of another major only for backups before 17;
- recovery: ``recovery.conf`` before 12 (renamed ``recovery.done`` when recovery ends), ``recovery.signal``
  from 12; ``pause_at_recovery_target`` on 9.4, ``recovery_target_action`` from 9.5; LSN targets from 10;
- the WAL-switch privilege: before 10, ``pg_switch_xlog()`` and ``pg_create_restore_point()`` check for a
  superuser themselves and no GRANT helps, so ``setup.py`` (which has a superuser) creates two SECURITY
  DEFINER functions for the backup role in the schema :data:`HELPER_SCHEMA` (:func:`helper_sql`); from 10 a
  GRANT EXECUTE on the built-in functions is enough (:func:`switch_grants`).
"""

import collections
import re

OLDEST_SUPPORTED = 90400
MIN_TAR_SERVER_FOR_NEW_CLIENT = 90500  # a 15+ pg_basebackup cannot take tar backups of 9.4


# ---- version numbers ------------------------------------------------------------------------------------

def parse_version_num(text):
    """'pg_basebackup (PostgreSQL) 15.18 (Debian ...)' -> 150018; '9.4.26' -> 90426; '16devel' -> 160000.
    Raises ValueError when ``text`` holds no version."""
    match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?(?:\.(\d+))?", text) or \
        re.search(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", text)
    if not match:
        raise ValueError("cannot read a PostgreSQL version from %r" % text.strip())
    major, second, third = int(match.group(1)), int(match.group(2) or 0), int(match.group(3) or 0)
    if major >= 10:
        return major * 10000 + second
    return major * 10000 + second * 100 + third


def version_label(num):
    """150018 -> '15.18', 90426 -> '9.4.26'."""
    if num >= 100000:
        return "%d.%d" % (num // 10000, num % 10000)
    return "%d.%d.%d" % (num // 10000, num // 100 % 100, num % 100)


def major_of(num):
    """150018 -> 150000, 90426 -> 90400: what version checks compare."""
    return num // 10000 * 10000 if num >= 100000 else num // 100 * 100


def major_label(num):
    """150018 -> '15', 90426 -> '9.4' (the name of a major, as in /usr/lib/postgresql/<major>)."""
    if num >= 100000:
        return str(num // 10000)
    return "%d.%d" % (num // 10000, num // 100 % 100)


def major_from_label(text):
    """'9.4' -> 90400, '15' -> 150000 (a PG_VERSION file's contents). Raises ValueError."""
    parts = text.strip().split(".")
    return int(parts[0]) * 10000 + (int(parts[1]) * 100 if len(parts) > 1 and int(parts[0]) < 10 else 0)


# ---- WAL names and settings -----------------------------------------------------------------------------

WalFunctions = collections.namedtuple("WalFunctions", "switch file_name current_lsn")


def wal_dir(num):
    """'pg_wal' from 10 on, 'pg_xlog' before."""
    return "pg_wal" if num >= 100000 else "pg_xlog"


def wal_functions(num):
    """WalFunctions(switch, file_name, current_lsn): the built-in functions' names on this major."""
    if num >= 100000:
        return WalFunctions("pg_switch_wal", "pg_walfile_name", "pg_current_wal_lsn")
    return WalFunctions("pg_switch_xlog", "pg_xlogfile_name", "pg_current_xlog_location")


def current_wal_file_sql(num):
    """An expression giving the name of the WAL segment being written now."""
    functions = wal_functions(num)
    return "%s(%s())" % (functions.file_name, functions.current_lsn)


def archive_wal_level(num):
    """The wal_level to write for archiving: replica from 9.6, hot_standby before (9.4/9.5 know no replica)."""
    return "replica" if num >= 90600 else "hot_standby"


def wal_level_ok(num, level, wizard=False):
    """True when ``level`` (a running server's wal_level) is enough for archiving and base backups. 9.6+
    still accepts the old names archive and hot_standby (as aliases of replica). Before 9.6 the wizard
    (``wizard=True``) still raises archive to hot_standby, which a restored copy needs to answer queries
    while it recovers; the nightly check accepts archive."""
    level = (level or "").lower()
    if num >= 90600:
        return level in ("replica", "logical", "archive", "hot_standby")
    return level in (("hot_standby", "logical") if wizard else ("archive", "hot_standby", "logical"))


def wal_keep_setting(num):
    """The keep-WAL setting's name: wal_keep_segments up to 12, wal_keep_size from 13."""
    return "wal_keep_size" if num >= 130000 else "wal_keep_segments"


def needs_wal_keep(num):
    """True before 10: tar base backups fetch their WAL from pg_xlog at the end (no streaming, no slot)."""
    return num < 100000


def has_pg_file_settings(num):
    return num >= 90500


def has_hba_file_rules(num):
    return num >= 100000


def new_hba_password_method(num):
    """The method for a new pg_hba.conf line when the file shows none: scram-sha-256 from 10, md5 before."""
    return "scram-sha-256" if num >= 100000 else "md5"


def wal_segment_bytes(setting, unit):
    """wal_segment_size in bytes from pg_settings' (setting, unit): up to 10 it is given in 8 kB blocks."""
    size = int(setting)
    return size * 8192 if unit == "8kB" else size


# ---- pg_basebackup ----------------------------------------------------------------------------------------

def basebackup_wal_method(client_num):
    """'stream' from a 10 client (tar + stream works), else 'fetch' (stream is plain-format only before 10)."""
    return "stream" if client_num >= 100000 else "fetch"


def tar_backup_refusal(client_num, server_num):
    """Why this client cannot take a tar backup of this server, or None."""
    if major_of(client_num) < major_of(server_num):
        return "older than the server"
    if client_num >= 150000 and server_num < MIN_TAR_SERVER_FOR_NEW_CLIENT:
        return "too new for tar backups of this server"
    return None


def compress_syntax_new(client_num):
    """True for a 15+ client: --compress=[client-|server-]METHOD[:level=N] and zstd/lz4."""
    return client_num >= 150000


def server_compression_possible(client_num, server_num):
    return client_num >= 150000 and server_num >= 150000


def writes_manifest(client_num, server_num):
    """True when pg_basebackup writes backup_manifest (13+ on both ends)."""
    return client_num >= 130000 and server_num >= 130000


def backup_has_manifest(server_num):
    """True when a backup of this server can carry a manifest that pg_verifybackup checks (13+)."""
    return server_num >= 130000


def verifybackup_fits(tool_num, backup_num):
    """True when pg_verifybackup ``tool_num`` can check a backup of server ``backup_num``: its own major, or a
    newer tool for backups before 17. From 17 the manifest (version 2) names the system identifier, so the
    tool reads the backup's pg_control, whose layout is per major: 18's tool says "pg_control: CRC is
    incorrect" on a 17 backup (found by the version matrix)."""
    if not backup_has_manifest(backup_num):
        return False
    if major_of(tool_num) == major_of(backup_num):
        return True
    return backup_num < 170000 and tool_num > backup_num


# ---- recovery ---------------------------------------------------------------------------------------------

def uses_recovery_conf(num):
    """True before 12: recovery.conf (renamed recovery.done at the end); from 12 recovery.signal."""
    return num < 120000


def stop_at_target(num):
    """(name, value) that makes recovery end (promote) at its target instead of pausing."""
    return ("pause_at_recovery_target", "false") if num < 90500 else ("recovery_target_action", "promote")


def supports_lsn_target(num):
    return num >= 100000


# ---- the WAL switch privilege (backup.py --check) ---------------------------------------------------------

HELPER_SCHEMA = "alfresco_backup"
HELPER_SWITCH = HELPER_SCHEMA + ".switch_wal()"
HELPER_RESTORE_POINT = HELPER_SCHEMA + ".create_restore_point(text)"
PINNED_SEARCH_PATH = "pg_catalog, pg_temp"


def switch_needs_superuser(num):
    """True before 10: pg_switch_xlog() and pg_create_restore_point() refuse every non-superuser."""
    return num < 100000


def switch_grants(num):
    """Built-in functions a non-superuser needs EXECUTE on to switch WAL and create restore points (10+);
    [] before 10, where a grant does not help."""
    return [] if switch_needs_superuser(num) else ["pg_switch_wal()", "pg_create_restore_point(text)"]


def switch_access_sql(num):
    """One row (direct, helper): may the current role call the built-ins, may it call the helper functions.
    Runs as the backup role on 9.4+ (to_regprocedure is 9.4+)."""
    if switch_needs_superuser(num):
        direct = "(SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)"
    else:
        direct = " AND ".join("has_function_privilege('%s', 'EXECUTE')" % f for f in switch_grants(num))
    helper = " AND ".join("coalesce(has_function_privilege(to_regprocedure('%s'), 'EXECUTE'), false)" % f
                          for f in (HELPER_SWITCH, HELPER_RESTORE_POINT))
    schema = "coalesce((SELECT has_schema_privilege(oid, 'USAGE') FROM pg_catalog.pg_namespace WHERE nspname = " \
             "'%s'), false)" % HELPER_SCHEMA
    return "SELECT %s, %s AND %s" % (direct, schema, helper)


def switch_fix(num, role_ident):
    """The statements a superuser runs so that role ``role_ident`` may switch WAL and create restore points."""
    if switch_needs_superuser(num):
        return helper_sql(num, role_ident)
    return ["GRANT EXECUTE ON FUNCTION %s TO %s" % (f, role_ident) for f in switch_grants(num)]


def switch_sql(num, helper):
    """SQL returning the name of the segment a WAL switch closed (built-ins, or the helper when ``helper``)."""
    if helper:
        return "SELECT %s.switch_wal()" % HELPER_SCHEMA
    functions = wal_functions(num)
    return "SELECT %s(%s())" % (functions.file_name, functions.switch)


def restore_point_sql(helper):
    """SQL creating a named restore point; the label goes as its one parameter (``%s``)."""
    return "SELECT %s" % ("%s.create_restore_point(%%s)" % HELPER_SCHEMA if helper else "pg_create_restore_point(%s)")


def helper_bodies(num):
    """{function signature: SQL body} of the helper functions (fully qualified names only)."""
    functions = wal_functions(num)
    return {
        HELPER_SWITCH: "SELECT pg_catalog.%s(pg_catalog.%s())::text" % (functions.file_name, functions.switch),
        HELPER_RESTORE_POINT: "SELECT pg_catalog.pg_create_restore_point($1)::text",
    }


def helper_sql(num, role_ident):
    """Statements (as the superuser that will own them) giving ``role_ident`` (an SQL identifier, quoted as
    needed) exactly the WAL switch and restore point: SECURITY DEFINER functions with search_path pinned,
    in a schema of their own, EXECUTE revoked from PUBLIC and granted to that role only."""
    statements = ["CREATE SCHEMA IF NOT EXISTS %s" % HELPER_SCHEMA,
                  "REVOKE ALL ON SCHEMA %s FROM PUBLIC" % HELPER_SCHEMA,
                  "GRANT USAGE ON SCHEMA %s TO %s" % (HELPER_SCHEMA, role_ident)]
    for signature, body in sorted(helper_bodies(num).items()):
        name, args = signature.split("(", 1)
        params = "label text" if args.rstrip(")") else ""
        statements += [
            "CREATE OR REPLACE FUNCTION %s(%s) RETURNS text LANGUAGE sql VOLATILE STRICT SECURITY DEFINER "
            "SET search_path = %s AS $fn$%s$fn$" % (name, params, PINNED_SEARCH_PATH, body),
            "REVOKE ALL ON FUNCTION %s FROM PUBLIC" % signature,
            "GRANT EXECUTE ON FUNCTION %s TO %s" % (signature, role_ident)]
    return statements


def helper_state_sql():
    """One row of JSON describing the helper schema and its functions as they are (see :func:`helper_problems`);
    null fields when absent. The catalogs it reads are readable by every role."""
    signature = "n.nspname || '.' || p.proname || '(' || pg_catalog.oidvectortypes(p.proargtypes) || ')'"
    return (
        "SELECT json_build_object("
        "'schema_owner', (SELECT pg_catalog.pg_get_userbyid(nspowner) FROM pg_catalog.pg_namespace WHERE "
        "nspname = '%(schema)s'), "
        "'schema_acl', (SELECT nspacl::text[] FROM pg_catalog.pg_namespace WHERE nspname = '%(schema)s'), "
        "'schema_owner_super', (SELECT r.rolsuper FROM pg_catalog.pg_namespace n JOIN pg_catalog.pg_roles r ON "
        "r.oid = n.nspowner WHERE n.nspname = '%(schema)s'), "
        "'functions', (SELECT json_object_agg(%(signature)s, json_build_object('owner', r.rolname, "
        "'owner_super', r.rolsuper, 'definer', p.prosecdef, 'config', p.proconfig, 'body', p.prosrc, "
        "'acl', p.proacl::text[])) FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON "
        "n.oid = p.pronamespace JOIN pg_catalog.pg_roles r ON r.oid = p.proowner WHERE n.nspname = '%(schema)s'))"
        % {"schema": HELPER_SCHEMA, "signature": signature})


def helper_problems(num, state, role):
    """What is missing or wrong in the helper ``state`` (from :func:`helper_state_sql`) for ``role``:
    a list of reasons, [] when the helper is in place and as narrow as :func:`helper_sql` makes it."""
    problems = []
    if state.get("schema_owner") is None:
        return ["schema %s does not exist" % HELPER_SCHEMA]
    if not state.get("schema_owner_super"):
        problems.append("schema %s belongs to %s, not to a superuser" % (HELPER_SCHEMA, state["schema_owner"]))
    if role not in _acl_grantees(state.get("schema_acl"), "U", public_default=False):
        problems.append("role %s may not use schema %s" % (role, HELPER_SCHEMA))
    found = state.get("functions") or {}
    for signature, body in sorted(helper_bodies(num).items()):
        function = found.get(signature)
        if function is None:
            problems.append("function %s does not exist" % signature)
            continue
        if not (function.get("owner_super") and function.get("definer")):
            problems.append("function %s is not SECURITY DEFINER of a superuser" % signature)
        if function.get("config") != ["search_path=%s" % PINNED_SEARCH_PATH]:
            problems.append("function %s does not pin search_path" % signature)
        if (function.get("body") or "").strip() != body:
            problems.append("function %s does something else" % signature)
        grantees = sorted(_acl_grantees(function.get("acl"), "X") - {function.get("owner")})
        if role not in grantees:
            problems.append("role %s may not execute %s" % (role, signature))
        others = [g or "PUBLIC" for g in grantees if g != role]
        if others:
            problems.append("function %s may also be executed by %s" % (signature, ", ".join(others)))
    return problems


def _acl_grantees(acl, privilege, public_default=True):
    """Roles holding ``privilege`` ('X' execute, 'U' usage) in an aclitem[] as text ('' is PUBLIC). None is
    the default ACL: functions are executable by PUBLIC, schemas usable by their owner only."""
    if acl is None:
        return {""} if public_default else set()
    grantees = set()
    for item in acl:
        match = ACL_ITEM.match(item)
        if match and privilege in match.group(2):
            grantee = match.group(1)
            grantees.add(grantee[1:-1].replace('""', '"') if grantee.startswith('"') else grantee)
    return grantees


ACL_ITEM = re.compile(r'^("(?:[^"]|"")*"|[^=]*)=([^/]*)/')
