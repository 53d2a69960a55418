"""End to end: ``backup.py`` pinging a real HTTP(S) server on loopback, writing METRICS_FILE (parsed by
prometheus_client's parser) and BACKUP_DIR/status.json, naming the installation in mails; two installations on
one host at the same time."""

import concurrent.futures
import datetime
import fcntl
import io
import json
import os
import shutil
import socket
import stat
import threading
import time

import pytest
from mailserver import MailServer
from pingserver import PingServer, make_pki
from prometheus_client.parser import text_string_to_metric_families

import setup_answers
import setup_steps

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED = 0, 1, 2, 3
SECRET = "/ping/5e0c1b9e-77aa-4d3f-8c21-do-not-log-me"


def metrics_of(path):
    """{(name, frozenset(labels minus installation)): value}, and the set of installation labels seen."""
    with open(path) as handle:
        text = handle.read()
    values, installations = {}, set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            installations.add(labels.pop("installation"))
            values[(sample.name, frozenset(labels.items()))] = sample.value
    return values, installations


def metric(values, name, **labels):
    return values[(name, frozenset(labels.items()))]


def textfile_dir(sb):
    """A node_exporter textfile directory the service user may write (mode 0755, as node_exporter reads it)."""
    path = os.path.join(sb.root, "textfile")
    if not os.path.isdir(path):
        os.mkdir(path, 0o755)
        sb.chown_to_service_user(path)
    return path


def today_log(sb):
    with open(os.path.join(sb.backup_dir, "backup-%s.log" % datetime.date.today().isoformat())) as handle:
        return handle.read()


def status_file(sb):
    with open(os.path.join(sb.backup_dir, "status.json")) as handle:
        return json.load(handle)


def test_good_night_failed_night_and_status_ping_write_metrics_and_status(sandbox):
    sb = sandbox
    prom = os.path.join(textfile_dir(sb), "alfresco_backup_acme.prom")
    with PingServer() as hc, MailServer() as mail:
        env_path = sb.write_env(PING_URL=hc.url(SECRET), METRICS_FILE=prom, INSTALLATION_NAME="acme-prod",
                                ALERT_ON="always", **mail.env())
        before = time.time()
        good = sb.run_cli("backup.py", env_path=env_path, timeout=300)
        assert good.returncode == EXIT_OK, good.stdout + good.stderr
        start, success = hc.wait(2)
        mails = mail.wait(1)

        # The pings: /start, then the success with the summary; one run id for both.
        assert (start["method"], start["path"], success["path"]) == ("POST", SECRET + "/start", SECRET)
        assert start["query"]["rid"] == success["query"]["rid"]
        assert "acme-prod" in start["body"] and success["body"].startswith("alfresco-backup on acme-prod")
        assert "OK, exit code 0" in success["body"] and "Backup summary (OK)" in success["body"]
        assert "acme-prod" in mails[0]["subject"] and "acme-prod" in mails[0]["body"]

        # The metrics: every sample labelled with the installation, parsed by the real parser.
        assert stat.S_IMODE(os.stat(prom).st_mode) == 0o644
        values, installations = metrics_of(prom)
        assert installations == {"acme-prod"}
        assert metric(values, "alfresco_backup_last_run_success") == 1
        assert metric(values, "alfresco_backup_last_run_exit_code") == 0
        assert before <= metric(values, "alfresco_backup_last_run_start_timestamp_seconds") <= metric(
            values, "alfresco_backup_last_run_end_timestamp_seconds") <= time.time()
        for stage in ("postgres", "contentstore", "config", "wal_archive", "wal_health", "retention"):
            assert metric(values, "alfresco_backup_stage_status", stage=stage, status="FAILED") == 0, stage
            assert metric(values, "alfresco_backup_stage_duration_seconds", stage=stage) >= 0
        assert metric(values, "alfresco_backup_stage_status", stage="postgres", status="OK") == 1
        assert metric(values, "alfresco_backup_last_run_database_backup_bytes") > 0
        assert metric(values, "alfresco_backup_last_run_contentstore_copied_bytes") > 0
        assert metric(values, "alfresco_backup_last_run_contentstore_files") >= 40
        for kind in ("postgres", "contentstore", "config"):
            assert metric(values, "alfresco_backup_newest_complete_timestamp_seconds", kind=kind) >= before - 5, kind
        assert metric(values, "alfresco_backup_wal_archive_segments") >= 1
        assert metric(values, "alfresco_backup_wal_newest_segment_timestamp_seconds") >= before - 5
        assert metric(values, "alfresco_backup_archiver_failing") == 0
        # The window ends at the newest segment's mtime, which status.py rounds down to the second.
        assert metric(values, "alfresco_backup_recovery_window_end_timestamp_seconds") >= metric(
            values, "alfresco_backup_recovery_window_start_timestamp_seconds") - 1
        first_end = metric(values, "alfresco_backup_last_run_end_timestamp_seconds")

        # status.json: what --status --json says, plus the last run's stages.
        doc = status_file(sb)
        assert {"state", "reasons", "window", "facts", "last_run", "installation"} <= set(doc)
        assert doc["installation"] == "acme-prod" and doc["last_run"]["exit_code"] == 0
        assert [s["name"] for s in doc["last_run"]["stages"]][:3] == ["wal_config", "space", "postgres"]

        # A failed night: the database is down.
        sb.stop()
        bad = sb.run_cli("backup.py", env_path=env_path, timeout=300)
        assert bad.returncode == EXIT_FAILED, bad.stdout
        _s, _ok, start2, fail = hc.wait(4)
        assert (start2["path"], fail["path"]) == (SECRET + "/start", SECRET + "/fail")
        assert start2["query"]["rid"] == fail["query"]["rid"] != start["query"]["rid"]
        assert "FAILED, exit code 1" in fail["body"] and "failed stage wal_config" in fail["body"]
        assert "--- last lines of the log ---" in fail["body"] and "Backup summary (FAILED)" in fail["body"]
        assert "cannot connect to PostgreSQL" in fail["body"]
        assert "Backup summary (OK)" not in fail["body"]  # only tonight's part of the day's log
        values, _ = metrics_of(prom)
        assert metric(values, "alfresco_backup_last_run_success") == 0
        assert metric(values, "alfresco_backup_last_run_exit_code") == 1
        assert metric(values, "alfresco_backup_stage_status", stage="postgres", status="FAILED") == 1
        assert metric(values, "alfresco_backup_stage_status", stage="retention", status="SKIPPED") == 1
        assert metric(values, "alfresco_backup_last_success_timestamp_seconds") == first_end
        assert metric(values, "alfresco_backup_archiver_up") == 0

        # --status rewrites both files with fresh facts and keeps the last run.
        os.unlink(prom)
        report = sb.run_cli("backup.py", args=["--status", "--json"], env_path=env_path)
        assert report.returncode == 2, report.stdout + report.stderr  # CRITICAL: the archiver cannot be read
        printed = json.loads(report.stdout)
        assert printed == status_file(sb) and printed["last_run"]["exit_code"] == 1
        values, installations = metrics_of(prom)
        assert installations == {"acme-prod"}
        assert metric(values, "alfresco_backup_status") == 2
        assert metric(values, "alfresco_backup_last_run_exit_code") == 1
        text = sb.run_cli("backup.py", args=["--status"], env_path=env_path)
        assert "acme-prod: last run FAILED (exit 1)" in text.stdout
        mails = mail.wait(2)
        pings = list(hc.requests)

    # No secret anywhere: not the ping URL (nor its path), not the database password.
    with open(prom) as handle:
        files = handle.read()
    with open(os.path.join(sb.backup_dir, "status.json")) as handle:
        files += handle.read()
    everything = (today_log(sb) + good.stdout + good.stderr + bad.stdout + bad.stderr + report.stdout + text.stdout
                  + files + "".join(m["raw"] for m in mails) + "".join(p["body"] for p in pings))
    assert "do-not-log-me" not in everything and sb.alfresco_password not in everything
    assert "http://127.0.0.1/********" in today_log(sb)


def test_a_monitor_that_is_down_or_slow_changes_nothing(sandbox):
    sb = sandbox
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    down = sb.run_cli("backup.py", env_path=sb.write_env(PING_URL="http://127.0.0.1:%d%s" % (closed, SECRET),
                                                         PING_TIMEOUT=2), timeout=300)
    assert down.returncode == EXIT_OK, down.stdout + down.stderr
    assert "Backup summary (OK)" in down.stdout
    assert down.stdout.count("connection refused") == 2  # start and end, each logged once, as a warning
    with PingServer(delay=120) as slow:
        env_path = sb.write_env(PING_URL=slow.url(SECRET), PING_TIMEOUT=2)
        started = time.monotonic()
        result = sb.run_cli("backup.py", env_path=env_path, timeout=300)
        elapsed = time.monotonic() - started
        assert len(slow.requests) == 2  # both pings went out; neither answer was waited for
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    # Each ping would have held the run for 120 s: together they cost at most their two 2 s budgets.
    assert elapsed < 100, elapsed
    assert result.stdout.count("the run's result is unchanged") == 2
    assert "do-not-log-me" not in down.stdout + result.stdout + today_log(sb)


def test_tls_monitor_verified_with_its_ca_and_refused_without(sandbox, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: cannot make test certificates")
    sb = sandbox
    ca_file, server_context = make_pki(str(tmp_path))
    ca_copy = os.path.join(sb.root, "monitor-ca.pem")
    shutil.copy(ca_file, ca_copy)
    os.chmod(ca_copy, 0o644)
    with PingServer(ssl_context=server_context) as hc:
        trusted = sb.run_cli("backup.py", env_path=sb.write_env(PING_URL=hc.url(SECRET), PING_CA_FILE=ca_copy))
        assert trusted.returncode == EXIT_OK, trusted.stdout + trusted.stderr
        assert [r["path"] for r in hc.wait(2)] == [SECRET + "/start", SECRET]
        untrusted = sb.run_cli("backup.py", env_path=sb.write_env(PING_URL=hc.url(SECRET)))
        assert len(hc.requests) == 2  # nothing got through without the CA
    assert untrusted.returncode == EXIT_OK, untrusted.stdout + untrusted.stderr
    assert untrusted.stdout.count("TLS certificate verification failed") == 2
    assert "https://127.0.0.1/********" in untrusted.stdout and "do-not-log-me" not in untrusted.stdout


def test_configuration_error_and_held_lock_ping_failure(sandbox):
    sb = sandbox
    with PingServer() as hc, MailServer() as mail:
        broken = sb.run_cli("backup.py", env_path=sb.write_env(
            PGPORT="five", PING_URL=hc.url(SECRET), PING_STYLE="exitcode", INSTALLATION_NAME="cust-9", **mail.env()))
        assert broken.returncode == EXIT_CONFIG
        (config_ping,) = hc.wait(1)
        assert config_ping["path"] == SECRET + "/2" and "PGPORT" in config_ping["body"]
        assert "cust-9" in config_ping["body"] and "CONFIGURATION ERROR" in config_ping["body"]
        assert "cust-9" in mail.wait(1)[0]["subject"]

        lock_path = os.path.join(sb.backup_dir, "backup.lock")
        open(lock_path, "a").close()
        sb.chown_to_service_user(lock_path)
        with open(lock_path, "r+") as holder:
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            before = sorted(os.listdir(sb.backup_dir))
            locked = sb.run_cli("backup.py", env_path=sb.write_env(PING_URL=hc.url(SECRET)))
            assert sorted(os.listdir(sb.backup_dir)) == before  # a run that did nothing writes nothing
        assert locked.returncode == EXIT_LOCKED
        _c, lock_ping = hc.wait(2)
        assert lock_ping["path"] == SECRET + "/fail" and "another backup is running" in lock_ping["body"]
        assert "NOT RUN (lock held)" in lock_ping["body"]
    assert "do-not-log-me" not in broken.stdout + broken.stderr + locked.stdout + locked.stderr


def test_two_installations_on_one_host_run_side_by_side(sandbox_factory):
    first, second = sandbox_factory(n_files=20), sandbox_factory(n_files=20)
    textfiles = textfile_dir(first)  # one node_exporter directory for both
    os.chmod(first.root, 0o755)
    barrier = threading.Barrier(2, timeout=120)  # both runs must be at their /start at the same moment
    with PingServer(barrier=barrier) as hc:
        envs = {}
        for sb, name in ((first, "customer-a"), (second, "customer-b")):
            envs[name] = (sb, sb.write_env(INSTALLATION_NAME=name, PING_URL=hc.url("/ping/" + name),
                                           PING_TIMEOUT=150, METRICS_FILE=os.path.join(
                                               textfiles, "alfresco_backup_%s.prom" % name)))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            runs = {name: pool.submit(sb.run_cli, "backup.py", env_path=env, timeout=600)
                    for name, (sb, env) in envs.items()}
            results = {name: future.result() for name, future in runs.items()}
        pings = hc.wait(4)
    assert not barrier.broken  # neither start ping was answered before the other run had sent its own
    for name, result in results.items():
        assert result.returncode == EXIT_OK, (name, result.stdout[-3000:], result.stderr)
    assert sorted(p["path"] for p in pings) == ["/ping/customer-a", "/ping/customer-a/start", "/ping/customer-b",
                                                "/ping/customer-b/start"]
    for ping in pings:
        mine = ping["path"].split("/")[2]
        assert ("on %s" % mine) in ping["body"]
        assert ({"customer-a", "customer-b"} - {mine}).pop() not in ping["body"]
    assert sorted(os.listdir(textfiles)) == ["alfresco_backup_customer-a.prom", "alfresco_backup_customer-b.prom"]
    for name, (sb, _env) in envs.items():
        other_sb = second if sb is first else first
        _values, installations = metrics_of(os.path.join(textfiles, "alfresco_backup_%s.prom" % name))
        assert installations == {name}
        assert status_file(sb)["installation"] == name
        log = today_log(sb)
        assert "installation %s" % name in log and other_sb.backup_dir not in log
        assert os.path.exists(os.path.join(sb.backup_dir, "backup.lock"))


def test_the_wizard_asks_for_the_installation_name(tmp_path, monkeypatch):
    """Interactive: INSTALLATION_NAME is one of the basic questions, the host name its default; with an
    answers file the answer (or the host name) goes into the .env."""
    facts = {"base": "/opt/alfresco"}
    ui = setup_answers.Ui(False, {"INSTALLATION_NAME": "cust-12"})
    ctx = setup_steps.Context(ui, "/p", str(tmp_path / ".env"), dry_run=True, out=io.StringIO())
    setup_answers.collect_env(ctx, ui, facts, {}, None)
    assert ctx.values["INSTALLATION_NAME"] == "cust-12"
    ui = setup_answers.Ui(False, {})
    setup_answers.collect_env(ctx, ui, facts, {}, None)
    assert ctx.values["INSTALLATION_NAME"] == socket.gethostname()

    asked = []
    out = io.StringIO()
    replies = {"INSTALLATION_NAME": "acme-dr", "CHANGE_OTHER_SETTINGS": "no"}

    def read(prompt, secret=False):
        key = prompt.split()[1]
        asked.append(key)
        assert key != "INSTALLATION_NAME" or prompt.endswith("[%s]: " % socket.gethostname())
        return replies.get(key, "")

    ui = setup_answers.Ui(True, {}, out=out)
    monkeypatch.setattr(ui, "_read", read)
    ctx = setup_steps.Context(ui, "/p", str(tmp_path / ".env"), dry_run=True, out=out)
    setup_answers.collect_env(ctx, ui, facts, {}, None)
    assert "INSTALLATION_NAME" in asked and ctx.values["INSTALLATION_NAME"] == "acme-dr"
