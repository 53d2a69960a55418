"""pg_versions: the per-major rules (pure). The same rules run against real servers of every major in
tests/test_matrix.py; here each rule's edges, and the 9.x WAL switch helper's checks, one by one."""

import pg_versions as v
import pytest

V94, V95, V96, V10, V12, V13, V15, V16, V17, V18 = (90426, 90526, 90624, 100023, 120022, 130018, 150018, 160002,
                                                    170010, 180006)


@pytest.mark.parametrize("num,label,major", [(V94, "9.4", 90400), (V96, "9.6", 90600), (V10, "10", 100000),
                                             (V18, "18", 180000)])
def test_major_labels_round_trip(num, label, major):
    assert v.major_label(num) == label
    assert v.major_from_label(label + "\n") == major == v.major_of(num)


def test_parse_version_num_raises_value_error_without_a_version():
    assert v.parse_version_num("pg_basebackup (PostgreSQL) 9.4.26") == V94
    with pytest.raises(ValueError, match="cannot read a PostgreSQL version"):
        v.parse_version_num("no version here")


def test_names_before_and_from_10():
    assert v.wal_dir(V94) == "pg_xlog" and v.wal_dir(V10) == "pg_wal"
    assert v.wal_functions(V96) == ("pg_switch_xlog", "pg_xlogfile_name", "pg_current_xlog_location")
    assert v.current_wal_file_sql(V10) == "pg_walfile_name(pg_current_wal_lsn())"
    assert v.switch_sql(V94, helper=False) == "SELECT pg_xlogfile_name(pg_switch_xlog())"
    assert v.switch_sql(V94, helper=True) == "SELECT alfresco_backup.switch_wal()"
    assert v.restore_point_sql(False) == "SELECT pg_create_restore_point(%s)"
    assert v.restore_point_sql(True) == "SELECT alfresco_backup.create_restore_point(%s)"


def test_settings_per_major():
    assert [v.archive_wal_level(n) for n in (V94, V95, V96)] == ["hot_standby", "hot_standby", "replica"]
    assert v.wal_level_ok(V94, "archive") and not v.wal_level_ok(V94, "archive", wizard=True)
    assert not v.wal_level_ok(V94, "replica")  # 9.4 does not know the name
    assert v.wal_level_ok(V15, "hot_standby") and not v.wal_level_ok(V15, "minimal")
    assert [v.wal_keep_setting(n) for n in (V94, V12, V13)] == ["wal_keep_segments"] * 2 + ["wal_keep_size"]
    assert v.needs_wal_keep(V96) and not v.needs_wal_keep(V10)
    assert v.wal_segment_bytes("2048", "8kB") == v.wal_segment_bytes("16777216", "B") == 16 * 1024 * 1024


def test_basebackup_rules():
    assert v.basebackup_wal_method(V94) == "fetch" and v.basebackup_wal_method(V10) == "stream"
    assert v.tar_backup_refusal(V94, V10) == "older than the server"
    assert v.tar_backup_refusal(V15, V94) == "too new for tar backups of this server"
    assert v.tar_backup_refusal(V15, V95) is None and v.tar_backup_refusal(V94, V94) is None
    assert v.writes_manifest(V15, V13) and not v.writes_manifest(V15, V12) and not v.writes_manifest(V12, V12)
    assert v.server_compression_possible(V18, V15) and not v.server_compression_possible(V18, 140000)


@pytest.mark.parametrize("tool,backup,fits", [
    (V15, V13, True), (V18, V16, True), (V16, V16, True), (V17, V17, True), (180000, V18, True),
    (V18, V17, False),  # from 17 the tool reads pg_control, whose layout is per major
    (V15, V16, False), (V18, V12, False),  # no manifest before 13
])
def test_verifybackup_fits(tool, backup, fits):
    assert v.verifybackup_fits(tool, backup) is fits


def test_recovery_rules():
    assert v.uses_recovery_conf(110022) and not v.uses_recovery_conf(V12)
    assert v.stop_at_target(V94) == ("pause_at_recovery_target", "false")
    assert v.stop_at_target(V95) == ("recovery_target_action", "promote")
    assert v.supports_lsn_target(V10) and not v.supports_lsn_target(V96)


# ---- the WAL switch privilege ----------------------------------------------------------------------------

def test_from_10_a_grant_is_the_fix_before_10_the_helper():
    assert v.switch_fix(V10, '"alfresco"') == ['GRANT EXECUTE ON FUNCTION pg_switch_wal() TO "alfresco"',
                                               'GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO "alfresco"']
    assert v.switch_grants(V96) == [] and v.switch_needs_superuser(V96) and not v.switch_needs_superuser(V10)
    assert v.switch_fix(V94, '"alfresco"') == v.helper_sql(V94, '"alfresco"')
    assert "rolsuper" in v.switch_access_sql(V94) and "has_function_privilege('pg_switch_wal()'" in \
        v.switch_access_sql(V15)


def test_the_helper_is_narrow():
    statements = v.helper_sql(V94, '"alfresco"')
    functions = [s for s in statements if s.startswith("CREATE OR REPLACE FUNCTION")]
    assert len(functions) == 2
    for statement in functions:
        assert "SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$SELECT pg_catalog." in statement
    assert statements[:3] == ["CREATE SCHEMA IF NOT EXISTS alfresco_backup",
                              "REVOKE ALL ON SCHEMA alfresco_backup FROM PUBLIC",
                              'GRANT USAGE ON SCHEMA alfresco_backup TO "alfresco"']
    for signature in (v.HELPER_SWITCH, v.HELPER_RESTORE_POINT):
        revoke = statements.index("REVOKE ALL ON FUNCTION %s FROM PUBLIC" % signature)
        assert statements[revoke + 1] == 'GRANT EXECUTE ON FUNCTION %s TO "alfresco"' % signature
    assert "pg_xlogfile_name(pg_catalog.pg_switch_xlog())" in " ".join(statements)


def good_state(num=V94):
    functions = {sig: {"owner": "postgres", "owner_super": True, "definer": True, "body": body,
                       "config": ["search_path=pg_catalog, pg_temp"],
                       "acl": ["postgres=X/postgres", "alfresco=X/postgres"]}
                 for sig, body in v.helper_bodies(num).items()}
    return {"schema_owner": "postgres", "schema_owner_super": True,
            "schema_acl": ["postgres=UC/postgres", "alfresco=U/postgres"], "functions": functions}


def test_helper_problems_accepts_what_helper_sql_makes():
    assert v.helper_problems(V94, good_state(), "alfresco") == []


@pytest.mark.parametrize("change,problem", [
    (lambda s: s.update(schema_owner=None), "schema alfresco_backup does not exist"),
    (lambda s: s.update(schema_owner="alfresco", schema_owner_super=False),
     "schema alfresco_backup belongs to alfresco, not to a superuser"),
    (lambda s: s.update(schema_acl=None), "role alfresco may not use schema alfresco_backup"),
    (lambda s: s["functions"].pop(v.HELPER_SWITCH), "function alfresco_backup.switch_wal() does not exist"),
    (lambda s: s["functions"][v.HELPER_SWITCH].update(definer=False), "is not SECURITY DEFINER of a superuser"),
    (lambda s: s["functions"][v.HELPER_SWITCH].update(owner="alfresco", owner_super=False),
     "is not SECURITY DEFINER of a superuser"),
    (lambda s: s["functions"][v.HELPER_SWITCH].update(config=None), "does not pin search_path"),
    (lambda s: s["functions"][v.HELPER_SWITCH].update(body="SELECT 'x'"), "does something else"),
    (lambda s: s["functions"][v.HELPER_SWITCH].update(acl=None), "may also be executed by PUBLIC"),
    (lambda s: s["functions"][v.HELPER_SWITCH]["acl"].append("=X/postgres"), "may also be executed by PUBLIC"),
    (lambda s: s["functions"][v.HELPER_SWITCH]["acl"].append('"Other Role"=X/postgres'),
     "may also be executed by Other Role"),
    (lambda s: s["functions"][v.HELPER_SWITCH].update(acl=["postgres=X/postgres"]),
     "role alfresco may not execute alfresco_backup.switch_wal()"),
])
def test_helper_problems_names_each_deviation(change, problem):
    state = good_state()
    change(state)
    problems = v.helper_problems(V94, state, "alfresco")
    assert any(problem in p for p in problems), problems


def test_a_10_body_on_a_9_server_is_something_else():
    state = good_state(V10)
    assert any("does something else" in p for p in v.helper_problems(V94, state, "alfresco"))


def test_the_readme_shows_the_helper_sql_the_wizard_runs():
    import os

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as handle:
        readme = handle.read()
    block = "\n".join(s + ";" for s in v.helper_sql(90400, "alfresco"))
    assert "```sql\n%s\n```" % block in readme
