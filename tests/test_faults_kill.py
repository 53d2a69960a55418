"""Killed mid-run: SIGKILL at each stage of a real ``backup.py`` run, then the next run must succeed.

Each kill point freezes the run's whole process tree (faultkit.Run.stop_when) at a moment proven to be
inside the stage (the stage's tool is running and its ``.partial`` holds some but not all of the data),
then SIGKILLs every process of the tree at once, as a reboot would. After it: the next run exits 0, no
``.partial`` is left or used as a link base, retention counted no partial, the earlier DONE backups are
untouched, the WAL chain is whole and ``restore.py verify`` passes. KILL_POINTS lists them;
test_kill_point_count says how many were hit.

test_group_kill_leaves_no_orphans kills only the run's process group (``kill -9 -PGID``, a group-wide
timeout, the OOM killer taking backup.py alone): the children must not outlive it.
"""

import glob
import json
import os
import re
import signal
import time

import catalog
import faultkit
import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="runs backup.py as the service user (needs root)")]

KILL_POINTS = ("pg_basebackup", "contentstore first copy (rsync)", "contentstore nightly (linktree)",
               "contentstore nightly (rsync --link-dest)", "config copy", "retention delete",
               "waiting for WAL", "wal.py archive-push (PostgreSQL's archiver)")
HIT = set()
BIG_TABLE = "CREATE TABLE big AS SELECT g, repeat(md5(g::text), 20) AS t FROM generate_series(1, 300000) g"
MANY = 1500


def run_ok(sb, env_path):
    result = sb.run_cli("backup.py", env_path=env_path, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
    return result


def done_infos(sb):
    """{(kind, name): metadata} of every DONE backup."""
    return {(kind, e.name): e.info for kind in catalog.KINDS for e in faultkit.entries(sb, kind)
            if e.status == catalog.DONE}


def retention_rows(text):
    """(kind, name, status, action) of every retention plan row in a run's output."""
    rows = []
    for match in re.finditer(r"retention: (postgres|contentstore|config)\s+(\S+)\s+(\S+)\s+[-\d.]+\s+(KEEP|DELETE)",
                             text):
        rows.append(match.groups())
    return rows


def newest(sb, kind):
    done = [e for e in faultkit.entries(sb, kind) if e.status == catalog.DONE]
    return done[-1]


def assert_recovers(sb, env_path, before, expect_link_dest=True, survivors=None):
    """The run after a kill: exit 0, nothing partial left or used, earlier DONE backups (``before``, or
    only the ``survivors`` among them) intact, a whole WAL chain, the snapshot equal to the source,
    restore.py verify passing. Returns the run's result."""
    done_snaps = {e.name for e in faultkit.entries(sb, "contentstore") if e.status == catalog.DONE}
    result = run_ok(sb, env_path)
    out = result.stdout
    assert "Backup summary (OK)" in out, out[-3000:]
    assert not faultkit.partials(sb.backup_dir), faultkit.partials(sb.backup_dir)
    for kind in catalog.KINDS:
        for entry in faultkit.entries(sb, kind):
            # WAITING_FOR_WAL may remain only from the killed run (younger than a day: kept, never counted).
            assert entry.status in (catalog.DONE, catalog.WAITING_FOR_WAL), (kind, entry)
    # Retention never counted a partial as a survivor.
    rows = retention_rows(out)
    assert rows, out[-3000:]
    for kind, name, status, action in rows:
        if status not in (catalog.DONE, catalog.WAITING_FOR_WAL) or name.endswith(".partial"):
            assert action == "DELETE", (kind, name, status, action)
    # Earlier DONE backups are untouched (same metadata, still DONE).
    after = done_infos(sb)
    for key, info in before.items():
        if survivors is None or key in survivors:
            assert after.get(key) == info, key
    # The new snapshot's link base is a DONE snapshot that existed before this run; never a partial.
    snap = newest(sb, "contentstore")
    if expect_link_dest:
        assert snap.info["link_dest"] in done_snaps, (snap.info, done_snaps)
    assert not (snap.info.get("link_dest") or "").endswith(".partial")
    expected = faultkit.tree_state(sb.contentstore_dir)
    actual = faultkit.tree_state(snap.path)
    assert actual == expected, faultkit.diff_trees(expected, actual)
    status = json.loads(sb.run_cli("backup.py", args=["--status", "--json"], env_path=env_path).stdout)
    assert status["facts"]["chain"]["ok"], status["facts"]["chain"]
    verify = faultkit.restore_verify(sb, env_path)
    if verify is not None:
        assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr
        assert newest(sb, "postgres").name in verify.stdout
    return result


def kill_at(sb, env_path, predicate, pre=None, extra_env=None, timeout=300):
    """Start backup.py, freeze it where ``predicate`` holds, SIGKILL the whole tree. Returns (run, killed
    procs, output). Fails the test when the run ended before the point was reached."""
    run = faultkit.Run(sb, env_path, extra_env=extra_env)
    try:
        hit = run.stop_when(predicate, timeout=timeout, pre=pre)
        assert hit, "the run ended before the kill point (exit %s):\n%s" % (run.proc.poll(), run.output()[-3000:])
        procs = run.kill_tree()
    finally:
        run.cleanup()
    assert run.proc.returncode == -signal.SIGKILL
    return run, procs, run.output()


def partial_of(sb, kind):
    found = glob.glob(os.path.join(sb.backup_dir, kind, catalog.KINDS[kind] + "-*.partial"))
    return found[0] if found else None


# ------------------------------------------------------------------------------------------- kill points

def test_kill_during_pg_basebackup(sandbox):
    sb = sandbox
    env_path = sb.write_env()
    run_ok(sb, env_path)
    sb.psql(BIG_TABLE)
    before = done_infos(sb)

    def inside(run, procs):
        partial = partial_of(sb, "postgres")
        return faultkit.has_comm(procs, "pg_basebackup") and partial and faultkit.dir_bytes(partial) > 0

    _run, procs, output = kill_at(sb, env_path, inside, pre=lambda run: partial_of(sb, "postgres"))
    assert faultkit.has_comm(procs, "pg_basebackup")
    HIT.add("pg_basebackup")
    # Nothing of the killed run looks like a backup; the server keeps no slot for the dead client.
    assert not [e for e in faultkit.entries(sb, "postgres") if e.status != catalog.PARTIAL
                and (("postgres", e.name) not in before)]
    deadline = time.monotonic() + 60
    while sb.psql("SELECT count(*) FROM pg_replication_slots", user="postgres") != "0":
        assert time.monotonic() < deadline, "a replication slot outlived the killed pg_basebackup"
        time.sleep(0.5)
    left = os.path.basename(partial_of(sb, "postgres"))
    result = assert_recovers(sb, env_path, before)
    # Retention saw the killed run's partial for what it is, and deleted it.
    assert ("postgres", left, catalog.PARTIAL, "DELETE") in retention_rows(result.stdout)


def test_kill_during_first_contentstore_rsync(sandbox):
    sb = sandbox
    sb.add_content(MANY, size=16 * 1024)
    env_path = sb.write_env(CONTENTSTORE_METHOD="rsync")
    total = faultkit.count_files(sb.contentstore_dir)

    def inside(run, procs):
        partial = partial_of(sb, "contentstore")
        return faultkit.has_comm(procs, "rsync") and partial and 0 < faultkit.count_files(partial) < total

    _run, procs, output = kill_at(sb, env_path, inside, pre=lambda run: partial_of(sb, "contentstore"))
    HIT.add("contentstore first copy (rsync)")
    left = partial_of(sb, "contentstore")
    assert left and not [e for e in faultkit.entries(sb, "contentstore") if e.status == catalog.DONE]
    result = assert_recovers(sb, env_path, {}, expect_link_dest=False)
    snap = newest(sb, "contentstore")
    # The interrupted first copy was reused (not started from zero) but never taken for a link base.
    assert snap.info["resumed_partial"] is True and snap.info["link_dest"] is None, snap.info
    assert "reusing %s" % left in result.stdout


@pytest.mark.parametrize("method", ["auto", "rsync"])
def test_kill_during_nightly_snapshot(sandbox, method):
    sb = sandbox
    env_path = sb.write_env(CONTENTSTORE_METHOD=method)
    run_ok(sb, env_path)
    first = newest(sb, "contentstore")
    first_state = faultkit.tree_state(first.path)
    sb.add_content(MANY, date=(2025, 6, 1, 12, 0), size=16 * 1024)
    before = done_infos(sb)
    total = faultkit.count_files(sb.contentstore_dir)
    tool = "rsync" if method == "rsync" else None

    def inside(run, procs):
        partial = partial_of(sb, "contentstore")
        if not partial or (tool and not faultkit.has_comm(procs, tool)):
            return False
        if not tool and faultkit.has_comm(procs, "rsync"):
            return False
        return first.info["files"] < faultkit.count_files(partial) < total

    _run, _procs, output = kill_at(sb, env_path, inside, pre=lambda run: partial_of(sb, "contentstore"))
    HIT.add("contentstore nightly (linktree)" if method == "auto" else "contentstore nightly (rsync --link-dest)")
    assert ("snapshot engine: %s" % ("linktree" if method == "auto" else "rsync")) in output
    assert_recovers(sb, env_path, before)
    snap = newest(sb, "contentstore")
    assert snap.info["link_dest"] == first.name and snap.info["resumed_partial"] is True, snap.info
    # The earlier snapshot is intact and unchanged files are still shared with it (hardlinks).
    assert faultkit.tree_state(first.path) == first_state
    old_file = sorted(sb.content_files())[0]
    assert os.stat(os.path.join(first.path, old_file)).st_ino == os.stat(os.path.join(snap.path, old_file)).st_ino


def test_kill_during_config_copy(sandbox):
    sb = sandbox
    env_path = sb.write_env()
    many = os.path.join(sb.alf_base_dir, "tomcat/shared/classes/alfresco/extension/many")
    os.mkdir(many)
    for i in range(3000):  # a big extension directory, so that the copy lasts long enough to be hit
        with open(os.path.join(many, "bean-%04d.xml" % i), "w") as handle:
            handle.write("<beans/>\n")
    sb.chown_to_service_user(many)
    run_ok(sb, env_path)
    before = done_infos(sb)

    def inside(run, procs):
        partial = partial_of(sb, "config")
        return partial and 0 < faultkit.count_files(partial) < 3000

    _run, _procs, output = kill_at(sb, env_path, inside, pre=lambda run: partial_of(sb, "config"))
    HIT.add("config copy")
    left = os.path.basename(partial_of(sb, "config"))
    result = assert_recovers(sb, env_path, before)
    assert ("config", left, catalog.PARTIAL, "DELETE") in retention_rows(result.stdout)
    copy = newest(sb, "config")
    assert faultkit.count_files(os.path.join(copy.path, "extension", "many")) == 3000
    assert sorted(copy.info["items"]) == ["alfresco-global.properties", "extension", "keystore"]


def test_kill_during_retention_deletes(sandbox):
    sb = sandbox
    sb.add_content(MANY, size=16 * 1024)
    env_path = sb.write_env(RETENTION_DAYS=7)
    for night in range(2):
        sb.add_content(200, date=(2025, 7, 1 + night, 1, 1), size=4096)
        run_ok(sb, env_path)
    aged = {}
    for kind in catalog.KINDS:
        names = [e.name for e in faultkit.entries(sb, kind)]
        assert len(names) == 2
        for name, days in zip(names, (20, 10)):
            aged[(kind, faultkit.age_backup(sb, kind, name, days))] = True
    aged_snaps = [name for kind, name in aged if kind == "contentstore"]

    def inside(run, procs):
        return any(os.path.isdir(os.path.join(sb.backup_dir, "contentstore", n + ".partial")) for n in aged_snaps)

    _run, procs, output = kill_at(sb, env_path, inside,
                                  pre=lambda run: "== retention" in run.output())
    HIT.add("retention delete")
    assert "== retention" in output
    # Killed mid-delete: the snapshot being deleted reads PARTIAL (its metadata went first), never DONE.
    states = {e.name: e.status for e in faultkit.entries(sb, "contentstore")}
    assert any(states.get(n) == catalog.PARTIAL for n in aged_snaps), states
    before = done_infos(sb)
    survivors = {key for key in before if key not in aged}
    assert_recovers(sb, env_path, before, survivors=survivors)
    for kind, name in aged:
        assert not os.path.exists(os.path.join(sb.backup_dir, kind, name)), name
        assert not os.path.exists(os.path.join(sb.backup_dir, kind, name + ".json")), name
    for key in survivors:
        assert os.path.isdir(os.path.join(sb.backup_dir, key[0], key[1])), key


def test_kill_while_waiting_for_wal(sandbox):
    sb = sandbox
    env_path = sb.write_env(WAL_WAIT_TIMEOUT=300)
    run_ok(sb, env_path)
    before = done_infos(sb)
    os.chmod(sb.wal_archive_dir, 0o500)  # archive_command fails: the run waits for the base backup's WAL
    try:
        _run, _procs, output = kill_at(sb, env_path, lambda run, procs: True,
                                       pre=lambda run: "== wal_archive" in run.output())
    finally:
        os.chmod(sb.wal_archive_dir, 0o700)
    HIT.add("waiting for WAL")
    waiting = [e for e in faultkit.entries(sb, "postgres") if e.status == catalog.WAITING_FOR_WAL]
    assert len(waiting) == 1, faultkit.entries(sb, "postgres")
    sb.psql("SELECT pg_switch_wal()", user="postgres")  # wake the archiver instead of its 60 s back-off
    assert_recovers(sb, env_path, before)
    # The killed run's base backup never became a restore source or a counted survivor.
    assert newest(sb, "postgres").name != waiting[0].name
    status = json.loads(sb.run_cli("backup.py", args=["--status", "--json"], env_path=env_path).stdout)
    assert status["state"] in ("OK", "WARNING"), status


def _catch_push(sb, segment, timeout=30):
    """SIGKILL wal.py archive-push of ``segment`` while its temp copy exists. Returns (temp name, size it
    had reached) or None when the push finished first."""
    final = os.path.join(sb.wal_archive_dir, segment)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not os.path.exists(final):
        for pid in faultkit.procs_mentioning(sb.wal_archive_dir):
            argv = faultkit.cmdline(pid)
            # The python process itself (not the /bin/sh -c wrapper, whose argv is one string).
            if b"archive-push" not in argv or not any(segment.encode() in a for a in argv):
                continue
            temp = os.path.join(sb.wal_archive_dir, ".%s.tmp.%d" % (segment, pid))
            if not faultkit.signal_pid(pid, signal.SIGSTOP):
                continue
            try:
                for _step in range(20000):  # step the process until its temp copy exists
                    size = os.path.getsize(temp) if os.path.exists(temp) else 0
                    if 0 < size < 16 * 1024 * 1024:  # mid-copy: some bytes written, not all
                        os.kill(pid, signal.SIGKILL)
                        return os.path.basename(temp), size
                    if not faultkit.alive(pid) or os.path.exists(final):
                        break
                    faultkit.signal_pid(pid, signal.SIGCONT)
                    time.sleep(0.0002)
                    faultkit.signal_pid(pid, signal.SIGSTOP)
            finally:
                faultkit.signal_pid(pid, signal.SIGCONT)
        time.sleep(0.0005)
    return None


def test_kill_archive_push_while_it_copies(sandbox):
    """PostgreSQL's archiver runs wal.py archive-push; SIGKILL it while the segment is being copied."""
    sb = sandbox
    env_path = sb.write_env()
    run_ok(sb, env_path)
    before = done_infos(sb)
    hit = None
    for attempt in range(20):
        sb.psql("INSERT INTO alf_node SELECT 100000 + g, 'x', 1, 'x' FROM generate_series(%d, %d) g"
                % (attempt * 100, attempt * 100 + 99))
        segment = sb.psql("SELECT pg_walfile_name(pg_switch_wal())", user="postgres")
        hit = _catch_push(sb, segment)
        if hit:
            break
    assert hit, "never caught wal.py archive-push in the middle of its copy"
    HIT.add("wal.py archive-push (PostgreSQL's archiver)")
    temp, size = hit
    print("archive-push of %s killed after %d bytes of its temp copy (attempt %d)" % (segment, size, attempt + 1))
    # No half segment under the real name; the archiver retries and the retry cleans the temp file.
    final = os.path.join(sb.wal_archive_dir, segment)
    if os.path.exists(final):
        assert os.path.getsize(final) == 16 * 1024 * 1024
    # The postmaster restarts the aborted archiver (at most every 10 s) when its loop wakes: connections do.
    deadline = time.monotonic() + 120
    while not os.path.exists(final) and time.monotonic() < deadline:
        sb.psql("SELECT 1")
        time.sleep(1)
    assert os.path.exists(final), "the segment was never archived after the kill"
    assert os.path.getsize(final) == 16 * 1024 * 1024
    source = os.path.join(sb.pgdata, "pg_wal", segment)
    if os.path.exists(source):  # not yet recycled by a checkpoint
        with open(source, "rb") as mine, open(final, "rb") as archived:
            assert mine.read() == archived.read()
    deadline = time.monotonic() + 60
    while os.path.exists(os.path.join(sb.wal_archive_dir, temp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(os.path.join(sb.wal_archive_dir, temp)), "the killed push's temp file stayed"
    assert_recovers(sb, env_path, before)


def test_kill_point_count():
    """How many kill points were tried (all of them when this file runs whole)."""
    print("kill points tried: %d of %d: %s" % (len(HIT), len(KILL_POINTS), ", ".join(sorted(HIT))))
    if len(HIT) < len(KILL_POINTS):
        pytest.skip("only %d of %d kill points ran in this session (run the whole file)"
                    % (len(HIT), len(KILL_POINTS)))
    assert HIT == set(KILL_POINTS) and len(KILL_POINTS) == 8


# ------------------------------------------------------------------------------------------- group kill

def test_group_kill_leaves_no_orphans(sandbox):
    sb = sandbox
    env_path = sb.write_env()
    sb.psql(BIG_TABLE)
    run = faultkit.Run(sb, env_path)
    orphans = []
    try:
        def inside(run, procs):
            partial = partial_of(sb, "postgres")
            return faultkit.has_comm(procs, "pg_basebackup") and partial and faultkit.dir_bytes(partial) > 0

        assert run.stop_when(inside, pre=lambda run: partial_of(sb, "postgres")), run.output()[-2000:]
        procs = run.kill_group()  # kill -9 -PGID: what a group-wide timeout or an admin's kill does
        time.sleep(5)
        orphans = [pid for pid, info in procs.items() if faultkit.alive(pid) and info["comm"] == "pg_basebackup"]
        slots = sb.psql("SELECT count(*) FROM pg_replication_slots WHERE active", user="postgres")
        assert not orphans and slots == "0", "still running 5 s after the kill: %s; active slots: %s" % (
            orphans, slots)
    finally:
        for pid in orphans:
            faultkit.signal_pid(pid, signal.SIGKILL)
        run.cleanup()
