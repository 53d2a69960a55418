"""Tests for retention.py on fake BACKUP_DIR trees (catalog-shaped directories and metadata)."""

import datetime
import json
import logging
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import catalog
import retention
from catalog import DONE, FAILED, INCOMPLETE, PARTIAL, WAITING_FOR_WAL

DAY = datetime.timedelta(days=1)
HOUR = datetime.timedelta(hours=1)
NOBODY = 65534


def segment(number, timeline=1):
    return f"{timeline:08X}{number:016X}"


def make(backup_dir, kind, when, status=DONE, info=None, dirname=None):
    """Create one catalog-shaped backup; returns its directory path.

    PARTIAL: ``NAME.partial`` without metadata; INCOMPLETE: directory without metadata.
    """
    folder = os.path.join(str(backup_dir), kind)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    name = dirname or catalog.backup_name(kind, when)
    if status == PARTIAL:
        name += catalog.PARTIAL_SUFFIX
    path = os.path.join(folder, name)
    os.makedirs(os.path.join(path, "sub", "deeper"), mode=0o700)
    for rel in ("data.bin", "sub/a.bin", "sub/deeper/b.bin"):
        with open(os.path.join(path, rel), "w") as handle:
            handle.write(name)
    if status in (DONE, WAITING_FOR_WAL, FAILED):
        meta = {"status": status, "started_at": "2024-01-01T00:00:00+00:00"}
        if when is not None:
            # As a night runs them: the base backup first, the snapshot and config copy when it has ended.
            start = when + datetime.timedelta(minutes=0 if kind == "postgres" else 1)
            meta.update(started_at=start.astimezone(datetime.timezone.utc).isoformat(),
                        ended_at=(start + datetime.timedelta(minutes=1)).astimezone(datetime.timezone.utc).isoformat())
        if kind == "postgres":
            number = when.toordinal() - datetime.date(2024, 1, 1).toordinal() + 2 if when else 1
            meta.update(start_wal_file=segment(number), stop_wal_file=segment(number + 1), timeline=1,
                        backup_label_file=segment(number) + ".00000028.backup")
        meta.update(info or {})
        catalog.write_info(path, meta)
    return path


def set_mtime(path, when):
    stamp = when.timestamp()
    os.utime(path, (stamp, stamp))


def decisions_by_name(plan):
    return {d.entry.name: d for d in plan.decisions}


def kept_names(plan):
    return sorted(e.name for e in plan.kept())


def deleted_names(plan):
    return sorted(e.name for e in plan.to_delete())


def names(kind, *whens):
    return sorted(catalog.backup_name(kind, w) for w in whens)


NOW = datetime.datetime(2024, 6, 30, 12, 0, 0)


def test_newest_done_is_kept_however_old(tmp_path):
    for days in (100, 50, 40):
        make(tmp_path, "postgres", NOW - days * DAY)
    make(tmp_path, "postgres", NOW - 2 * DAY, status=FAILED)
    plan = retention.plan_retention(retention.collect(str(tmp_path)), NOW, retention_days=7)
    newest = catalog.backup_name("postgres", NOW - 40 * DAY)
    assert [e.name for e in plan.kept()] == [newest]
    assert "newest DONE postgres backup is never deleted" in decisions_by_name(plan)[newest].reason
    assert deleted_names(plan) == names("postgres", NOW - 100 * DAY, NOW - 50 * DAY, NOW - 2 * DAY)


def test_min_count_keeps_that_many_newest_done(tmp_path):
    for days in (20, 19, 18, 17, 16):
        make(tmp_path, "config", NOW - days * DAY)
    make(tmp_path, "config", NOW - 15 * DAY, status=FAILED)  # failures do not count towards the minimum
    entries = retention.collect(str(tmp_path))
    plan = retention.plan_retention(entries, NOW, retention_days=7, min_count=3)
    assert kept_names(plan) == names("config", NOW - 18 * DAY, NOW - 17 * DAY, NOW - 16 * DAY)
    assert "minimum count" in decisions_by_name(plan)[catalog.backup_name("config", NOW - 18 * DAY)].reason
    # min_count 0 still never deletes the newest DONE backup.
    plan = retention.plan_retention(entries, NOW, retention_days=7, min_count=0)
    assert kept_names(plan) == names("config", NOW - 16 * DAY)
    with pytest.raises(ValueError):
        retention.plan_retention(entries, NOW, retention_days=-1)


def test_window_uses_the_name_not_the_mtime(tmp_path):
    now = datetime.datetime.now().replace(microsecond=0)
    old = make(tmp_path, "contentstore", now - 10 * DAY)
    set_mtime(old, now)  # touched today: still 10 days old by its name
    new = make(tmp_path, "contentstore", now - 2 * DAY)
    set_mtime(new, now - 100 * DAY)  # rsync copied an ancient mtime onto a new snapshot
    newest = make(tmp_path, "contentstore", now - HOUR)
    plan = retention.plan_retention(retention.collect(str(tmp_path)), now, retention_days=7)
    assert deleted_names(plan) == [os.path.basename(old)]
    assert kept_names(plan) == sorted([os.path.basename(new), os.path.basename(newest)])
    assert "older than the 7-day retention window (10.0 days)" in plan.decisions[0].reason


def test_unknown_names_and_metadata_less_directories_are_kept_and_reported(tmp_path):
    now = datetime.datetime.now().replace(microsecond=0)
    manual = make(tmp_path, "postgres", None, dirname="base-manual-copy")
    make(tmp_path, "postgres", None, dirname="base-restored-copy")
    keep = make(tmp_path, "postgres", None, dirname=catalog.backup_name("postgres", now - 30 * DAY) + "-keep")
    copied_in = make(tmp_path, "postgres", now - 20 * DAY, status=INCOMPLETE)  # a backup without its .json
    make(tmp_path, "postgres", now - HOUR)
    set_mtime(manual, now - 10 * DAY)
    set_mtime(keep, now - 30 * DAY)
    # Not backup-shaped: never listed, never touched.
    os.mkdir(os.path.join(str(tmp_path), "postgres", "lost+found"))
    with open(os.path.join(str(tmp_path), "postgres", "notes.txt"), "w") as handle:
        handle.write("keep me")
    plan = retention.plan_retention(retention.collect(str(tmp_path)), now, retention_days=7)
    by_name = decisions_by_name(plan)
    unknown = ["base-manual-copy", "base-restored-copy", os.path.basename(keep), os.path.basename(copied_in)]
    assert set(by_name) == set(unknown + [catalog.backup_name("postgres", now - HOUR)])
    for name in unknown:
        assert by_name[name].action == "keep", by_name[name]
        assert any(name in warning for warning in plan.warnings), plan.warnings
    assert "not one this tool writes" in by_name["base-manual-copy"].reason
    assert "no readable metadata" in by_name[os.path.basename(copied_in)].reason
    assert plan.to_delete() == []
    result = retention.apply_plan(plan, logging.getLogger("test"))
    assert result.deleted == []
    for path in (manual, keep, copied_in):
        assert os.path.isdir(path)
    assert os.path.isdir(os.path.join(str(tmp_path), "postgres", "lost+found"))
    assert os.path.isfile(os.path.join(str(tmp_path), "postgres", "notes.txt"))
    with pytest.raises(OSError, match="not a postgres backup directory"):
        retention.delete_entry(by_name["base-manual-copy"].entry)


def test_a_damaged_metadata_file_keeps_even_an_old_backup(tmp_path):
    old = make(tmp_path, "contentstore", NOW - 40 * DAY)
    with open(catalog.info_path(old), "w") as handle:
        handle.write("{not json")
    make(tmp_path, "contentstore", NOW - DAY)
    plan = retention.plan_retention(retention.collect(str(tmp_path)), NOW, 7)
    assert plan.to_delete() == []
    assert any("no readable metadata" in w for w in plan.warnings)


def test_non_done_deleted_only_with_the_lock_and_never_the_current_run(tmp_path):
    make(tmp_path, "postgres", NOW - 30 * DAY)
    make(tmp_path, "postgres", NOW - 20 * DAY, status=PARTIAL)
    make(tmp_path, "contentstore", NOW - 30 * DAY)
    make(tmp_path, "contentstore", NOW - 3 * DAY, status=FAILED)
    make(tmp_path, "config", NOW - 30 * DAY)
    make(tmp_path, "config", NOW - 4 * DAY, status=FAILED)
    current = make(tmp_path, "postgres", NOW - HOUR, status=PARTIAL)
    current_name = catalog.backup_name("postgres", NOW - HOUR)
    assert current.endswith(".partial")
    entries = retention.collect(str(tmp_path))

    plan = retention.plan_retention(entries, NOW, 7, lock_free=False, current_names={current_name})
    assert plan.to_delete() == []
    by_name = decisions_by_name(plan)
    assert "lock is not held" in by_name[catalog.backup_name("contentstore", NOW - 3 * DAY)].reason

    plan = retention.plan_retention(entries, NOW, 7, lock_free=True, current_names={current_name})
    by_name = decisions_by_name(plan)
    assert deleted_names(plan) == sorted([catalog.backup_name("postgres", NOW - 20 * DAY),
                                          catalog.backup_name("contentstore", NOW - 3 * DAY),
                                          catalog.backup_name("config", NOW - 4 * DAY)])
    assert by_name[catalog.backup_name("postgres", NOW - 20 * DAY)].reason == "partial left by an interrupted run"
    assert by_name[catalog.backup_name("contentstore", NOW - 3 * DAY)].reason == "FAILED backup, not needed"
    assert by_name[catalog.backup_name("config", NOW - 4 * DAY)].reason == "FAILED backup, not needed"
    assert by_name[current_name].action == "keep"
    assert "current run" in by_name[current_name].reason

    # Without current_names the same PARTIAL is just another leftover.
    plan = retention.plan_retention(entries, NOW, 7, lock_free=True)
    assert decisions_by_name(plan)[current_name].action == "delete"


def test_waiting_for_wal_young_is_kept_old_is_deleted(tmp_path):
    make(tmp_path, "postgres", NOW - 3 * DAY)
    make(tmp_path, "postgres", NOW - 2 * DAY, status=WAITING_FOR_WAL)
    make(tmp_path, "postgres", NOW - 3 * HOUR, status=WAITING_FOR_WAL)
    entries = retention.collect(str(tmp_path))
    plan = retention.plan_retention(entries, NOW, 7)
    by_name = decisions_by_name(plan)
    young = by_name[catalog.backup_name("postgres", NOW - 3 * HOUR)]
    old = by_name[catalog.backup_name("postgres", NOW - 2 * DAY)]
    assert young.action == "keep" and "may still be completing" in young.reason
    assert old.action == "delete" and "failed to complete" in old.reason
    # WAL is kept from the oldest kept base, the DONE one.
    assert plan.wal_keep_from == by_name[catalog.backup_name("postgres", NOW - 3 * DAY)].entry.info[
        "start_wal_file"]
    plan = retention.plan_retention(entries, NOW, 7, lock_free=False)
    assert plan.to_delete() == []


def test_pairing_keeps_a_snapshot_at_or_after_each_kept_base(tmp_path):
    for days in (13, 10, 9):
        make(tmp_path, "postgres", NOW - days * DAY)
    # All outside the 7-day window; min_count=2 keeps two bases, two snapshots, two config copies.
    for when in (NOW - 12 * DAY, NOW - 10 * DAY + HOUR, NOW - 9.5 * DAY, NOW - 8 * DAY, NOW - 7.5 * DAY):
        make(tmp_path, "contentstore", when)
    for when in (NOW - 14 * DAY, NOW - 8.5 * DAY, NOW - 8.2 * DAY):
        make(tmp_path, "config", when)
    plan = retention.plan_retention(retention.collect(str(tmp_path)), NOW, 7, min_count=2)
    assert kept_names(plan) == sorted(
        names("postgres", NOW - 10 * DAY, NOW - 9 * DAY)
        + names("contentstore", NOW - 10 * DAY + HOUR, NOW - 8 * DAY, NOW - 7.5 * DAY)
        + names("config", NOW - 8.5 * DAY, NOW - 8.2 * DAY))
    by_name = decisions_by_name(plan)
    paired = by_name[catalog.backup_name("contentstore", NOW - 10 * DAY + HOUR)]
    base_10 = catalog.backup_name("postgres", NOW - 10 * DAY)
    assert paired.reason == f"paired contentstore snapshot of kept base backup {base_10}"
    assert "paired config copy" in by_name[catalog.backup_name("config", NOW - 8.5 * DAY)].reason
    assert plan.warnings == []
    assert plan.wal_keep_from == by_name[catalog.backup_name("postgres", NOW - 10 * DAY)].entry.info[
        "start_wal_file"]
    assert plan.keep_backup_labels == {
        by_name[n].entry.info["backup_label_file"] for n in names("postgres", NOW - 10 * DAY, NOW - 9 * DAY)}


def test_pairing_without_a_later_snapshot_only_warns(tmp_path):
    make(tmp_path, "postgres", NOW - 2 * DAY)
    make(tmp_path, "contentstore", NOW - 20 * DAY)
    make(tmp_path, "contentstore", NOW - 3 * DAY)
    make(tmp_path, "config", NOW - 20 * DAY)
    plan = retention.plan_retention(retention.collect(str(tmp_path)), NOW, 1)
    assert kept_names(plan) == sorted(names("postgres", NOW - 2 * DAY) + names("contentstore", NOW - 3 * DAY)
                                      + names("config", NOW - 20 * DAY))
    assert len(plan.warnings) == 1
    assert "no DONE contentstore snapshot taken at or after kept base backup" in plan.warnings[0]
    # The config copy falls back to the newest one older than the base.
    assert "paired config copy" in decisions_by_name(plan)[catalog.backup_name("config", NOW - 20 * DAY)].reason


def test_wal_keep_from_none_when_unknown_or_no_base(tmp_path):
    make(tmp_path, "contentstore", NOW - DAY)
    plan = retention.plan_retention(retention.collect(str(tmp_path)), NOW, 7)
    assert plan.wal_keep_from is None and plan.keep_backup_labels == set()
    assert any("no DONE postgres backup" in w for w in plan.warnings)
    make(tmp_path, "postgres", NOW - 3 * DAY, info={"start_wal_file": segment(0x30)})
    make(tmp_path, "postgres", NOW - 2 * DAY, info={"start_wal_file": None, "backup_label_file": None})
    make(tmp_path, "postgres", NOW - 1 * DAY, info={"start_wal_file": segment(0x50)})
    plan = retention.plan_retention(retention.collect(str(tmp_path)), NOW, 7)
    assert plan.wal_keep_from is None  # a kept base without a start segment: pruning is unsafe
    assert any("WAL must not be pruned" in w for w in plan.warnings)
    plan = retention.plan_retention(retention.collect(str(tmp_path)), NOW, 1)
    assert plan.wal_keep_from == segment(0x50)


NIGHT = datetime.datetime(2024, 3, 1, 2, 0, 0)


def night(day):
    return NIGHT + (day - 1) * DAY


MONTH_STATUS = {
    # night: (postgres, contentstore, config); None = nothing written that night
    5: (FAILED, FAILED, FAILED),
    10: (DONE, PARTIAL, DONE),
    12: (WAITING_FOR_WAL, DONE, DONE),
    17: (FAILED, DONE, DONE),
    22: (DONE, FAILED, DONE),
    24: (FAILED, DONE, FAILED),
    25: (FAILED, DONE, FAILED),
    26: (FAILED, DONE, FAILED),
    27: (FAILED, DONE, FAILED),
    28: (FAILED, FAILED, FAILED),
    29: (FAILED, FAILED, FAILED),
    30: (PARTIAL, None, None),  # the current run, still in pg_basebackup
}


def make_month(backup_dir):
    for day in range(1, 31):
        statuses = MONTH_STATUS.get(day, (DONE, DONE, DONE))
        for kind, status in zip(("postgres", "contentstore", "config"), statuses):
            if status is not None:
                make(backup_dir, kind, night(day), status=status)


def test_a_month_of_nightly_runs(tmp_path):
    make_month(tmp_path)
    entries = retention.collect(str(tmp_path))
    assert sum(len(v) for v in entries.values()) == 88

    # Before the week of failures: the morning after night 23, a plain 7-day window.
    before = {k: [e for e in v if e.taken_at <= night(23)] for k, v in entries.items()}
    plan = retention.plan_retention(before, night(24) + HOUR / 2, retention_days=7)
    assert kept_names(plan) == sorted(names("postgres", *[night(d) for d in (18, 19, 20, 21, 22, 23)])
                                      + names("contentstore", *[night(d) for d in (18, 19, 20, 21, 23)])
                                      + names("config", *[night(d) for d in range(18, 24)]))

    # Night 30, 02:30: six failed nights and the current run in progress. Nothing good is lost.
    now = night(30) + HOUR / 2
    current = {catalog.backup_name("postgres", night(30))}
    plan = retention.plan_retention(entries, now, retention_days=7, current_names=current)
    expected = sorted(names("postgres", night(23), night(30))
                      + names("contentstore", *[night(d) for d in (23, 24, 25, 26, 27)])
                      + names("config", night(23)))
    assert kept_names(plan) == expected
    by_name = decisions_by_name(plan)
    assert "paired contentstore snapshot" in by_name[catalog.backup_name("contentstore", night(23))].reason
    assert plan.wal_keep_from == by_name[catalog.backup_name("postgres", night(23))].entry.info["start_wal_file"]

    plan = retention.plan_retention(entries, now, retention_days=7, min_count=2, current_names=current)
    expected = sorted(names("postgres", night(22), night(23), night(30))
                      + names("contentstore", *[night(d) for d in (23, 24, 25, 26, 27)])
                      + names("config", night(22), night(23)))
    assert kept_names(plan) == expected
    # base 22's snapshot failed: it pairs with the next DONE one (night 23), not the older night 21.
    by_name = decisions_by_name(plan)
    assert by_name[catalog.backup_name("contentstore", night(21))].action == "delete"
    bases = ", ".join(names("postgres", night(22), night(23)))
    assert by_name[catalog.backup_name("contentstore", night(23))].reason == (
        f"paired contentstore snapshot of kept base backup {bases}")
    assert plan.wal_keep_from == decisions_by_name(plan)[catalog.backup_name("postgres", night(22))].entry.info[
        "start_wal_file"]

    result = retention.apply_plan(plan, logging.getLogger("test"))
    assert result.failed == []
    assert sorted(result.deleted) == deleted_names(plan)
    after = retention.collect(str(tmp_path))
    assert sorted(e.name for v in after.values() for e in v) == expected
    # On disk, only the kept directories and the kept DONE/current metadata remain.
    left = sorted(n for kind in catalog.KINDS for n in os.listdir(os.path.join(str(tmp_path), kind)))
    finished = [n for n in expected if n not in current]
    assert left == sorted(finished + [n + ".json" for n in finished] + [n + ".partial" for n in current])
    # The plan is stable: a second run deletes nothing.
    again = retention.plan_retention(after, now, retention_days=7, min_count=2, current_names=current)
    assert again.to_delete() == []


def assert_nothing_done_looking(backup_dir, name):
    for kind in catalog.KINDS:
        for entry in catalog.list_backups(backup_dir, kind):
            if entry.name == name:
                assert entry.status != DONE
    for kind in catalog.KINDS:
        assert name not in [e.name for e in catalog.done_backups(backup_dir, kind)]


def test_apply_plan_deletes_directory_and_metadata(tmp_path, caplog):
    old = make(tmp_path, "contentstore", NOW - 30 * DAY)
    failed = make(tmp_path, "contentstore", NOW - 20 * DAY, status=FAILED)
    keep = make(tmp_path, "contentstore", NOW - DAY)
    plan = retention.plan_retention(retention.collect(str(tmp_path)), NOW, 7)
    with caplog.at_level(logging.INFO):
        result = retention.apply_plan(plan, logging.getLogger("test"))
    assert sorted(result.deleted) == sorted([os.path.basename(old), os.path.basename(failed)])
    assert result.failed == [] and result.seconds >= 0
    for path in (old, failed):
        assert not os.path.lexists(path) and not os.path.lexists(path + ".partial")
        assert not os.path.lexists(catalog.info_path(path))
    assert os.path.isdir(keep) and os.path.isfile(catalog.info_path(keep))
    assert os.path.basename(old) in caplog.text


@pytest.mark.parametrize("steps", ["rename", "rename+metadata", "rename+metadata+half"])
def test_interrupted_delete_never_looks_done_and_is_cleaned_next_time(tmp_path, steps):
    victim = make(tmp_path, "postgres", NOW - 30 * DAY)
    make(tmp_path, "postgres", NOW - DAY)
    name = os.path.basename(victim)
    plan = retention.plan_retention(retention.collect(str(tmp_path)), NOW, 7)
    [entry] = plan.to_delete()
    # Run delete_entry's steps by hand and "crash" part way.
    path = retention.rename_to_partial(entry)
    assert path == victim + ".partial"
    assert_nothing_done_looking(str(tmp_path), name)
    if "metadata" in steps:
        retention.drop_metadata(entry)
        if "half" in steps:
            os.unlink(os.path.join(path, "data.bin"))
            shutil.rmtree(os.path.join(path, "sub", "deeper"))
    assert_nothing_done_looking(str(tmp_path), name)

    # Without the lock the leftover waits; with it, the next plan deletes it.
    assert retention.plan_retention(retention.collect(str(tmp_path)), NOW, 7, lock_free=False).to_delete() == []
    plan = retention.plan_retention(retention.collect(str(tmp_path)), NOW, 7)
    [decision] = [d for d in plan.decisions if d.action == "delete"]
    assert decision.entry.name == name
    assert decision.entry.status == PARTIAL
    assert decision.reason == "partial left by an interrupted run"
    result = retention.apply_plan(plan, logging.getLogger("test"))
    assert result.deleted == [name]
    assert retention.remove_orphan_metadata(str(tmp_path)) == []
    assert sorted(os.listdir(os.path.join(str(tmp_path), "postgres"))) == sorted(
        [catalog.backup_name("postgres", NOW - DAY), catalog.backup_name("postgres", NOW - DAY) + ".json"])


def test_metadata_whose_directory_is_gone_is_removed_and_nothing_else(tmp_path):
    kept = make(tmp_path, "config", NOW - DAY)
    partial = make(tmp_path, "config", NOW - 2 * DAY, status=PARTIAL)
    orphan = catalog.info_path(os.path.join(str(tmp_path), "config", catalog.backup_name("config", NOW - 3 * DAY)))
    for path in (orphan, orphan + ".tmp", catalog.info_path(partial)):
        with open(path, "w") as handle:
            handle.write("{}")
    foreign = os.path.join(str(tmp_path), "config", "config-notes.json")
    with open(foreign, "w") as handle:
        handle.write("{}")
    assert sorted(retention.remove_orphan_metadata(str(tmp_path))) == sorted(
        [os.path.basename(orphan), os.path.basename(orphan) + ".tmp"])
    for path in (catalog.info_path(kept), catalog.info_path(partial), foreign):
        assert os.path.isfile(path)


def test_renamed_partial_with_stale_metadata_is_not_done_and_is_cleaned(tmp_path):
    # A delete killed right after a rename but before the metadata went (a different order) must not
    # revive the backup either: a .partial directory is PARTIAL whatever its metadata says.
    victim = make(tmp_path, "config", NOW - 30 * DAY)
    make(tmp_path, "config", NOW - DAY)
    os.rename(victim, victim + ".partial")
    assert_nothing_done_looking(str(tmp_path), os.path.basename(victim))
    plan = retention.plan_retention(retention.collect(str(tmp_path)), NOW, 7)
    result = retention.apply_plan(plan, logging.getLogger("test"))
    assert result.deleted == [os.path.basename(victim)]
    assert not os.path.lexists(victim + ".partial") and not os.path.lexists(catalog.info_path(victim))


def test_format_lists_every_name_and_reason(tmp_path):
    make(tmp_path, "postgres", NOW - 30 * DAY)
    make(tmp_path, "postgres", NOW - 2 * DAY)
    make(tmp_path, "contentstore", NOW - 20 * DAY, status=FAILED)
    make(tmp_path, "contentstore", NOW - 25 * DAY, status=PARTIAL)
    plan = retention.plan_retention(retention.collect(str(tmp_path)), NOW, 7)
    text = plan.format()
    for decision in plan.decisions:
        assert decision.entry.name in text
        assert decision.reason in text
    assert "DELETE" in text and "KEEP" in text and "30.0" in text
    assert catalog.backup_name("contentstore", NOW - 25 * DAY) + ".partial" in text
    for warning in plan.warnings:
        assert warning in text
    assert plan.wal_keep_from in text


# ------------------------------------------------------------------------ permissions (as an ordinary user)


def run_as_nobody(func):
    """Run ``func()`` in a forked child with uid/gid nobody; return its JSON result or raise its error."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: whatever happens, report to the parent and never return into pytest
        payload = {"error": "child died"}
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            payload = {"result": func()}
        except Exception as exc:  # noqa: BLE001 - the parent re-raises it as a test failure
            payload = {"error": repr(exc)}
        finally:
            with os.fdopen(write_fd, "w") as handle:
                json.dump(payload, handle)
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as handle:
        data = handle.read()
    os.waitpid(pid, 0)
    payload = json.loads(data)
    if "error" in payload:
        raise AssertionError("child failed: " + payload["error"])
    return payload["result"]


@pytest.fixture
def nobody_dir():
    if os.geteuid() != 0:
        pytest.skip("needs root to create files another user cannot remove")
    base = tempfile.mkdtemp(prefix="retention-perm-")
    os.chown(base, NOBODY, NOBODY)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def chown_tree(path, uid):
    for root, dirs, files in os.walk(path):
        os.lchown(root, uid, uid)
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, uid)


def test_remove_tree_fixes_read_only_directories(nobody_dir):
    backup_dir = os.path.join(nobody_dir, "backups")
    outside = os.path.join(nobody_dir, "outside")
    os.makedirs(outside)
    with open(os.path.join(outside, "precious"), "w") as handle:
        handle.write("x")
    victim = make(backup_dir, "contentstore", NOW - 30 * DAY)
    make(backup_dir, "contentstore", NOW - DAY)
    os.symlink(outside, os.path.join(victim, "sub", "link-out"))
    chown_tree(nobody_dir, NOBODY)
    os.chmod(os.path.join(victim, "sub", "deeper"), 0o500)  # read-only: its files cannot be unlinked
    os.chmod(os.path.join(victim, "sub"), 0o000)  # not even listable
    os.chmod(victim, 0o500)

    def child():
        try:
            os.listdir(os.path.join(victim, "sub"))
        except PermissionError:
            pass
        else:
            return "child is privileged: the test would prove nothing"
        # Plain rmtree fails on this tree; that is what remove_tree's fixing is for.
        try:
            shutil.rmtree(victim)
        except PermissionError:
            pass
        else:
            return "plain rmtree succeeded"
        plan = retention.plan_retention(retention.collect(backup_dir), NOW, 7)
        result = retention.apply_plan(plan, logging.getLogger("test"))
        return {"deleted": result.deleted, "failed": result.failed}

    outcome = run_as_nobody(child)
    assert outcome == {"deleted": [os.path.basename(victim)], "failed": []}
    assert not os.path.lexists(victim) and not os.path.lexists(victim + ".partial")
    assert os.path.isfile(os.path.join(outside, "precious"))


def test_apply_plan_records_a_failure_and_goes_on(nobody_dir):
    backup_dir = os.path.join(nobody_dir, "backups")
    stuck = make(backup_dir, "config", NOW - 30 * DAY)
    other = make(backup_dir, "config", NOW - 20 * DAY)
    make(backup_dir, "config", NOW - DAY)
    chown_tree(nobody_dir, NOBODY)
    chown_tree(os.path.join(stuck, "sub"), 0)  # root's files inside: nobody cannot remove them

    def child():
        plan = retention.plan_retention(retention.collect(backup_dir), NOW, 7)
        result = retention.apply_plan(plan, logging.getLogger("test"))
        return {"deleted": result.deleted, "failed": [name for name, _error in result.failed],
                "errors": [error for _name, error in result.failed]}

    outcome = run_as_nobody(child)
    assert outcome["deleted"] == [os.path.basename(other)]
    assert outcome["failed"] == [os.path.basename(stuck)]
    assert "could not remove" in outcome["errors"][0]
    # What is left is PARTIAL, never DONE, and the next run (here as root) finishes the job.
    assert_nothing_done_looking(backup_dir, os.path.basename(stuck))
    plan = retention.plan_retention(retention.collect(backup_dir), NOW, 7)
    assert [(e.name, e.status) for e in plan.to_delete()] == [(os.path.basename(stuck), PARTIAL)]
    assert retention.apply_plan(plan, logging.getLogger("test")).deleted == [os.path.basename(stuck)]


def test_collect_lists_every_kind(tmp_path):
    make(tmp_path, "config", NOW)
    entries = retention.collect(str(tmp_path))
    assert sorted(entries) == sorted(catalog.KINDS)
    assert [e.name for e in entries["config"]] == [catalog.backup_name("config", NOW)]
    assert entries["postgres"] == [] and entries["contentstore"] == []
