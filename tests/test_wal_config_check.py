"""Tests for wal_config_check.evaluate (pure): facts as read_settings returns them -> named checks."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import wal_config_check as wcc  # noqa: E402
from wal_config_check import FAIL, OK, WARN  # noqa: E402

CONF = "/opt/alfresco/alf_data/postgresql/postgresql.conf"


def facts(version=150018, **overrides):
    """Good settings for ``version``; pg_settings returns every value as text."""
    base = {
        "server_version_num": version,
        "wal_level": "replica" if version >= 90600 else "hot_standby",
        "archive_mode": "on",
        "archive_command": "/usr/bin/python3 \"/opt/backup/wal.py\" archive-push \"%p\" \"/backups/pg_wal\"",
        "max_wal_senders": "10",
        "archive_timeout": "300",
        "config_file": CONF,
        "role": "alfresco",
        "rolreplication": True,
        "rolsuper": False,
    }
    base.update(overrides)
    return base


def by_name(checks):
    result = {c.name: c for c in checks}
    assert len(result) == len(checks), "duplicate check names"
    return result


def only_problem(checks, name, status):
    """Assert that ``name`` has ``status`` and every other check is OK; return that check."""
    named = by_name(checks)
    for other, check in named.items():
        if other != name:
            assert check.status == OK, check
    assert named[name].status == status, named[name]
    return named[name]


EXPECTED = ["wal_level", "archive_mode", "archive_command", "max_wal_senders", "replication_privilege",
            "archive_timeout"]


@pytest.mark.parametrize("version", [90426, 90624, 100023, 130018, 150018, 160002])
def test_good_settings_are_all_ok(version):
    checks = wcc.evaluate(facts(version))
    assert [c.name for c in checks] == EXPECTED
    assert all(c.status == OK for c in checks), checks
    assert wcc.failed(checks) == []


@pytest.mark.parametrize("level", ["hot_standby", "archive", "logical"])
def test_94_accepts_its_archiving_levels(level):
    only_problem(wcc.evaluate(facts(90426, wal_level=level)), "wal_level", OK)


def test_94_minimal_fails_naming_hot_standby():
    check = only_problem(wcc.evaluate(facts(90426, wal_level="minimal")), "wal_level", FAIL)
    assert "hot_standby" in check.message and "'minimal'" in check.message
    assert CONF in check.message and "restart" in check.message


def test_94_replica_is_not_a_valid_level():
    # 'replica' arrived in 9.6; a 9.4 server never reports it, and it is no archiving level there.
    only_problem(wcc.evaluate(facts(90426, wal_level="replica")), "wal_level", FAIL)


@pytest.mark.parametrize("level", ["replica", "logical"])
def test_15_accepts_replica_and_logical(level):
    only_problem(wcc.evaluate(facts(150018, wal_level=level)), "wal_level", OK)


@pytest.mark.parametrize("version", [90624, 150018])
def test_modern_minimal_fails_naming_replica(version):
    check = only_problem(wcc.evaluate(facts(version, wal_level="minimal")), "wal_level", FAIL)
    assert "wal_level = replica" in check.message


def test_missing_wal_level_fails():
    settings = facts(150018)
    del settings["wal_level"]
    only_problem(wcc.evaluate(settings), "wal_level", FAIL)


@pytest.mark.parametrize("mode", ["off", None, ""])
def test_archive_mode_off_fails(mode):
    check = only_problem(wcc.evaluate(facts(archive_mode=mode)), "archive_mode", FAIL)
    assert "archive_mode = on" in check.message and CONF in check.message


@pytest.mark.parametrize("mode", ["on", "always"])
def test_archive_mode_on_or_always(mode):
    only_problem(wcc.evaluate(facts(archive_mode=mode)), "archive_mode", OK)


@pytest.mark.parametrize("command", ["", "   ", "(disabled)", None])
def test_archive_command_empty_or_disabled_fails(command):
    check = only_problem(wcc.evaluate(facts(archive_command=command)), "archive_command", FAIL)
    assert "archive_command" in check.message and "wal.py" in check.message and "%p" in check.message


def test_archive_command_check_lists_the_command():
    checks = by_name(wcc.evaluate(facts(archive_command="cp %p /x/%f")))
    assert checks["archive_command"].status == OK and "cp %p /x/%f" in checks["archive_command"].message


@pytest.mark.parametrize("senders", ["0", "2", None])
def test_too_few_wal_senders_fails_naming_3(senders):
    check = only_problem(wcc.evaluate(facts(max_wal_senders=senders)), "max_wal_senders", FAIL)
    assert "max_wal_senders = 3" in check.message
    assert "max_wal_senders is %s" % (senders or "0") in check.message


def test_three_wal_senders_is_enough():
    only_problem(wcc.evaluate(facts(max_wal_senders="3")), "max_wal_senders", OK)


def test_no_replication_no_superuser_fails_with_alter_role():
    check = only_problem(wcc.evaluate(facts(rolreplication=False, rolsuper=False)), "replication_privilege", FAIL)
    assert 'ALTER ROLE "alfresco" REPLICATION' in check.message


def test_superuser_without_replication_flag_is_ok():
    only_problem(wcc.evaluate(facts(rolreplication=False, rolsuper=True)), "replication_privilege", OK)


@pytest.mark.parametrize("timeout", ["0", None])
def test_archive_timeout_zero_is_a_warning(timeout):
    checks = wcc.evaluate(facts(archive_timeout=timeout))
    check = only_problem(checks, "archive_timeout", WARN)
    assert "archive_timeout = 300" in check.message
    assert wcc.failed(checks) == []


def test_default_config_file_name_when_unknown():
    settings = facts(archive_mode="off")
    del settings["config_file"]
    check = by_name(wcc.evaluate(settings))["archive_mode"]
    assert "in postgresql.conf" in check.message


def test_a_stock_94_bundle_fails_every_setting_at_once():
    stock = {"server_version_num": 90426, "wal_level": "minimal", "archive_mode": "off",
             "archive_command": "(disabled)", "max_wal_senders": "0", "archive_timeout": "0",
             "config_file": CONF, "role": "alfresco", "rolreplication": False, "rolsuper": False}
    checks = wcc.evaluate(stock)
    assert [c.name for c in wcc.failed(checks)] == EXPECTED[:5]
    assert by_name(checks)["archive_timeout"].status == WARN


def test_check_repr_names_status():
    assert repr(wcc.Check("x", FAIL, "msg")) == "Check(x, FAIL, msg)"


# ---- wal_switch: may the role switch WAL (what backup.py --check does)? -----------------------------------

def test_no_switch_facts_no_switch_check():
    assert "wal_switch" not in by_name(wcc.evaluate(facts()))


@pytest.mark.parametrize("version,direct,helper,wording", [
    (150018, True, False, "may switch WAL (pg_switch_wal())"),
    (90426, True, False, "may switch WAL (pg_switch_xlog())"),
    (90426, False, True, "may switch WAL through alfresco_backup.switch_wal() (set up by setup.py)"),
])
def test_switch_privilege_ok(version, direct, helper, wording):
    check = by_name(wcc.evaluate(facts(version, switch_direct=direct, switch_helper=helper)))["wal_switch"]
    assert check.status == OK and wording in check.message


def test_switch_privilege_missing_on_15_names_the_grants():
    check = by_name(wcc.evaluate(facts(150018, switch_direct=False, switch_helper=False,
                                       database="alfresco")))["wal_switch"]
    assert check.status == WARN
    assert "it lacks EXECUTE on pg_switch_wal() and pg_create_restore_point(text)" in check.message
    assert check.message.endswith('run: GRANT EXECUTE ON FUNCTION pg_switch_wal() TO "alfresco"; GRANT EXECUTE '
                                  'ON FUNCTION pg_create_restore_point(text) TO "alfresco";')


def test_switch_privilege_missing_on_9_4_names_the_helper_and_setup():
    check = by_name(wcc.evaluate(facts(90426, switch_direct=False, switch_helper=False,
                                       database="alfresco")))["wal_switch"]
    assert check.status == WARN
    assert "on PostgreSQL 9.4 only a superuser may call pg_switch_xlog()" in check.message
    assert "Run setup.py (with PGSUPERUSER), or as a superuser in database alfresco run: CREATE SCHEMA IF NOT " \
           "EXISTS alfresco_backup;" in check.message
    assert 'GRANT EXECUTE ON FUNCTION alfresco_backup.switch_wal() TO "alfresco";' in check.message
