"""Off-site copy end to end: real PostgreSQL sandbox, real ``rclone serve s3`` on loopback, the real CLIs.

Shipping (``backup.py --offsite``): byte-identical remote after nights with new content, no DELETE and no
overwrite in the server's request log, a kill mid-upload resumed without re-sending, an unreachable remote
(the night still succeeds, the off-site run fails and mails, a later run catches up), the audit re-shipping a
corrupted object.
"""

import filecmp
import glob
import json
import os
import signal
import subprocess
import time

import pytest
from mailserver import MailServer

pytestmark = pytest.mark.slow


def run(sb, env, *args, timeout=600):
    return sb.run_cli("backup.py", list(args), env_path=env, timeout=timeout)


def ok(result):
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return result


def night(sb, env):
    ok(run(sb, env))
    time.sleep(1)


def local_objects(sb):
    """{remote key: local path} the off-site copy must hold after shipping everything."""
    expected = {}
    for kind in ("postgres", "config"):
        for meta in glob.glob(os.path.join(sb.backup_dir, kind, "*.json")):
            with open(meta) as handle:
                if json.load(handle)["status"] != "DONE":
                    continue
            name = os.path.basename(meta)[:-5]
            expected["%s/%s.json" % (kind, name)] = meta
            for dirpath, _dirs, names in os.walk(meta[:-5]):
                for item in names:
                    full = os.path.join(dirpath, item)
                    expected["%s/%s/%s" % (kind, name, os.path.relpath(full, meta[:-5]))] = full
    for name in os.listdir(sb.wal_archive_dir):
        if not name.startswith("."):
            expected["wal/" + name] = os.path.join(sb.wal_archive_dir, name)
    for rel in sb.content_files():
        expected["content/" + rel] = os.path.join(sb.contentstore_dir, rel)
    for meta in glob.glob(os.path.join(sb.backup_dir, "contentstore", "*.json")):
        expected["manifests/" + os.path.basename(meta)] = meta
    return expected


def assert_identical(sb, s3):
    remote = s3.objects()
    expected = local_objects(sb)
    missing = sorted(set(expected) - set(remote))
    assert not missing, missing[:20]
    different = [k for k, path in expected.items() if not filecmp.cmp(path, remote[k], shallow=False)]
    assert not different, different[:20]
    manifests = [k for k in remote if k.startswith("manifests/") and k.endswith(".tsv.gz")]
    assert len(manifests) == len(glob.glob(os.path.join(sb.backup_dir, "contentstore", "*.json")))
    return remote


def assert_only_adds(s3):
    """No DELETE request, and no object written twice (an overwrite), in the whole request log."""
    requests = s3.requests()
    assert not [r for r in requests if r[0].startswith("DELETE")], requests
    written = s3.writes()
    twice = sorted(k for k in set(written) if written.count(k) > 1)
    assert not twice, twice
    return requests


def test_nightly_runs_ship_a_byte_identical_copy_with_only_new_objects(sandbox, s3):
    sb = sandbox
    # One upload at a time: rclone serve s3 sometimes fails one of two PUTs racing into one directory ("Dir.Rename
    # error") after writing it, and the client's retry then writes the same object a second time.
    prom = os.path.join(sb.root, "alfresco_backup.prom")
    env = sb.write_env(OFFSITE_TRANSFERS=1, METRICS_FILE=prom, **s3.env())
    night(sb, env)
    ok(run(sb, env, "--offsite"))
    first = assert_identical(sb, s3)
    mark, written = s3.request_mark(), len(s3.writes())
    sb.add_content(5, date=(2024, 6, 2, 9, 15))
    summary = ok(run(sb, env)).stdout  # the night's summary (and mail) shows the off-site state
    assert "off-site copy %s:" % s3.env()["OFFSITE_REMOTE"] in summary
    assert "newest complete base backup base-" in summary
    time.sleep(1)
    shipped = ok(run(sb, env, "--offsite"))
    remote = assert_identical(sb, s3)
    assert len(remote) > len(first)
    requests = assert_only_adds(s3)
    # The second night sent only what was new: nothing that held objects before was listed (only new, empty
    # prefixes: the reachability probe's, tonight's base backup directory), one write per new object.
    later = requests[mark:]
    listed = [key.split("/", 2)[2] for op, key in later if op.startswith("LIST")]
    assert listed and not [p for p in listed if any(k.startswith(p) for k in first)], listed
    assert len(s3.writes()[written:]) == len(set(remote) - set(first))
    assert "off-site upload" in shipped.stdout
    # Nothing pending: a third run makes no request at all.
    mark = s3.request_mark()
    ok(run(sb, env, "--offsite"))
    assert s3.requests()[mark:] == []
    status = json.loads(run(sb, env, "--status", "--json").stdout)
    off = status["facts"]["offsite"]
    assert off["pending_files"] == 0 and off["last_error"] is None
    assert off["newest_complete_base"] == sorted(glob.glob(os.path.join(sb.backup_dir, "postgres", "base-*.json")))[
        -1].split("/")[-1][:-5]
    assert off["newest_wal"] and off["remote"] == s3.env()["OFFSITE_REMOTE"]
    # --status publishes the same state as Prometheus metrics (issue 14's off-site lag).
    from prometheus_client.parser import text_string_to_metric_families

    with open(prom) as handle:
        samples = {s.name: s.value for family in text_string_to_metric_families(handle.read())
                   for s in family.samples if s.name.startswith("alfresco_backup_offsite_")}
    assert samples["alfresco_backup_offsite_pending_files"] == 0 and samples["alfresco_backup_offsite_error"] == 0
    assert samples["alfresco_backup_offsite_newest_base_timestamp_seconds"] > 0
    assert "alfresco_backup_offsite_lag_seconds" in samples


def test_a_first_upload_of_several_nights_reads_content_from_the_newest_snapshot(sandbox, s3):
    """Content kept in several nights goes out in one rclone run from the newest snapshot; a file deleted
    before the newest night is read from a night that still has it, and every night's manifest is satisfied."""
    sb = sandbox
    env = sb.write_env(OFFSITE_TRANSFERS=1, **s3.env())
    night(sb, env)
    gone = sorted(sb.content_files())[0]
    sb.add_content(3, date=(2024, 6, 2, 9, 15))
    night(sb, env)
    os.unlink(os.path.join(sb.contentstore_dir, gone))  # e.g. Alfresco's content cleaner, after night two
    sb.add_content(2, date=(2024, 6, 3, 9, 15))
    night(sb, env)
    snapshots = sorted(p[:-5] for p in glob.glob(os.path.join(sb.backup_dir, "contentstore", "*.json")))
    assert len(snapshots) == 3
    shipped = ok(run(sb, env, "--offsite")).stdout
    sources = sorted({line.split(" copy ", 1)[1].split(" ", 1)[0] for line in shipped.splitlines()
                      if "running: " in line and " copy " in line and "/contentstore/" in line})
    # Two runs, not one per night: the newest night, and the oldest for the file only it and night two hold.
    assert sources == [snapshots[0], snapshots[2]], sources
    remote = s3.objects()
    for snap in snapshots:
        for dirpath, _dirs, names in os.walk(snap):
            for item in names:
                full = os.path.join(dirpath, item)
                key = "content/" + os.path.relpath(full, snap)
                assert key in remote and filecmp.cmp(full, remote[key], shallow=False), key
    assert "content/" + gone in remote
    assert json.loads(run(sb, env, "--status", "--json").stdout)["facts"]["offsite"]["pending_files"] == 0


def reading(pgid, rel):
    """True when a process of group ``pgid`` has a file ending in ``rel`` open."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            for fd in os.listdir("/proc/%s/fd" % pid):
                if os.readlink("/proc/%s/fd/%s" % (pid, fd)).endswith("/" + rel):
                    return True
        except OSError:
            continue
    return False


def test_a_killed_upload_resumes_without_sending_again(sandbox, s3):
    sb = sandbox
    big = "content/" + sb.add_content(1, date=(2024, 6, 3, 10, 0), size=4 * 1024 * 1024)[0]
    env = sb.write_env(OFFSITE_BWLIMIT="1M", OFFSITE_TRANSFERS=1, **s3.env())
    night(sb, env)
    argv = [sb.python, os.path.join(sb.project_dir, "backup.py"), "--env", env, "--offsite"]
    log = open(os.path.join(sb.root, "offsite-kill.log"), "w")
    proc = subprocess.Popen(argv, cwd=sb.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={"PATH": "/usr/bin:/bin", "HOME": sb.home, "LANG": "C.UTF-8"},
                            **({"user": sb.uid, "group": sb.gid, "extra_groups": []} if os.geteuid() == 0 else {}))
    try:
        deadline, first_seen = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            # At 1 MB/s the 4 MB file takes 4 s: kill once rclone has it open (1.75: read from its fds) or the
            # server has begun receiving it (its CREATE OBJECT is logged when the request starts); WAL, the base
            # backup and the config copy are off-site by then. rclone 1.60 reads a small file into memory before
            # sending it and its requests are logged at their end: there, kill while content is still going out.
            content = [k for k in s3.objects() if k.startswith("content/")]
            first_seen = first_seen or (content and time.monotonic())
            started = reading(proc.pid, big[len("content/"):]) or [
                k for op, k in s3.requests() if op == "CREATE OBJECT" and k.endswith("/prod/" + big)]
            if big not in s3.objects() and (started or (content and time.monotonic() - first_seen > 3)):
                time.sleep(1 if started else 0)
                break
            time.sleep(0.1)
        else:
            pytest.fail("the upload never got going: %s" % open(log.name).read()[-3000:])
        assert big not in s3.objects()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    before = {k for k in s3.objects()}
    written = len(s3.writes())
    # Rerun without the limit: the remote ends complete, and nothing that was there was sent again.
    sb.write_env(path=env, **s3.env())
    ok(run(sb, env, "--offsite"))
    assert_identical(sb, s3)
    resent = [k for k in s3.writes()[written:] if k.split("/", 2)[-1] in before]
    assert not resent, resent


def test_unreachable_remote_fails_and_alerts_then_catches_up(sandbox, s3):
    sb = sandbox
    with MailServer() as mail:
        env = sb.write_env(**s3.env(), **mail.env())
        s3.stop()
        night(sb, env)  # the night's local backup does not depend on the remote
        failed = run(sb, env, "--offsite", timeout=300)
        assert failed.returncode == 1, failed.stdout[-4000:]
        messages = mail.wait(1, timeout=20)
        assert messages and "FAILED" in messages[-1]["subject"] and "offsite" in messages[-1]["subject"]
        assert "127.0.0.1:%d" % s3.port in messages[-1]["body"] or "connection refused" in messages[-1]["body"]
        assert "wal/" in messages[-1]["body"] or "s3test:" in messages[-1]["body"]
        status = json.loads(run(sb, env, "--status", "--json").stdout)
        assert status["facts"]["offsite"]["last_error"]
        assert status["facts"]["offsite"]["pending_files"] > 0
        # The same failure again within the repeat interval sends no second mail.
        assert run(sb, env, "--offsite", timeout=300).returncode == 1
        time.sleep(1)
        assert len(mail.messages) == 1
        s3.start()
        ok(run(sb, env, "--offsite"))
        assert_identical(sb, s3)
        recovered = mail.wait(2, timeout=20)
        assert len(recovered) == 2 and "OK" in recovered[-1]["subject"]


def test_audit_finds_and_reships_a_corrupted_and_a_missing_object(sandbox, s3):
    sb = sandbox
    env = sb.write_env(**s3.env())
    night(sb, env)
    ok(run(sb, env, "--offsite"))
    remote = s3.objects()
    content = sorted(k for k in remote if k.startswith("content/"))
    corrupted = remote[content[0]]
    data = bytearray(open(corrupted, "rb").read())
    data[:64] = b"\0" * min(len(data), 64)  # same size, other bytes: only a hash can tell
    s3.put(content[0], bytes(data))
    s3.delete(content[1])
    ok(run(sb, env, "--offsite"))  # the shipping path trusts its record: it does not see it
    assert not filecmp.cmp(corrupted, os.path.join(sb.contentstore_dir, content[0][len("content/"):]), shallow=False)
    audited = ok(run(sb, env, "--offsite-audit"))
    assert content[0] in audited.stdout and content[1] in audited.stdout
    assert_identical(sb, s3)


def test_audit_lists_the_bucket_without_a_head_per_object(sandbox, s3):
    """S3 keeps an object's time in its metadata, which a LIST does not return: a listing that asks rclone for
    times sends one HEAD per object (1,001 requests for 1,000 objects, measured), hours and money on a store
    of millions. The audit needs sizes and MD5s only: one LIST per 1,000 objects, no HEAD per object."""
    sb = sandbox
    env = sb.write_env(**s3.env())
    night(sb, env)
    ok(run(sb, env, "--offsite"))
    objects = len(s3.objects())
    assert objects >= 20, objects  # enough objects for a HEAD each to show
    mark = s3.request_mark()
    ok(run(sb, env, "--offsite-audit"))
    requests = s3.requests()[mark:]
    heads = [k for op, k in requests if op == "HEAD OBJECT"]
    lists = [k for op, k in requests if op == "LIST BUCKET"]
    assert lists, requests
    # rclone HEADs the path it lists (is it a file?) and the reachability probe one more: never one per object.
    assert len(heads) <= 3, heads
