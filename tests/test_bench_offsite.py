"""The off-site bench's log reading (bench/offsite_bench.py): where ours' time goes, from backup.py's log."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import offsite_bench  # noqa: E402

LOG = """2026-12-06 10:42:25,668 INFO [1] offsite: off-site shipping to s3test:x started (pid 1)
2026-12-06 10:42:25,780 INFO [1] offsite: running: rclone -vv copy /b/wal s3test:x/wal
2026-12-06 10:42:26,446 INFO [1] offsite: off-site: queued config config-1
2026-12-06 10:42:30,214 INFO [1] offsite: running: rclone -vv copy /b/postgres s3test:x/postgres
2026-12-06 10:42:31,676 INFO [1] offsite: running: rclone -vv copy /b/contentstore/cs-2 s3test:x/content
2026-12-06 10:43:50,000 INFO [1] offsite: off-site upload: 50000 files
2026-12-06 10:44:09,500 INFO [1] offsite: running: rclone -vv copy /b/contentstore/cs-1 s3test:x/content
2026-12-06 10:44:09,796 INFO [1] offsite: running: rclone -vv copy /b/config s3test:x/config
2026-12-06 10:44:09,955 INFO [1] offsite: running: rclone -vv copy /b/contentstore s3test:x/manifests
"""


def test_content_phases_time_the_content_runs_from_the_logs_first_line():
    before, content = offsite_bench.content_phases(LOG, "/b/contentstore")
    assert round(before, 3) == 6.008  # 10:42:25.668 -> 10:42:31.676
    assert round(content, 3) == 98.12  # both content runs, up to the configuration copies' run


def test_content_phases_none_without_a_content_upload_or_what_follows_it():
    assert offsite_bench.content_phases(LOG, "/elsewhere/contentstore") is None
    cut = LOG[:LOG.index("2026-12-06 10:44:09,796")]
    assert offsite_bench.content_phases(cut, "/b/contentstore") is None


def test_full_note_names_each_runs_phases():
    samples = [{"run": 0, "side": "ours", "seconds": 100.0, "before_content_s": 6.0, "content_s": 93.5, "nights": 5},
               {"run": 0, "side": "bare", "seconds": 95.0, "content_s": 92.0}]
    note = offsite_bench.full_note(samples)
    assert "5 nights" in note
    assert "ours 6.0 s before the content upload + 93.5 s upload + 0.5 s start-up and after" in note
    assert "bare 92.0 s snapshot copy + 3.0 s the rest" in note
