"""The wizard's PostgreSQL steps: WAL settings (5), pg_hba.conf (6), the replication privilege (7).

Settings go through ``ALTER SYSTEM`` when a superuser connection exists, else into postgresql.conf (a copy
of the original kept in setup-backups/ next to the .env, never in the data directory). A step that fails
half-way undoes what it did or says exactly what stays applied.
"""

import os

import pg_versions
import setup_files
import setup_formats
import setup_safefs
import setup_sys
import subprocess_utils
from setup_steps import CHANGED, SKIPPED, UNCHANGED, WOULD
from setup_sys import SetupError

# pg_file_settings says this of a restart-only setting changed in a file: pending, not wrong.
PENDING_RESTART = "setting could not be applied"
SETTING_NAMES = ("wal_level", "archive_mode", "archive_command", "max_wal_senders", "archive_timeout",
                 "wal_keep_segments", "wal_keep_size")


def running_settings(psql):
    """{name: current value of the running server} for SETTING_NAMES (absent names: not on this version)."""
    names = ",".join("'%s'" % n for n in SETTING_NAMES)
    return psql.json("SELECT json_object_agg(name, setting) FROM pg_settings WHERE name IN (%s)" % names) or {}


def configured_settings(ctx):
    """({name: value the configuration files give}, {name: value in postgresql.auto.conf}, notes).

    From pg_file_settings with a superuser on 9.5+, else from postgresql.conf and postgresql.auto.conf read
    directly (needs root or the data directory's owner). Raises SetupError when neither is possible."""
    if ctx.super_psql is not None and pg_versions.has_pg_file_settings(ctx.server_num):
        rows = ctx.super_psql.json("SELECT json_agg(json_build_array(lower(name), setting, sourcefile, error) "
                                   "ORDER BY seqno) FROM pg_file_settings") or []
        values, auto = {}, {}
        for name, setting, source, error in rows:
            if error is None or error == PENDING_RESTART:
                values[name] = setting
                if (source or "").endswith("postgresql.auto.conf"):
                    auto[name] = setting
        return values, auto, []
    conf_text = _read_server_file(ctx, conf_path(ctx))
    auto_text = _read_server_file(ctx, os.path.join(ctx.pgdata, "postgresql.auto.conf"), missing_ok=True) or ""
    values, auto = setup_files.parse_conf(conf_text), setup_files.parse_conf(auto_text)
    notes = []
    if values.get("<include>"):
        notes.append("postgresql.conf includes %s; settings there were not read" % ", ".join(values["<include>"]))
    merged = dict(values)
    merged.update(auto)
    return merged, auto, notes


def conf_path(ctx):
    if ctx.super_psql is not None:
        return ctx.super_psql.run("SHOW config_file").strip()
    return os.path.join(ctx.pgdata, "postgresql.conf")


def _read_server_file(ctx, path, missing_ok=False):
    # A link or a file of another user there is refused (UnsafeFile), never read through the server instead.
    try:
        text = setup_safefs.read_checked(path, {ctx.pg_os_user.uid})
    except setup_safefs.UnsafeFile:
        raise
    except SetupError:
        text = None
        if ctx.super_psql is None:
            raise SetupError("cannot read %s as %s: give a superuser (PGSUPERUSER) or run setup.py with sudo"
                             % (path, setup_sys.me().name))
    if text is None and ctx.super_psql is not None:
        try:
            text = ctx.super_psql.run("SELECT pg_read_file(:'path')", {"path": path}) + "\n"
        except SetupError:
            text = None
    if text is None and not missing_ok:
        raise SetupError("cannot read %s" % path)
    return text


def reload_server(ctx):
    """Make the server re-read its configuration (pg_reload_conf as superuser, else pg_ctl reload as the
    data directory's owner). Raises SetupError."""
    if ctx.super_psql is not None:
        ctx.super_psql.run("SELECT pg_reload_conf()")
        return
    try:
        setup_sys.run_as(ctx.pg_os_user, [os.path.join(ctx.bin_dir, "pg_ctl"), "reload", "-D", ctx.pgdata],
                         timeout=60, what="pg_ctl reload")
    except subprocess_utils.CommandError as exc:
        raise SetupError(str(exc))


def settings_step(ctx):
    """Step 5. Sets ctx.restart_needed when a restart-only setting is not yet in effect."""
    settings = setup_files.desired_settings(ctx.server_num, ctx.archive_command)
    running = running_settings(ctx.user_psql)
    configured, auto, notes = configured_settings(ctx)
    for note in notes:
        ctx.say("  note: " + note)
    changes = {}
    for setting in settings:
        current = configured.get(setting.name, running.get(setting.name))
        if not setting.ok(current):
            changes[setting.name] = setting.value
            ctx.say("  %-16s %r -> %r" % (setting.name, current, setting.value))
    ctx.restart_needed = any(s.restart and not s.ok(running.get(s.name)) for s in settings)
    if not changes:
        ctx.record("postgresql settings", UNCHANGED, "already configured%s" % (
            " (a restart is still needed to use them)" if ctx.restart_needed else ""))
        return
    if ctx.super_psql is not None:
        _alter_system(ctx, changes, auto)
    else:
        _edit_conf(ctx, changes, auto)
    ctx.restart_needed = any(s.restart and not s.ok(running.get(s.name)) for s in settings)


def _alter_system(ctx, changes, auto):
    lines = ["ALTER SYSTEM SET %s = %s;" % (n, setup_files.conf_quote(v)) for n, v in changes.items()]
    if not ctx.decide("APPLY_PG_SETTINGS", lines + ["SELECT pg_reload_conf();"]):
        ctx.record("postgresql settings", WOULD if ctx.dry_run else SKIPPED, " ".join(lines))
        return
    auto_path = os.path.join(ctx.pgdata, "postgresql.auto.conf")
    original = _read_server_file(ctx, auto_path, missing_ok=True)
    if original is not None:
        ctx.auto_conf_copy = (auto_path, ctx.save_copy("postgresql.auto.conf", original), original)
    done = []
    try:
        for name, value in changes.items():
            ctx.super_psql.run("ALTER SYSTEM SET %s = :'value'" % name, {"value": value})
            done.append(name)
            ctx.applied.append("ALTER SYSTEM SET %s = %s" % (name, setup_files.conf_quote(value)))
        reload_server(ctx)
        errors = _file_errors(ctx, list(changes))
        if errors:
            raise SetupError("the server rejects: %s" % "; ".join(errors))
    except SetupError as exc:
        undone = _undo_alter_system(ctx, done, auto)
        raise SetupError("%s\n%s" % (exc, undone))
    ctx.record("postgresql settings", CHANGED, " ".join(lines))


def _file_errors(ctx, names):
    if not pg_versions.has_pg_file_settings(ctx.server_num):
        return []
    rows = ctx.super_psql.json("SELECT json_agg(json_build_array(name, sourcefile, sourceline, error)) FROM "
                               "pg_file_settings WHERE error IS NOT NULL AND error <> :'pending'",
                               {"pending": PENDING_RESTART}) or []
    return ["%s (%s:%s): %s" % tuple(r) for r in rows if r[0] is None or r[0].lower() in names]


def _undo_alter_system(ctx, names, auto):
    undone = []
    try:
        for name in names:
            if name in auto:
                ctx.super_psql.run("ALTER SYSTEM SET %s = :'value'" % name, {"value": auto[name]})
            else:
                ctx.super_psql.run("ALTER SYSTEM RESET %s" % name)
            undone.append(name)
        reload_server(ctx)
        ctx.applied = [a for a in ctx.applied if not any(a.startswith("ALTER SYSTEM SET %s " % n) for n in names)]
        return "undone: %s (the server's configuration is as before)" % (", ".join(undone) or "nothing to undo")
    except SetupError as exc:
        return "could not undo everything (%s); still applied: %s" % (exc, ", ".join(
            n for n in names if n not in undone))


def _edit_conf(ctx, changes, auto):
    path = conf_path(ctx)
    overridden = [n for n in changes if n in auto]
    if overridden:
        raise SetupError("%s set in postgresql.auto.conf (by ALTER SYSTEM) override postgresql.conf: give a "
                         "superuser (PGSUPERUSER) so that setup.py can use ALTER SYSTEM" % ", ".join(overridden))
    text = _read_server_file(ctx, path)
    new_text = setup_files.set_conf(text, changes)
    if not ctx.decide("APPLY_PG_SETTINGS", ["edit %s (a copy goes to %s/setup-backups/%s/), then reload"
                                            % (path, ctx.env_dir, ctx.stamp)],
                      [setup_files.unified_diff(text, new_text, os.path.basename(path))]):
        ctx.record("postgresql settings", WOULD if ctx.dry_run else SKIPPED, path)
        return
    if not ctx.server_path(path):
        raise SetupError("cannot edit %s as %s: run setup.py with sudo or give a superuser" % (
            path, setup_sys.me().name))
    ctx.conf_copy = (path, ctx.save_copy("postgresql.conf", text), text)
    setup_safefs.rewrite_in_place(path, new_text, ctx.pg_os_user.uid)
    ctx.applied.append("edited %s: %s" % (path, ", ".join("%s = %s" % i for i in changes.items())))
    try:
        reload_server(ctx)
    except SetupError as exc:
        setup_safefs.rewrite_in_place(path, text, ctx.pg_os_user.uid)
        ctx.applied.pop()
        raise SetupError("reload failed (%s); %s restored from %s" % (exc, path, ctx.conf_copy[1]))
    ctx.record("postgresql settings", CHANGED, "edited %s" % path)


def hba_step(ctx):
    """Step 6: replication lines for PGUSER in pg_hba.conf, then reload."""
    role = ctx.values["PGUSER"]
    path = ctx.super_psql.run("SHOW hba_file").strip() if ctx.super_psql else os.path.join(ctx.pgdata,
                                                                                            "pg_hba.conf")
    text = _read_server_file(ctx, path)
    new_text, added, method = setup_formats.hba_plan(text, role, ctx.server_num)
    if not added:
        ctx.record("pg_hba.conf", UNCHANGED, "%s already lets %s replicate" % (path, role))
        return
    if not ctx.decide("APPLY_HBA", ["add to %s (method %s, like the file's other lines), then reload:" % (
            path, method)] + added, [setup_files.unified_diff(text, new_text, os.path.basename(path))]):
        ctx.record("pg_hba.conf", WOULD if ctx.dry_run else SKIPPED, "; ".join(added))
        return
    if not ctx.server_path(path):
        raise SetupError("cannot edit %s as %s: run setup.py with sudo, or add these lines yourself and reload:"
                         "\n  %s" % (path, setup_sys.me().name, "\n  ".join(added)))
    copy = ctx.save_copy("pg_hba.conf", text)
    setup_safefs.rewrite_in_place(path, new_text, ctx.pg_os_user.uid)
    try:
        reload_server(ctx)
        errors = _hba_errors(ctx)
        if errors:
            raise SetupError("the server rejects pg_hba.conf: %s" % "; ".join(errors))
    except SetupError as exc:
        setup_safefs.rewrite_in_place(path, text, ctx.pg_os_user.uid)
        try:
            reload_server(ctx)
        except SetupError:
            pass
        raise SetupError("%s\n%s restored from %s; nothing else changed in this step" % (exc, path, copy))
    ctx.applied.append("added to %s: %s" % (path, " | ".join(added)))
    ctx.record("pg_hba.conf", CHANGED, "added %d line(s) to %s" % (len(added), path))


def _hba_errors(ctx):
    if ctx.super_psql is None or not pg_versions.has_hba_file_rules(ctx.server_num):
        return []
    rows = ctx.super_psql.json("SELECT json_agg(json_build_array(line_number, error)) FROM pg_hba_file_rules "
                               "WHERE error IS NOT NULL") or []
    return ["line %s: %s" % tuple(r) for r in rows]


def role_step(ctx):
    """Step 7: REPLICATION for PGUSER and what ``backup.py --check`` needs to switch WAL and create restore
    points: on 10+ EXECUTE on the built-in functions; on 9.x, where only a superuser may call them, the
    narrow SECURITY DEFINER helper of pg_versions.helper_sql (never a superuser role). Verified by reading
    pg_roles and the catalogs afterwards."""
    role = ctx.values["PGUSER"]
    replication, superuser = ctx.user_psql.bool_row(
        "SELECT rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user")
    sql, helper = [], []
    if not (replication or superuser):
        sql.append('ALTER ROLE :"role" REPLICATION')
    if not superuser and pg_versions.switch_needs_superuser(ctx.server_num):
        helper = _helper_statements(ctx, role)
    elif not superuser:
        for function in pg_versions.switch_grants(ctx.server_num):
            (allowed,) = ctx.user_psql.bool_row("SELECT has_function_privilege(current_user, :'f', 'EXECUTE')",
                                                {"f": function})
            if not allowed:
                sql.append('GRANT EXECUTE ON FUNCTION %s TO :"role"' % function)
    if not sql + helper:
        ctx.record("replication privilege", UNCHANGED, "role %s may replicate%s" % (
            role, " and switch WAL through %s" % pg_versions.HELPER_SWITCH if not superuser and
            pg_versions.switch_needs_superuser(ctx.server_num) else ""))
        return
    shown = [s.replace(':"role"', setup_formats.hba_role(role)) + ";" for s in sql + helper]
    if ctx.super_psql is None:
        if ctx.dry_run:
            ctx.record("replication privilege", WOULD, " ".join(shown))
            return
        raise SetupError("role %s needs, as a superuser in database %s: %s (give PGSUPERUSER to let setup.py "
                         "do it)" % (role, ctx.values["PGDATABASE"], " ".join(shown)))
    if not ctx.decide("APPLY_ROLE", ["as superuser %s: %s" % (ctx.super_psql.user, s) for s in shown]):
        ctx.record("replication privilege", WOULD if ctx.dry_run else SKIPPED, " ".join(shown))
        return
    for statement, text in zip(sql, shown):
        ctx.super_psql.run(statement, {"role": role})
        ctx.applied.append(text)
    if helper:
        # One transaction: a failure half-way leaves no function without its REVOKE.
        ctx.super_psql.run("BEGIN;\n%s;\nCOMMIT;" % ";\n".join(helper), {"role": role})
        ctx.applied.append("%s helper functions for %s: %s" % (pg_versions.HELPER_SCHEMA, role, " ".join(
            shown[len(sql):])))
        problems = _helper_problems(ctx, role)
        if problems:
            raise SetupError("the WAL switch helper is still not right after creating it: %s" % "; ".join(problems))
    (replication,) = ctx.super_psql.bool_row("SELECT rolreplication FROM pg_roles WHERE rolname = :'role'",
                                             {"role": role})
    if not (replication or superuser):
        raise SetupError("ALTER ROLE ran but pg_roles.rolreplication is still false for %s" % role)
    ctx.record("replication privilege", CHANGED, " ".join(shown))


def _helper_problems(ctx, role):
    state = ctx.user_psql.json(pg_versions.helper_state_sql()) or {}
    return pg_versions.helper_problems(ctx.server_num, state, role)


def _helper_statements(ctx, role):
    """[] when the 9.x WAL switch helper is in place for ``role``, else the statements that make it (with
    :"role"). Raises SetupError when the schema or a function belongs to a role that is not a superuser:
    replacing someone else's objects is not this wizard's call."""
    problems = _helper_problems(ctx, role)
    if not problems:
        return []
    foreign = [p for p in problems if "not to a superuser" in p or "not SECURITY DEFINER of a superuser" in p]
    if foreign:
        raise SetupError("%s in database %s: drop it (DROP SCHEMA %s CASCADE) or give it to a superuser, then run "
                         "setup.py again" % ("; ".join(foreign), ctx.values["PGDATABASE"], pg_versions.HELPER_SCHEMA))
    return pg_versions.helper_sql(ctx.server_num, ':"role"')
