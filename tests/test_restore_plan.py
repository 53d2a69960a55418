"""restore_plan and restore_settings (pure): time parsing, choice of base backup / snapshot / config, recovery
window, and the recovery settings of every version branch (9.4, 9.6, 10, 11, 12, 15; only 15 runs here)."""

import datetime

import catalog
import pytest
import restore_plan as rp
import restore_settings as rs

UTC = datetime.timezone.utc
PY, WALPY, ARCH = "/usr/bin/python3", "/opt/alfresco-backup/wal.py", "/backup/pg_wal"
CMD = '"/usr/bin/python3" "/opt/alfresco-backup/wal.py" archive-get "%f" "%p" "/backup/pg_wal"'


def at(hour, minute=0, second=0, day=1):
    return datetime.datetime(2024, 5, day, hour, minute, second, tzinfo=UTC)


def entry(kind, name, started, ended, status=catalog.DONE, **info):
    info.update({"started_at": started.isoformat(), "ended_at": ended.isoformat(), "status": status})
    return catalog.BackupEntry(kind, name, "/b/%s/%s" % (kind, name), status, started.replace(tzinfo=None), info)


BASES = [entry("postgres", "base-1", at(2), at(2, 5), stop_lsn="0/5000100"),
         entry("postgres", "base-2", at(3), at(3, 5), status=catalog.FAILED),
         entry("postgres", "base-3", at(4), at(4, 5), stop_lsn="0/9000100")]
SNAPS = [entry("contentstore", "cs-1", at(2, 5), at(2, 9)),
         entry("contentstore", "cs-2", at(3, 5), at(3, 9), status=catalog.FAILED),
         entry("contentstore", "cs-3", at(4, 5), at(4, 9))]
NEWEST_WAL = at(6)


# ---------------------------------------------------------------- times and targets

@pytest.mark.parametrize("text, expected", [
    ("2024-05-01 10:30:00Z", at(10, 30)),
    ("2024-05-01T10:30:00+00", at(10, 30)),
    ("2024-05-01 12:30:00+02:00", at(10, 30)),
    ("2024-05-01 12:30+0200", at(10, 30)),
    ("2024-05-01 07:30:00-03", at(10, 30)),
    ("2024-05-01 10:30:00 UTC", at(10, 30)),
    ("2024-05-01 10:30:00.25+00", at(10, 30).replace(microsecond=250000)),
    ("2024-05-01 10:30:00.123456+00", at(10, 30).replace(microsecond=123456)),
])
def test_parse_time_with_offsets(text, expected):
    assert rp.parse_time(text) == expected


def test_parse_time_without_offset_is_local_time():
    value = rp.parse_time("2024-05-01 10:30:00")
    assert value.tzinfo is not None
    assert value.replace(tzinfo=None) == datetime.datetime(2024, 5, 1, 10, 30)
    assert value.utcoffset() == datetime.datetime(2024, 5, 1, 10, 30).astimezone().utcoffset()


@pytest.mark.parametrize("text", ["", "yesterday", "2024-13-01 10:00", "2024-05-01 25:00", "10:30", "2024-05-01x"])
def test_parse_time_refuses_what_it_cannot_read(text):
    with pytest.raises(rp.PlanError):
        rp.parse_time(text)


def test_format_pg_time_is_utc_with_offset():
    local = datetime.datetime(2024, 5, 1, 12, 30, 0, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    assert rp.format_pg_time(local) == "2024-05-01 10:30:00.000005+00"
    assert rp.format_pg_time(at(10, 30)) == "2024-05-01 10:30:00+00"


def test_make_target_takes_one_target():
    assert rp.make_target() == rp.LATEST
    assert rp.make_target(immediate=True) == rp.Target("immediate", None)
    assert rp.make_target(name="before-upgrade") == rp.Target("name", "before-upgrade")
    assert rp.make_target(time="2024-05-01 10:30Z").value == at(10, 30)
    with pytest.raises(rp.PlanError, match="only one"):
        rp.make_target(time="2024-05-01 10:30Z", name="x")
    with pytest.raises(rp.PlanError, match="only one"):
        rp.make_target(xid="5", immediate=True)
    for bad in ({"xid": "12a"}, {"lsn": "16-B3"}, {"name": ""}, {"name": "a\nb"}):
        with pytest.raises(rp.PlanError):
            rp.make_target(**bad)


# ---------------------------------------------------------------- choosing backups

def test_base_for_a_time_is_the_newest_done_that_ended_before_it():
    base, notes = rp.choose_base(BASES, rp.Target("time", at(4, 30)), newest_wal_at=NEWEST_WAL)
    assert base.name == "base-3" and not notes
    # base-2 ended before 3:30 but FAILED: never a restore source.
    assert rp.choose_base(BASES, rp.Target("time", at(3, 30)), newest_wal_at=NEWEST_WAL)[0].name == "base-1"


def test_ended_at_has_a_one_second_margin():
    # ended_at is truncated to the second, so a target in that same second may precede the real end.
    assert rp.choose_base(BASES, rp.Target("time", at(4, 5, 0)), newest_wal_at=NEWEST_WAL)[0].name == "base-1"
    assert rp.choose_base(BASES, rp.Target("time", at(4, 5, 1)), newest_wal_at=NEWEST_WAL)[0].name == "base-3"


def test_target_outside_the_recovery_window_is_refused():
    with pytest.raises(rp.PlanError, match="before the oldest complete base backup"):
        rp.choose_base(BASES, rp.Target("time", at(2, 4)), newest_wal_at=NEWEST_WAL)
    with pytest.raises(rp.PlanError, match="after the newest archived WAL"):
        rp.choose_base(BASES, rp.Target("time", at(6, 0, 1)), newest_wal_at=NEWEST_WAL)
    with pytest.raises(rp.PlanError, match="holds no segment"):
        rp.choose_base(BASES, rp.Target("time", at(5)), newest_wal_at=None)
    assert rp.recovery_window(BASES, NEWEST_WAL) == (at(2, 5), NEWEST_WAL)
    assert rp.recovery_window(BASES, None) is None
    assert rp.recovery_window([BASES[1]], NEWEST_WAL) is None


def test_an_explicit_backup_must_precede_the_target_and_be_done():
    target = rp.Target("time", at(4, 30))
    assert rp.choose_base(BASES, target, "base-1", NEWEST_WAL)[0].name == "base-1"
    with pytest.raises(rp.PlanError, match="after the target"):
        rp.choose_base(BASES, rp.Target("time", at(3)), "base-3", NEWEST_WAL)
    with pytest.raises(rp.PlanError, match="FAILED"):
        rp.choose_base(BASES, rp.LATEST, "base-2")
    with pytest.raises(rp.PlanError, match="no base backup named"):
        rp.choose_base(BASES, rp.LATEST, "base-9")
    assert rp.choose_base(BASES, rp.LATEST, "/b/postgres/base-1/")[0].name == "base-1"


def test_backups_on_a_timeline_abandoned_by_an_earlier_restore_are_left_out():
    # An in-place restore to 3:00 forked timeline 2 off timeline 1 at 0/7000000: base-3 (timeline 1, stopped at
    # 0/9000100) lies on the abandoned branch, base-1 (stopped at 0/5000100) before the fork.
    follow = {2: None, 1: 0x7000000}
    assert rp.on_lineage(BASES[0], follow) and not rp.on_lineage(BASES[2], follow)
    assert rp.on_lineage(BASES[2], None) and rp.on_lineage(BASES[2], {1: None})
    assert not rp.on_lineage(BASES[0], {3: None, 2: 0x8000000})
    assert rp.choose_base(BASES, rp.LATEST, lineage=follow)[0].name == "base-1"
    assert rp.choose_base(BASES, rp.Target("time", at(5)), newest_wal_at=NEWEST_WAL, lineage=follow)[0].name \
        == "base-1"
    with pytest.raises(rp.PlanError, match="--timeline 1"):
        rp.choose_base(BASES, rp.LATEST, "base-3", lineage=follow)
    with pytest.raises(rp.PlanError, match="abandoned"):
        rp.choose_base(BASES, rp.LATEST, lineage={2: None, 1: 0x100})


def test_base_for_other_targets():
    assert rp.choose_base(BASES, rp.LATEST)[0].name == "base-3"
    assert rp.choose_base(BASES, rp.Target("immediate", None))[0].name == "base-3"
    base, notes = rp.choose_base(BASES, rp.Target("name", "before-upgrade"))
    assert base.name == "base-1" and "oldest" in notes[0]
    assert rp.choose_base(BASES, rp.Target("xid", "1234"))[0].name == "base-1"
    assert rp.choose_base(BASES, rp.Target("lsn", "0/9000200"))[0].name == "base-3"
    assert rp.choose_base(BASES, rp.Target("lsn", "0/8000000"))[0].name == "base-1"
    with pytest.raises(rp.PlanError, match="before the end of the oldest"):
        rp.choose_base(BASES, rp.Target("lsn", "0/4000000"))
    with pytest.raises(rp.PlanError, match="nothing to restore"):
        rp.choose_base([BASES[1]], rp.LATEST)


def test_snapshot_is_the_first_done_one_that_started_at_or_after_the_database_point():
    assert rp.choose_snapshot(SNAPS, at(2, 5))[0].name == "cs-1"
    assert rp.choose_snapshot(SNAPS, at(2, 6))[0].name == "cs-3"  # cs-2 FAILED
    assert rp.choose_snapshot(SNAPS, at(4, 5))[0].name == "cs-3"
    with pytest.raises(rp.PlanError, match="no complete snapshot started at or after"):
        rp.choose_snapshot(SNAPS, at(4, 6))


def test_snapshot_for_latest_warns_when_older_than_the_newest_wal():
    snap, warnings = rp.choose_snapshot(SNAPS, None, newest_wal_at=NEWEST_WAL)
    assert snap.name == "cs-3" and "before the newest archived WAL" in warnings[0]
    assert rp.choose_snapshot(SNAPS, None, newest_wal_at=at(4, 5))[1] == []


def test_explicit_snapshot_older_than_the_point_is_allowed_with_a_warning():
    snap, warnings = rp.choose_snapshot(SNAPS, at(5), "cs-1")
    assert snap.name == "cs-1" and "BEFORE the database point" in warnings[0]
    with pytest.raises(rp.PlanError, match="FAILED"):
        rp.choose_snapshot(SNAPS, None, "cs-2")


def test_snapshot_to_restore_by_name_by_database_time_or_the_newest():
    assert rp.snapshot_to_restore(SNAPS) == (SNAPS[2], [])
    assert rp.snapshot_to_restore(SNAPS, "2024-05-01 02:06Z")[0].name == "cs-3"  # cs-2 FAILED
    assert rp.snapshot_to_restore(SNAPS, "2024-05-01 02:04Z")[0].name == "cs-1"
    snap, warnings = rp.snapshot_to_restore(SNAPS, "2024-05-01 05:00Z", "cs-1")
    assert snap.name == "cs-1" and "BEFORE the database point" in warnings[0]
    with pytest.raises(rp.PlanError, match="cannot read the time"):
        rp.snapshot_to_restore(SNAPS, "yesterday")


def test_db_point():
    assert rp.db_point(rp.Target("time", at(5)), BASES[0]) == at(5)
    assert rp.db_point(rp.Target("immediate", None), BASES[0]) == at(2, 5)
    assert rp.db_point(rp.LATEST, BASES[0]) is None
    assert rp.db_point(rp.Target("name", "x"), BASES[0]) is None


def test_config_copy_of_the_same_night():
    configs = [entry("config", "config-1", at(2, 9), at(2, 9)), entry("config", "config-3", at(4, 9), at(4, 9))]
    assert rp.choose_config(configs, BASES[0]).name == "config-1"
    assert rp.choose_config(configs, BASES[2]).name == "config-3"
    late = entry("postgres", "base-9", at(9), at(9, 5))
    assert rp.choose_config(configs, late).name == "config-3"
    assert rp.choose_config([], BASES[0]) is None


def test_a_broken_wal_chain_limits_the_targets():
    rp.check_wal_reach(rp.LATEST, True, None, None)
    rp.check_wal_reach(rp.Target("immediate", None), False, None, "000000010000000000000007")
    rp.check_wal_reach(rp.Target("time", at(4)), False, at(5), "000000010000000000000007")
    with pytest.raises(rp.PlanError, match="000000010000000000000007 is missing"):
        rp.check_wal_reach(rp.Target("time", at(5, 30)), False, at(5), "000000010000000000000007")
    for target in (rp.LATEST, rp.Target("name", "x"), rp.Target("xid", "9")):
        with pytest.raises(rp.PlanError, match="stop silently at the gap"):
            rp.check_wal_reach(target, False, at(5), "000000010000000000000007")


# ---------------------------------------------------------------- restore_command and quoting

def test_restore_command_quotes_paths_and_doubles_percent():
    assert rs.restore_command(PY, WALPY, ARCH) == CMD
    cmd = rs.restore_command(PY, "/opt/my tools/wal.py", "/backup/100%/pg_wal")
    assert cmd == '"/usr/bin/python3" "/opt/my tools/wal.py" archive-get "%f" "%p" "/backup/100%%/pg_wal"'
    for bad in ('/a"b', "/a$HOME", "/a`id`", "/a\\b", "/a\nb"):
        with pytest.raises(rp.PlanError, match="cannot be quoted"):
            rs.restore_command(PY, WALPY, bad)


def test_conf_quote():
    assert rs.conf_quote("it's") == "'it''s'"
    assert rs.conf_quote("a\\b") == "'a\\\\b'"


# ---------------------------------------------------------------- every version branch

TIME = rp.Target("time", at(10, 30))


def test_94_uses_recovery_conf_with_pause_at_recovery_target():
    files = rs.recovery_files(90426, CMD, TIME, "note")
    assert files.signal_file is None
    assert files.recovery_conf == (
        "# recovery.conf written by restore.py: note\n"
        "restore_command = '%s'\n"
        "recovery_target_time = '2024-05-01 10:30:00+00'\n"
        "pause_at_recovery_target = false\n"
        "recovery_target_timeline = 'latest'\n" % CMD)
    assert "recovery_target_action" not in files.recovery_conf
    assert files.auto_conf_block.splitlines()[1:-1] == ["archive_mode = off"]


@pytest.mark.parametrize("version", [90605, 100023, 110022])
def test_95_to_11_use_recovery_conf_with_recovery_target_action(version):
    files = rs.recovery_files(version, CMD, TIME, "note", port=5433)
    assert files.signal_file is None
    assert "recovery_target_action = 'promote'\n" in files.recovery_conf
    assert "pause_at_recovery_target" not in files.recovery_conf
    assert "recovery_target_timeline = 'latest'" in files.recovery_conf
    assert "archive_mode = off\nport = 5433\n" in files.auto_conf_block
    assert "restore_command" not in files.auto_conf_block  # pre-12 servers ignore it there


@pytest.mark.parametrize("version", [120015, 150004])
def test_12_and_later_use_recovery_signal_and_postgresql_auto_conf(version):
    files = rs.recovery_files(version, CMD, TIME, "note", socket_dir="/tmp", listen="127.0.0.1",
                              logging_collector=False)
    assert files.recovery_conf is None and files.signal_file == "recovery.signal"
    lines = files.auto_conf_block.splitlines()
    assert lines[0].startswith(rs.BLOCK_BEGIN) and lines[-1] == rs.BLOCK_END
    assert lines[1:-1] == [
        "restore_command = '%s'" % CMD, "recovery_target_time = '2024-05-01 10:30:00+00'",
        "recovery_target_action = 'promote'", "recovery_target_timeline = 'latest'", "archive_mode = off",
        "unix_socket_directories = '/tmp'", "listen_addresses = '127.0.0.1'", "logging_collector = off"]


@pytest.mark.parametrize("version", [90426, 110022, 150004])
def test_a_throwaway_copy_runs_without_fsync_and_any_other_keeps_it(version):
    throwaway = rs.recovery_files(version, CMD, TIME, "note", port=5433, durable=False).auto_conf_block
    assert "archive_mode = off\nfsync = off\nport = 5433\n" in throwaway
    for kept in (rs.recovery_files(version, CMD, TIME, "note", port=5433),
                 rs.recovery_files(version, CMD, TIME, "note", keep_archiving=True)):
        assert "fsync" not in (kept.auto_conf_block or "") + (kept.recovery_conf or "")


@pytest.mark.parametrize("version", [90426, 90605, 100023, 110022, 120015, 150004])
def test_targets_in_every_version(version):
    def lines(target):
        return dict(rs.recovery_lines(version, CMD, target))

    immediate = lines(rp.Target("immediate", None))
    assert immediate["recovery_target"] == "immediate"
    assert immediate["recovery_target_timeline"] == "current"  # only the backup's own WAL is needed
    assert lines(rp.Target("name", "before upgrade"))["recovery_target_name"] == "before upgrade"
    assert lines(rp.Target("xid", "1234"))["recovery_target_xid"] == "1234"
    latest = lines(rp.LATEST)
    assert set(latest) == {"restore_command", "recovery_target_timeline"}  # no target, no action
    stop = "pause_at_recovery_target" if version < 90500 else "recovery_target_action"
    assert lines(rp.Target("name", "x"))[stop] == ("false" if version < 90500 else "promote")
    if version >= 100000:
        assert lines(rp.Target("lsn", "0/5000100"))["recovery_target_lsn"] == "0/5000100"
    else:
        with pytest.raises(rp.PlanError, match="recovery_target_lsn needs PostgreSQL 10"):
            rs.recovery_lines(version, CMD, rp.Target("lsn", "0/5000100"))


def test_keep_archiving_and_old_versions():
    files = rs.recovery_files(110022, CMD, TIME, "note", keep_archiving=True)
    assert files.auto_conf_block is None
    files = rs.recovery_files(150004, CMD, TIME, "note", keep_archiving=True)
    assert "archive_mode" not in files.auto_conf_block
    with pytest.raises(rp.PlanError, match="older than 9.4"):
        rs.recovery_files(90322, CMD, TIME, "note")
    assert rs.recovery_lines(150004, CMD, rp.LATEST, timeline="current")[-1] == ("recovery_target_timeline",
                                                                                  "current")
    with pytest.raises(rp.PlanError, match="--timeline"):
        rs.recovery_lines(150004, CMD, rp.LATEST, timeline="newest")
    assert rs.wal_dir_name(90605) == "pg_xlog" and rs.wal_dir_name(100000) == "pg_wal"
    assert rs.uses_recovery_conf(110022) and not rs.uses_recovery_conf(120000)


def test_neutralize_path_settings():
    text = ("port = 5432\ndata_directory = '/var/lib/postgresql/15/main'\n#hba_file = 'x'\n"
            "  hba_file='/etc/postgresql/15/main/pg_hba.conf'\nexternal_pid_file = '/run/x.pid'\n")
    new, names = rs.neutralize_path_settings(text)
    assert names == ["data_directory", "hba_file", "external_pid_file"]
    assert "port = 5432\n# disabled by restore.py: data_directory" in new and "\n#hba_file = 'x'\n" in new
    assert rs.neutralize_path_settings("port = 5432\n") == ("port = 5432\n", [])


# ---------------------------------------------------------------- after the restore

def test_recovery_outcome_from_the_log():
    assert rs.recovery_outcome("LOG:  recovery stopping before commit of transaction 734, time 2024")[0] is True
    assert rs.recovery_outcome('LOG:  recovery stopping at restore point "x", time 2024')[0] is True
    assert rs.recovery_outcome("LOG:  recovery stopping after reaching consistency")[0] is True
    reached, line = rs.recovery_outcome("FATAL:  recovery ended before configured recovery target was reached")
    assert reached is False and "recovery ended before" in line
    assert rs.recovery_outcome("LOG:  archive recovery complete") == (None, "")


def test_content_relpath():
    assert rp.content_relpath("store://2024/3/7/14/5/ab.bin") == "2024/3/7/14/5/ab.bin"
    for bad in ("s3://bucket/x.bin", "store://", "store:///etc/passwd", "store://2024/../../x", "store://a//b",
                None, ""):
        assert rp.content_relpath(bad) is None


def test_rollback_commands_quote_paths_and_move_the_abandoned_timeline():
    lines = rp.rollback_commands("/opt/alf resco/alfresco.sh", [("/d/pg", "/d/pg.before", "/d/pg.restored")],
                                 "/b/pg_wal", "/b/pg_wal.abandoned", 2)
    assert lines == ["'/opt/alf resco/alfresco.sh' stop", "mv /d/pg /d/pg.restored", "mv /d/pg.before /d/pg",
                     "mkdir -p /b/pg_wal.abandoned",
                     "find /b/pg_wal -maxdepth 1 -name '00000002*' -exec mv {} /b/pg_wal.abandoned/ \\;",
                     "'/opt/alf resco/alfresco.sh' start"]
    assert len(rp.rollback_commands("/a.sh", [])) == 2


def test_snapshot_pairing_within_one_second_uses_the_exact_times():
    """Two nights a second apart (as make demo runs them): night 1's snapshot started 0.3 s before night 2's
    base backup ended, in the same second. Whole-second times paired them wrongly (found by make demo)."""
    t = datetime.datetime(2024, 5, 1, 2, 0, 22, tzinfo=UTC)
    night1 = entry("contentstore", "cs-night1", t + datetime.timedelta(microseconds=200000),
                   t + datetime.timedelta(microseconds=500000))
    night2 = entry("contentstore", "cs-night2", t + datetime.timedelta(seconds=1, microseconds=10000),
                   t + datetime.timedelta(seconds=1, microseconds=900000))
    base2_end = t + datetime.timedelta(microseconds=900000)
    assert rp.choose_snapshot([night1, night2], base2_end)[0].name == "cs-night2"


def test_metadata_times_keep_microseconds():
    assert "." in catalog.utc_now_iso()
    assert catalog.parse_iso(catalog.utc_now_iso()) is not None
