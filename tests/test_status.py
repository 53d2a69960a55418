"""Tests for status.assess (pure): collected facts -> OK / WARNING / CRITICAL with reasons and window."""

import datetime
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import status  # noqa: E402
from status import STATE_CRITICAL, STATE_OK, STATE_WARNING  # noqa: E402

NOW = datetime.datetime(2024, 2, 1, 8, 0, 0, tzinfo=datetime.timezone.utc)
LIMIT_BACKUP, LIMIT_WAL = 26, 26


def ago(hours):
    return (NOW - datetime.timedelta(hours=hours)).isoformat()


def kind_facts(newest_hours=6.0, oldest_hours=150.0, kind="base"):
    return {"done_count": 7, "total_count": 7,
            "newest": "%s-2024-02-01_02-00-00" % kind, "newest_ended_at": ago(newest_hours),
            "newest_size_bytes": 1000, "oldest": "%s-2024-01-26_02-00-00" % kind,
            "oldest_ended_at": ago(oldest_hours), "oldest_start_wal_file": "000000010000000000000002",
            "wal_segment_size": 16777216}


def healthy():
    return {
        "backups": {"postgres": kind_facts(), "contentstore": kind_facts(kind="contentstore"),
                    "config": kind_facts(kind="config")},
        "archiver": {"archived_count": 120, "last_archived_wal": "000000010000000000000078",
                     "last_archived_time": ago(0.5), "failed_count": 0, "last_failed_wal": None,
                     "last_failed_time": None},
        "archiver_error": None,
        "backlog": 0,
        "archive_dir": "/backups/pg_wal",
        "archive_segments": 119,
        "newest_segment_at": ago(0.5),
        "chain": {"ok": True, "first": "000000010000000000000002", "last": "000000010000000000000078",
                  "gaps": [], "segments": 119},
    }


def assess(facts):
    return status.assess(facts, NOW, LIMIT_BACKUP, LIMIT_WAL)


def test_healthy_is_ok_with_window():
    state, reasons, window = assess(healthy())
    assert (state, reasons) == (STATE_OK, [])
    assert window == {"from": ago(150.0), "to": ago(0.5)}


@pytest.mark.parametrize("kind", ["postgres", "contentstore"])
def test_no_complete_backup_is_critical(kind):
    facts = healthy()
    facts["backups"][kind].update(newest=None, newest_ended_at=None, oldest=None, oldest_ended_at=None,
                                  done_count=0)
    state, reasons, _ = assess(facts)
    assert state == STATE_CRITICAL
    assert reasons == ["CRITICAL: no complete %s backup" % kind]


def test_missing_config_backup_is_not_assessed():
    facts = healthy()
    facts["backups"]["config"].update(newest=None, newest_ended_at=None)
    assert assess(facts)[0] == STATE_OK


@pytest.mark.parametrize("kind", ["postgres", "contentstore"])
def test_old_backup_is_critical(kind):
    facts = healthy()
    facts["backups"][kind]["newest_ended_at"] = ago(30)
    state, reasons, _ = assess(facts)
    assert state == STATE_CRITICAL
    assert len(reasons) == 1 and kind in reasons[0] and "30.0 h old (limit 26 h)" in reasons[0]


def test_backup_just_under_the_limit_is_ok():
    facts = healthy()
    facts["backups"]["postgres"]["newest_ended_at"] = ago(25.9)
    assert assess(facts)[0] == STATE_OK


def test_archiver_error_is_critical():
    facts = healthy()
    facts["archiver"], facts["archiver_error"] = None, "cannot connect to PostgreSQL"
    state, reasons, _ = assess(facts)
    assert state == STATE_CRITICAL
    assert reasons == ["CRITICAL: cannot read pg_stat_archiver: cannot connect to PostgreSQL"]


def test_archive_command_failing_now_is_critical():
    facts = healthy()
    facts["archiver"].update(failed_count=3, last_failed_wal="000000010000000000000079",
                             last_failed_time=ago(0.1))
    state, reasons, _ = assess(facts)
    assert state == STATE_CRITICAL
    assert "archive_command is failing" in reasons[0] and "000000010000000000000079" in reasons[0]


def test_archive_command_failing_without_any_success_is_critical():
    facts = healthy()
    facts["archiver"].update(last_archived_wal=None, last_archived_time=None, failed_count=1,
                             last_failed_wal="000000010000000000000001", last_failed_time=ago(2))
    assert assess(facts)[0] == STATE_CRITICAL


def test_old_failure_followed_by_success_is_ok():
    facts = healthy()
    facts["archiver"].update(failed_count=3, last_failed_wal="000000010000000000000010",
                             last_failed_time=ago(40))
    assert assess(facts)[0] == STATE_OK


def test_no_archiver_facts_and_no_error_is_not_judged():
    facts = healthy()
    facts["archiver"] = None
    assert assess(facts)[0] == STATE_OK


def test_empty_wal_archive_is_critical():
    facts = healthy()
    facts["newest_segment_at"], facts["archive_segments"] = None, 0
    state, reasons, window = assess(facts)
    assert state == STATE_CRITICAL
    assert reasons == ["CRITICAL: the WAL archive /backups/pg_wal holds no segment"]


def test_old_wal_is_a_warning():
    facts = healthy()
    facts["newest_segment_at"] = ago(27)
    state, reasons, _ = assess(facts)
    assert state == STATE_WARNING
    assert reasons == ["WARNING: newest archived WAL segment is 27.0 h old (limit 26 h)"]


@pytest.mark.parametrize("backlog,expected", [(None, STATE_OK), (9, STATE_OK), (10, STATE_WARNING),
                                              (500, STATE_WARNING)])
def test_backlog(backlog, expected):
    facts = healthy()
    facts["backlog"] = backlog
    state, reasons, _ = assess(facts)
    assert state == expected
    if expected == STATE_WARNING:
        assert reasons == ["WARNING: %d WAL segments are waiting to be archived (pg_wal is growing)" % backlog]


def test_chain_gap_is_critical_and_no_window():
    facts = healthy()
    facts["chain"].update(ok=False, gaps=[["000000010000000000000010", "000000010000000000000012"]])
    state, reasons, window = assess(facts)
    assert state == STATE_CRITICAL
    assert reasons == ["CRITICAL: WAL chain has gaps: 000000010000000000000010..000000010000000000000012"]
    assert window is None


def test_no_chain_means_no_window():
    facts = healthy()
    facts["chain"] = None
    state, _, window = assess(facts)
    assert state == STATE_OK and window is None


def test_warning_and_critical_together_give_critical_with_all_reasons():
    facts = healthy()
    facts["newest_segment_at"] = ago(30)
    facts["backlog"] = 20
    facts["backups"]["contentstore"]["newest_ended_at"] = ago(50)
    state, reasons, _ = assess(facts)
    assert state == STATE_CRITICAL
    assert [r.split(":")[0] for r in reasons] == ["CRITICAL", "WARNING", "WARNING"]


def test_only_warnings_give_warning():
    facts = healthy()
    facts["newest_segment_at"] = ago(30)
    facts["backlog"] = 20
    assert assess(facts)[0] == STATE_WARNING


def test_limits_are_parameters():
    facts = healthy()
    facts["backups"]["postgres"]["newest_ended_at"] = ago(10)
    assert status.assess(facts, NOW, 8, LIMIT_WAL)[0] == STATE_CRITICAL
    assert status.assess(facts, NOW, 12, LIMIT_WAL)[0] == STATE_OK
    assert status.assess(facts, NOW, 12, 0)[0] == STATE_WARNING


def test_state_names_are_nagios_codes():
    assert (STATE_OK, STATE_WARNING, STATE_CRITICAL) == (0, 1, 2)
    assert [status.STATE_NAMES[s] for s in (0, 1, 2)] == ["OK", "WARNING", "CRITICAL"]


def test_archive_failure_after_dst_change_is_critical():
    facts = healthy()
    # 00:50 UTC success, 01:10 UTC failure: the failure is newer, though its local clock reads earlier.
    facts["archiver"].update(last_archived_time="2024-10-27T02:50:00+02:00", failed_count=1,
                             last_failed_wal="000000010000000000000079",
                             last_failed_time="2024-10-27T02:10:00+01:00")
    assert status.assess(facts, datetime.datetime(2024, 10, 27, 1, 30, tzinfo=datetime.timezone.utc),
                         10000, 10000)[0] == STATE_CRITICAL
