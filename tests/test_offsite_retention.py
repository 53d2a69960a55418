"""Off-site retention over a month of faked nights: the pure plan (offsite_retention.plan) and one run of
``backup.py --offsite-retention`` against a real ``rclone serve s3``, from a .env with only the remote keys."""

import datetime
import gzip
import json
import os

import catalog
import offsite_remote
import offsite_retention
import pytest
import sandbox as sandbox_module
import wal
from s3server import S3Server

NIGHTS = 30
BASE_NOW = datetime.datetime(2026, 11, 30, 12, 0, 0)


def seg(n):
    return wal.segment_from_number(1, n)


def utc(naive):
    return naive.astimezone(datetime.timezone.utc).isoformat(timespec="microseconds")


def manifest_files(n):
    """Night n's store: a<k> stays forever, b<k> is deleted three nights after it was written."""
    files = {"2024/1/%d/0/0/a%d.bin" % (k % 28 + 1, k): 10 + k for k in range(n + 1)}
    files.update({"2024/2/%d/0/0/b%d.bin" % (k % 28 + 1, k): 20 + k for k in range(max(0, n - 2), n + 1)})
    return files


def month(now, nights=NIGHTS, incomplete_last=False):
    """{remote key: bytes} of ``nights`` nights, the last one ``now`` minus one hour."""
    objects = {}
    for n in range(nights):
        when = (now - datetime.timedelta(days=nights - 1 - n, hours=1)).replace(microsecond=0)
        base = catalog.backup_name("postgres", when)
        snap = catalog.backup_name("contentstore", when + datetime.timedelta(minutes=1))
        conf = catalog.backup_name("config", when + datetime.timedelta(minutes=2))
        start = seg(3 * n + 1)
        objects["postgres/%s.json" % base] = {"status": "DONE", "started_at": utc(when), "ended_at": utc(
            when + datetime.timedelta(seconds=30)), "start_wal_file": start, "stop_wal_file": start,
            "backup_label_file": start + ".00000028.backup", "wal_segment_size": 16 << 20}
        objects["postgres/%s/base.tar.zst" % base] = b"base"
        objects["wal/%s.00000028.backup" % start] = b"label"
        for k in range(3):
            objects["wal/%s.gz" % seg(3 * n + 1 + k)] = b"w"
        files = manifest_files(n)
        if not (incomplete_last and n == nights - 1):
            objects["manifests/%s.json" % snap] = {"status": "DONE", "started_at": utc(
                when + datetime.timedelta(minutes=1)), "ended_at": utc(when + datetime.timedelta(minutes=1, seconds=5))}
        objects["manifests/%s.tsv.gz" % snap] = gzip.compress("".join(
            "%s\t%d\n" % item for item in sorted(files.items())).encode(), mtime=0)
        objects["config/%s.json" % conf] = {"status": "DONE", "started_at": utc(when + datetime.timedelta(minutes=2))}
        objects["config/%s/keystore/keystore" % conf] = b"k"
        for rel in files:
            objects["content/" + rel] = b"c" * files[rel]
    return objects


def remote_catalog(objects):
    """The RemoteCatalog offsite_remote.read_catalog would build from ``objects`` (no remote involved)."""
    wal_files = {k[4:]: (len(v), None) for k, v in objects.items() if k.startswith("wal/")}
    entries, manifests = {kind: [] for kind in catalog.KINDS}, {}
    for key, value in objects.items():
        folder, _sep, name = key.partition("/")
        if name.endswith(".tsv.gz"):
            manifests[name[:-7]] = len(value)
        elif "/" not in name and name.endswith(".json"):
            kind = {"manifests": "contentstore"}.get(folder, folder)
            entries[kind].append(offsite_remote._entry(kind, name[:-5], value, key, wal_files))
    for kind in entries:
        entries[kind].sort(key=lambda e: e.taken_at)
    content = {k[len("content/"):]: (len(v), None) for k, v in objects.items() if k.startswith("content/")}
    return offsite_remote.RemoteCatalog(entries, wal_files, content, manifests)


def manifests_of(objects):
    return {k[len("manifests/"):-7]: set(manifest_files_from(v)) for k, v in objects.items() if k.endswith(".tsv.gz")}


def manifest_files_from(data):
    return [line.split("\t")[0] for line in gzip.decompress(data).decode().splitlines()]


def kept_names(the_plan, kind):
    return [e.name for e, action, _r in the_plan.decisions if e.kind == kind and action == "keep"]


def test_a_month_keeps_the_window_its_pairs_wal_and_content():
    objects = month(BASE_NOW)
    the_plan = offsite_retention.plan(remote_catalog(objects), BASE_NOW, 10, 1, manifests_of(objects))
    bases = sorted(k[9:-5] for k in objects if k.startswith("postgres/") and k.endswith(".json"))
    assert kept_names(the_plan, "postgres") == bases[20:]  # 10 days: nights 20..29 (night 19 is 10 d 1 h old)
    assert len(kept_names(the_plan, "contentstore")) == 10 and len(kept_names(the_plan, "config")) == 10
    assert the_plan.wal_keep_from == seg(61)
    assert the_plan.delete_wal == sorted(["%s.gz" % seg(n) for n in range(1, 61)] +
                                         ["%s.00000028.backup" % seg(3 * n + 1) for n in range(20)])
    kept_content = set().union(*(manifest_files(n) for n in range(20, 30)))
    assert the_plan.delete_content == sorted(set(k[8:] for k in objects if k.startswith("content/")) - kept_content)
    assert the_plan.delete_content == sorted("2024/2/%d/0/0/b%d.bin" % (k % 28 + 1, k) for k in range(18))
    assert len(the_plan.delete_manifests) == 20
    assert "DELETE" in the_plan.format() and "keep from %s" % seg(61) in the_plan.format()


def test_after_a_month_without_new_sets_the_newest_complete_set_and_its_wal_stay():
    objects = month(BASE_NOW)
    later = BASE_NOW + datetime.timedelta(days=60)
    the_plan = offsite_retention.plan(remote_catalog(objects), later, 10, 1, manifests_of(objects))
    assert len(kept_names(the_plan, "postgres")) == 1 and len(kept_names(the_plan, "contentstore")) == 1
    assert the_plan.wal_keep_from == seg(3 * 29 + 1)
    assert not set(manifest_files(29)) & set(the_plan.delete_content)


def test_an_upload_in_progress_is_kept_and_protects_its_content_and_the_previous_set():
    objects = month(BASE_NOW, incomplete_last=True)
    # The newest base's last WAL segment is not off-site yet either.
    newest_base = sorted(k for k in objects if k.startswith("postgres/") and k.endswith(".json"))[-1]
    del objects["wal/%s.gz" % objects[newest_base]["stop_wal_file"]]
    cat = remote_catalog(objects)
    assert cat.entries["postgres"][-1].status == catalog.WAITING_FOR_WAL
    later = BASE_NOW + datetime.timedelta(days=40)
    the_plan = offsite_retention.plan(cat, later, 10, 1, manifests_of(objects))
    complete_base, complete_snap = offsite_retention.newest_complete_set(cat.entries)
    assert complete_base.name == cat.entries["postgres"][-2].name
    assert set(kept_names(the_plan, "postgres")) == {complete_base.name, cat.entries["postgres"][-1].name}
    assert complete_snap.name in kept_names(the_plan, "contentstore")
    in_progress = sorted(cat.manifests)[-1]
    assert in_progress not in the_plan.delete_manifests
    assert not set(manifest_files(29)) & set(the_plan.delete_content)


def test_nothing_old_goes_while_no_set_is_complete_off_site():
    objects = {k: v for k, v in month(BASE_NOW, nights=3).items() if not k.startswith("manifests/")}
    the_plan = offsite_retention.plan(remote_catalog(objects), BASE_NOW + datetime.timedelta(days=90), 1, 1, {})
    assert not the_plan.deleted_sets() and not the_plan.delete_wal and not the_plan.delete_content
    assert any("no complete set" in w for w in the_plan.warnings)


def test_an_unreadable_manifest_keeps_every_content_object():
    objects = month(BASE_NOW)
    manifests = manifests_of(objects)
    del manifests[sorted(manifests)[-1]]
    the_plan = offsite_retention.plan(remote_catalog(objects), BASE_NOW, 10, 1, manifests)
    assert the_plan.delete_content == [] and any("could not be read" in w for w in the_plan.warnings)


@pytest.mark.slow
def test_retention_against_a_real_s3_server_from_another_host(service_user, tmp_path):
    now = datetime.datetime.now()
    objects = month(now)
    with S3Server(owner=service_user) as s3:
        for key, value in objects.items():
            path = os.path.join(s3.base(), key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(json.dumps(value).encode() if isinstance(value, dict) else value)
        # Another host: a .env with nothing but the remote's keys.
        env = os.path.join(s3.root, "retention.env")
        with open(env, "w") as handle:
            handle.write("OFFSITE_REMOTE=%s\nOFFSITE_RCLONE_CONFIG=%s\nOFFSITE_RETENTION_DAYS=10\n"
                         % (s3.env()["OFFSITE_REMOTE"], s3.conf))
        os.chmod(env, 0o600)
        if os.geteuid() == 0:
            os.chown(env, service_user.uid, service_user.gid)
        python = sandbox_module.resolve_python(service_user)
        argv = [python, os.path.join(sandbox_module.PROJECT_DIR, "backup.py"), "--env", env, "--offsite-retention"]
        dry = sandbox_module._run_as(service_user, argv + ["--dry-run"], cwd=s3.root, timeout=300)
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert "DELETE" in dry.stdout and set(s3.objects()) == set(objects)
        real = sandbox_module._run_as(service_user, argv, cwd=s3.root, timeout=300)
        assert real.returncode == 0, real.stdout[-4000:] + real.stderr[-2000:]
        expected = offsite_retention.plan(remote_catalog(objects), now, 10, 1, manifests_of(objects))
        gone = {"wal/" + n for n in expected.delete_wal} | {"content/" + r for r in expected.delete_content}
        gone |= {"manifests/%s.tsv.gz" % n for n in expected.delete_manifests}
        for entry in expected.deleted_sets():
            gone |= {k for k in objects if k.startswith("%s/%s" % ({"contentstore": "manifests"}.get(
                entry.kind, entry.kind), entry.name))}
        assert len(expected.deleted_sets()) == 60
        assert set(s3.objects()) == set(objects) - gone
