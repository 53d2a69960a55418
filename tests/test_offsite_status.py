"""Pure parts of the off-site copy: the status assessment, the audit's comparison, manifests, names."""

import datetime
import gzip

import offsite
import offsite_audit
import offsite_listing
import offsite_status

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.timezone.utc)


def facts(**values):
    base = dict.fromkeys(offsite_status.KEYS)
    base.update(remote="s3:b/p", pending_files=0, pending_bytes=0, wal_max_age_hours=2, backup_max_age_hours=50,
                newest_complete_base="base-x", newest_complete_base_ended_at="2026-12-01T02:00:00+00:00",
                newest_wal="000000010000000000000009", newest_wal_at="2026-12-01T11:30:00+00:00")
    base.update(values)
    return base


def test_assess_levels():
    assert offsite_status.assess(None, NOW) == []
    assert offsite_status.assess(facts(), NOW) == []
    stale_wal = offsite_status.assess(facts(newest_wal_at="2026-12-01T06:00:00+00:00"), NOW)
    assert [lvl for lvl, _r in stale_wal] == [1] and "6.0 h old" in stale_wal[0][1]
    old_base = offsite_status.assess(facts(newest_complete_base_ended_at="2026-11-28T00:00:00+00:00"), NOW)
    assert [lvl for lvl, _r in old_base] == [2]
    none_yet = offsite_status.assess(facts(newest_complete_base=None, newest_wal=None, newest_wal_at=None,
                                           pending_files=7, pending_bytes=2048), NOW)
    assert [lvl for lvl, _r in none_yet] == [2, 1] and "7 files, 2.0 KiB pending" in none_yet[0][1]
    failing = offsite_status.assess(facts(last_error="wal/x: connection refused"), NOW)
    assert failing == [(1, "the last off-site run failed: wal/x: connection refused")]
    assert "off-site RPO" in "\n".join(offsite_status.describe(facts(), NOW))


def test_the_published_keys_are_exactly_the_agreed_ones():
    assert offsite_status.KEYS == ("remote", "newest_complete_base", "newest_complete_base_ended_at", "newest_wal",
                                   "newest_wal_at", "pending_files", "pending_bytes", "last_run_at", "last_ok_at",
                                   "last_error")


def test_audit_compare():
    shipped = {"a": (3, "m1"), "b": (4, "m2"), "c": (5, None), "d": (6, "m4")}
    listing = {"a": (3, "m1"), "b": (4, "XX"), "c": (5, "zz"), "e": (1, None), "d": (7, None)}
    assert offsite_audit.compare(shipped, listing) == ([], ["b", "d"])
    assert offsite_audit.compare(shipped, {}) == (["a", "b", "c", "d"], [])


def test_manifest_is_deterministic_and_reads_back(tmp_path):
    files = [("2024/1/1/0/0/a.bin", 10), ("2024/1/1/0/0/b c.bin", 0)]
    first = offsite.write_manifest(str(tmp_path / "one"), "contentstore-x", files)
    second = offsite.write_manifest(str(tmp_path / "two"), "contentstore-x", files)
    assert open(first, "rb").read() == open(second, "rb").read()
    assert offsite.read_manifest(open(first, "rb").read()) == dict(files)
    assert gzip.decompress(open(first, "rb").read()).decode() == "2024/1/1/0/0/a.bin\t10\n2024/1/1/0/0/b c.bin\t0\n"


def test_names_rclone_lists_cannot_carry_are_not_shipped(tmp_path):
    for name in ("ok.bin", "new\nline.bin", "tab\there.bin"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "bad\udcff.bin".encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")).write_bytes(b"")
    files, skipped = offsite_listing.walk_files(str(tmp_path))
    assert files == [("ok.bin", 1)] and len(skipped) == 3


def test_setup_adds_the_five_minute_offsite_entry_beside_the_nightly_one_once():
    import setup_formats

    night = setup_formats.cron_entry("0 2 * * *", "/opt/a", "/opt/a/.venv/bin/python", "/opt/a/.env", "/var/log/ab")
    ship = setup_formats.offsite_cron_entry("/opt/a", "/opt/a/.venv/bin/python", "/opt/a/.env", "/var/log/ab")
    assert ship[1].startswith("*/5 * * * * cd '/opt/a' && ") and "backup.py --env '/opt/a/.env' --offsite" in ship[1]
    assert "offsite-$(date +\\%Y-\\%m-\\%d).log" in ship[1]
    text, _ = setup_formats.merge_crontab("MAILTO=x\n", *night)
    text, note = setup_formats.merge_crontab(text, *ship)
    assert note is None and text.count("backup.py") == 2 and text.startswith("MAILTO=x\n")
    assert setup_formats.merge_crontab(text, *ship) == (text, None)
    assert setup_formats.merge_crontab(text, *night) == (text, None)
