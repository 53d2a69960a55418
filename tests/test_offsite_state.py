"""offsite_state.py: the local record of what is off-site (sqlite, 0600, tied to one remote)."""

import os
import stat

import offsite_state
import pytest


def test_queue_ship_and_pending(tmp_path):
    with offsite_state.State(str(tmp_path), "s3:b/p") as state:
        state.queue([("wal/A", 10, "/a/A"), ("wal/B", 20, "/a/B")])
        state.queue([("content/1/x.bin", 5, "contentstore-1")], first_set="contentstore-1")
        state.queue([("content/1/x.bin", 5, "contentstore-2")], first_set="contentstore-2")  # known: kept as is
        assert [r[0] for r in state.pending("wal/")] == ["wal/A", "wal/B"]
        assert state.pending("content/")[0][2:] == ("contentstore-1", "contentstore-1")
        state.mark_shipped("wal/A", "abc")
        assert state.is_shipped("wal/A") and not state.is_shipped("wal/B")
        assert state.pending_totals() == (2, 25)
        assert state.pending_up_to("contentstore-1") == 1 and state.pending_up_to("contentstore-0") == 0
        state.mark_lost("content/1/x.bin")
        assert state.lost_in("contentstore-1") == ["content/1/x.bin"] and state.pending_totals() == (1, 20)
        assert state.shipped_objects("wal/") == {"wal/A": (10, "abc")}
        state.mark_unshipped(["wal/A"])
        assert not state.is_shipped("wal/A")
        run = state.start_run("ship")
        state.end_run(run, False, 0, 0, "boom")
        assert state.last_runs()[1:] == (None, "boom")
    assert stat.S_IMODE(os.stat(offsite_state.path_of(str(tmp_path))).st_mode) == 0o600


def test_a_record_of_another_remote_is_refused(tmp_path):
    offsite_state.State(str(tmp_path), "s3:b/p").close()
    with pytest.raises(offsite_state.StateError, match="OFFSITE_REMOTE is now s3:other"):
        offsite_state.State(str(tmp_path), "s3:other")


def test_a_planted_symlink_is_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("")
    os.symlink(str(target), offsite_state.path_of(str(tmp_path)))
    with pytest.raises(OSError, match="symbolic link"):
        offsite_state.State(str(tmp_path), "s3:b/p")
