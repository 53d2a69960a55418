"""metrics.py: the Prometheus text (parsed by prometheus_client's own parser), the atomic file writes and the
status document kept between runs and --status."""

import json
import os
import stat
import types

import pytest
from prometheus_client.parser import text_string_to_metric_families

import metrics

T0 = "2024-05-01T02:00:00+00:00"


def parse(text):
    """{sample name: [(labels, value)]} from Prometheus text; fails on anything the real parser rejects."""
    samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("alfresco_backup_"), family.name
        assert family.documentation, family.name
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples, name, **labels):
    found = [v for lab, v in samples[name] if all(lab.get(k) == want for k, want in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def document(**overrides):
    doc = {
        "installation": 'cust "7" \\ east', "host": "alf1", "generated_at": "2024-05-01T02:10:00+00:00",
        "state": "WARNING", "reasons": ["WARNING: something"],
        "window": {"from": "2024-04-24T02:05:00+00:00", "to": "2024-05-01T02:09:00+00:00"},
        "facts": {
            "backups": {
                "postgres": {"done_count": 7, "total_count": 8, "newest": "base-x",
                             "newest_ended_at": "2024-05-01T02:05:00+00:00", "newest_size_bytes": 4096,
                             "oldest_ended_at": "2024-04-24T02:05:00+00:00"},
                "contentstore": {"done_count": 0, "total_count": 1, "newest": None, "newest_ended_at": None,
                                 "newest_size_bytes": None, "oldest_ended_at": None}},
            "archive_segments": 50, "newest_segment_at": "2024-05-01T02:09:00+00:00", "backlog": 2,
            "chain": {"ok": False, "gaps": [["A", "B"]]},
            "archiver": {"archived_count": 120, "failed_count": 3, "last_archived_wal": "A",
                         "last_archived_time": "2024-05-01T02:09:00+00:00", "last_failed_wal": "B",
                         "last_failed_time": "2024-05-01T02:09:30+00:00"}},
        "last_run": {"started_at": T0, "ended_at": "2024-05-01T02:08:20.500000+00:00", "duration_seconds": 500.5,
                     "exit_code": 1, "result": "FAILED",
                     "stages": [{"name": "postgres", "status": "FAILED", "duration_seconds": 12.5},
                                {"name": "contentstore", "status": "WARN", "duration_seconds": 480.0}],
                     "sizes": {"database_backup_bytes": 4096, "contentstore_copied_bytes": 10,
                               "contentstore_linked_bytes": 3000, "contentstore_files": 40}},
        "last_success_at": "2024-04-30T02:09:00+00:00",
    }
    doc.update(overrides)
    return doc


def test_a_failed_night_renders_every_metric_with_the_installation_label():
    text = metrics.render(document(), now=1714529400.0)
    samples = parse(text)
    for name, rows in samples.items():
        for labels, _value in rows:
            assert labels["installation"] == 'cust "7" \\ east', name
        assert "timestamp" not in name or name.endswith("_timestamp_seconds"), name
        assert "bytes" not in name or name.endswith("_bytes"), name
        assert "duration" not in name or name.endswith("_duration_seconds"), name
    assert value(samples, "alfresco_backup_status") == 1
    assert value(samples, "alfresco_backup_last_run_exit_code") == 1
    assert value(samples, "alfresco_backup_last_run_success") == 0
    assert value(samples, "alfresco_backup_last_run_start_timestamp_seconds") == 1714528800.0
    assert value(samples, "alfresco_backup_last_run_end_timestamp_seconds") == 1714529300.5
    assert value(samples, "alfresco_backup_last_success_timestamp_seconds") == 1714442940.0
    assert value(samples, "alfresco_backup_stage_status", stage="postgres", status="FAILED") == 1
    assert value(samples, "alfresco_backup_stage_status", stage="postgres", status="OK") == 0
    assert value(samples, "alfresco_backup_stage_status", stage="contentstore", status="WARN") == 1
    assert value(samples, "alfresco_backup_stage_duration_seconds", stage="contentstore") == 480.0
    assert value(samples, "alfresco_backup_last_run_contentstore_linked_bytes") == 3000
    assert value(samples, "alfresco_backup_last_run_database_backup_bytes") == 4096
    assert value(samples, "alfresco_backup_newest_complete_timestamp_seconds", kind="postgres") == 1714529100.0
    newest = samples["alfresco_backup_newest_complete_timestamp_seconds"]
    assert "contentstore" not in [labels["kind"] for labels, _ in newest]
    assert value(samples, "alfresco_backup_complete_backups", kind="contentstore") == 0
    assert value(samples, "alfresco_backup_wal_ready_segments") == 2
    assert value(samples, "alfresco_backup_wal_chain_ok") == 0 and value(samples, "alfresco_backup_wal_chain_gaps") == 1
    assert value(samples, "alfresco_backup_archiver_failing") == 1
    assert value(samples, "alfresco_backup_archiver_failed_total") == 3
    assert value(samples, "alfresco_backup_recovery_window_seconds") == 7 * 86400 + 240
    assert value(samples, "alfresco_backup_info", host="alf1") == 1
    assert "alfresco_backup_offsite_lag_seconds" not in samples  # no off-site facts: no off-site metrics
    assert "# TYPE alfresco_backup_archiver_failed_total counter" in text


def test_offsite_facts_render_lag_and_backlog():
    doc = document()
    doc["facts"]["offsite"] = {
        "remote": "s3:backups/alf1", "newest_complete_base": "base-y",
        "newest_complete_base_ended_at": "2024-04-30T02:05:00+00:00", "newest_wal": "0000000100000000000000A0",
        "newest_wal_at": "2024-05-01T01:09:00+00:00", "pending_files": 12, "pending_bytes": 5 << 20,
        "last_run_at": "2024-05-01T02:30:00+00:00", "last_ok_at": "2024-04-30T02:30:00+00:00",
        "last_error": "rclone: 403 Forbidden"}
    samples = parse(metrics.render(doc))
    remote = {"remote": "s3:backups/alf1"}
    assert value(samples, "alfresco_backup_offsite_lag_seconds", what="base", **remote) == 86400
    assert value(samples, "alfresco_backup_offsite_lag_seconds", what="wal", **remote) == 3600
    assert value(samples, "alfresco_backup_offsite_pending_bytes", **remote) == 5 << 20
    assert value(samples, "alfresco_backup_offsite_pending_files", **remote) == 12
    assert value(samples, "alfresco_backup_offsite_error", **remote) == 1
    assert value(samples, "alfresco_backup_offsite_last_success_timestamp_seconds", **remote) == 1714444200.0
    # Nothing off site yet: no lag can be computed, the rest is still there.
    doc["facts"]["offsite"].update(newest_complete_base=None, newest_complete_base_ended_at=None, newest_wal=None,
                                   newest_wal_at=None, last_error=None)
    samples = parse(metrics.render(doc))
    assert "alfresco_backup_offsite_lag_seconds" not in samples
    assert value(samples, "alfresco_backup_offsite_error", **remote) == 0


def test_an_empty_document_still_parses_and_says_there_is_no_window():
    samples = parse(metrics.render({"installation": "x", "state": "CRITICAL", "facts": {}, "window": None}))
    assert value(samples, "alfresco_backup_recovery_window_seconds") == 0
    assert value(samples, "alfresco_backup_archiver_up") == 0
    assert "alfresco_backup_last_run_exit_code" not in samples


def test_write_atomic_is_world_readable_under_umask_077_and_replaces_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    target = tmp_path / "alfresco_backup.prom"
    os.symlink(str(victim), str(target))
    old = os.umask(0o077)
    try:
        metrics.write_atomic(str(target), "a 1\n", 0o644)
    finally:
        os.umask(old)
    assert victim.read_text() == "keep me"
    assert not os.path.islink(str(target)) and target.read_text() == "a 1\n"
    assert stat.S_IMODE(os.stat(str(target)).st_mode) == 0o644
    assert sorted(os.listdir(str(tmp_path))) == ["alfresco_backup.prom", "victim"]
    # A stale temporary file of a killed run with the same PID is replaced, never written through.
    stale = tmp_path / (".alfresco_backup.prom.%d.tmp" % os.getpid())
    os.symlink(str(victim), str(stale))
    metrics.write_atomic(str(target), "a 2\n", 0o644)
    assert victim.read_text() == "keep me" and target.read_text() == "a 2\n" and not os.path.lexists(str(stale))


def cfg(tmp_path, **overrides):
    values = {"BACKUP_DIR": str(tmp_path / "backups"), "METRICS_FILE": str(tmp_path / "m.prom"),
              "INSTALLATION_NAME": "acme", "BACKUP_MAX_AGE_HOURS": 26, "WAL_MAX_AGE_HOURS": 26}
    values.update(overrides)
    return types.SimpleNamespace(**values)


def test_publish_keeps_the_last_run_for_status_and_the_last_success_for_a_failed_run(tmp_path):
    c = cfg(tmp_path)
    os.mkdir(c.BACKUP_DIR, 0o700)
    warnings = []
    good = {"started_at": T0, "ended_at": "2024-05-01T02:05:00+00:00", "exit_code": 0, "stages": []}
    metrics.publish(c, {"state": "OK", "facts": {}}, warnings.append, last_run=good)
    status_path = os.path.join(c.BACKUP_DIR, "status.json")
    assert stat.S_IMODE(os.stat(status_path).st_mode) == 0o600
    doc = metrics.publish(c, {"state": "WARNING", "facts": {}}, warnings.append)  # what --status does
    assert doc["last_run"] == good and doc["last_success_at"] == good["ended_at"] and doc["state"] == "WARNING"
    bad = dict(good, ended_at="2024-05-02T02:05:00+00:00", exit_code=1)
    metrics.publish(c, {"state": "CRITICAL", "facts": {}}, warnings.append, last_run=bad)
    with open(status_path) as handle:
        on_disk = json.load(handle)
    assert on_disk["last_run"] == bad and on_disk["last_success_at"] == good["ended_at"]
    assert on_disk["installation"] == "acme"
    with open(c.METRICS_FILE) as handle:
        samples = parse(handle.read())
    assert value(samples, "alfresco_backup_last_run_success") == 0
    assert warnings == []


def test_publish_never_raises_and_says_what_it_could_not_write(tmp_path):
    c = cfg(tmp_path, METRICS_FILE=str(tmp_path / "missing-dir" / "m.prom"))
    warnings = []
    doc = metrics.publish(c, {"state": "OK", "facts": {}}, warnings.append)  # BACKUP_DIR does not exist yet
    assert doc["installation"] == "acme"
    assert len(warnings) == 1 and "METRICS_FILE" in warnings[0] and "missing-dir" in warnings[0]


@pytest.mark.parametrize("bad", ["[1, 2]", "{not json", ""])
def test_a_damaged_status_file_is_ignored(tmp_path, bad):
    c = cfg(tmp_path)
    os.mkdir(c.BACKUP_DIR, 0o700)
    with open(os.path.join(c.BACKUP_DIR, "status.json"), "w") as handle:
        handle.write(bad)
    doc = metrics.publish(c, {"state": "OK", "facts": {}}, lambda m: None)
    assert doc["last_run"] is None and doc["last_success_at"] is None
