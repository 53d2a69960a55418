"""monitor.py: the ping URLs and bodies (pure), and real pings to a real HTTP(S) server on loopback (up, down,
slow, refusing, TLS with a test CA made by openssl)."""

import logging
import os
import shutil
import socket
import time
import types
import urllib.parse

import pytest
from pingserver import PingServer, make_pki

import config
import monitor

SECRET_PATH = "/ping/0f3c6a4e-5d1b-4c55-9b7e-secret-uuid"


def cfg(url, **overrides):
    values = {"PING_URL": url, "PING_STYLE": "healthchecks", "PING_TIMEOUT": 5, "PING_CA_FILE": "",
              "INSTALLATION_NAME": "acme-prod"}
    values.update(overrides)
    return types.SimpleNamespace(**values)


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_logged(caplog):
    return "\n".join(r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------ pure parts

@pytest.mark.parametrize("style, event, code, path", [
    ("healthchecks", monitor.START, 0, "/p/uuid/start"),
    ("healthchecks", monitor.END, 0, "/p/uuid"),
    ("healthchecks", monitor.END, 1, "/p/uuid/fail"),
    ("healthchecks", monitor.END, 3, "/p/uuid/fail"),
    ("exitcode", monitor.START, 0, "/p/uuid/start"),
    ("exitcode", monitor.END, 0, "/p/uuid/0"),
    ("exitcode", monitor.END, 2, "/p/uuid/2"),
])
def test_healthchecks_urls_keep_the_query_and_add_the_run_id(style, event, code, path):
    for base in ("https://hc.example/p/uuid", "https://hc.example/p/uuid/"):
        method, url = monitor.ping_request(base + "?create=1", style, event, code, rid="r-1")
        parts = urllib.parse.urlsplit(url)
        assert method == "POST" and parts.netloc == "hc.example" and parts.path == path
        assert urllib.parse.parse_qs(parts.query) == {"create": ["1"], "rid": ["r-1"]}


def test_plain_style_is_one_get_at_the_end_replacing_uptime_kuma_parameters():
    kuma = "https://kuma.example/api/push/tok3n?status=up&msg=OK&ping="
    assert monitor.ping_request(kuma, "plain", monitor.START) is None
    method, url = monitor.ping_request(kuma, "plain", monitor.END, 1, message="acme: FAILED  postgres\n" + "x" * 500,
                                       duration=12.3456)
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    assert method == "GET" and parts.path == "/api/push/tok3n"
    assert query["status"] == ["down"] and query["ping"] == ["12345"]
    assert query["msg"][0].startswith("acme: FAILED postgres x") and len(query["msg"][0]) == monitor.PLAIN_MSG_LIMIT
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(monitor.ping_request(
        kuma, "plain", monitor.END, 0, message="ok")[1]).query)["status"] == ["up"]
    with pytest.raises(ValueError):
        monitor.ping_request(kuma, "carrier-pigeon", monitor.END)


def test_body_keeps_the_head_and_the_end_of_the_log_within_the_limit():
    log_tail = "".join("2024-05-01 02:00:%02d INFO line %d é\n" % (i % 60, i) for i in range(3000))
    log_tail += "2024-05-01 02:10:00 ERROR postgres FAILED: the reason\n"
    body = monitor.ping_body("alfresco-backup on acme: FAILED, exit code 1\nfailed stage postgres", log_tail)
    assert len(body.encode("utf-8")) <= monitor.BODY_LIMIT
    assert body.startswith("alfresco-backup on acme: FAILED, exit code 1\nfailed stage postgres\n")
    assert body.rstrip().endswith("postgres FAILED: the reason")
    assert "earlier bytes of the log omitted" in body
    omitted_note = body.split("--- last lines of the log ---\n")[1].splitlines()
    assert omitted_note[1].startswith("2024-05-01")  # cut at a line start, never mid-line
    assert monitor.ping_body("short", "one line\n") == "short\n\n--- last lines of the log ---\none line\n"
    assert len(monitor.ping_body("h" * 20000).encode()) == monitor.BODY_LIMIT


def test_redact_shows_scheme_and_host_only():
    assert monitor.redact("https://hc-ping.com/secret-uuid?create=1") == "https://hc-ping.com/********"
    assert monitor.redact("http://user:pw@10.0.0.5:8000/api/push/tok") == "http://10.0.0.5/********"


def test_config_masks_the_url_its_path_and_its_base_and_never_echoes_it():
    url = "https://hc-ping.com/project-key-1234/alfresco-acme?create=1"
    values = {"PGUSER": "a", "ALF_BASE_DIR": "/tmp", "BACKUP_DIR": "/tmp/b", "PING_URL": url}
    secrets = config.validate(values, check_paths=False).secrets()
    assert url in secrets and "https://hc-ping.com/project-key-1234/alfresco-acme" in secrets
    assert "/project-key-1234/alfresco-acme" in secrets
    with pytest.raises(config.ConfigError) as bad:
        config.validate(dict(values, PING_URL="hc-ping.com/project-key-1234"), check_paths=False)
    assert "PING_URL" in str(bad.value) and "project-key-1234" not in str(bad.value)
    plain = config.validate(dict(values, PING_URL="http://hc.example.org/key-1234"), check_paths=False)
    assert any(key == "PING_URL" and "unencrypted" in msg for key, msg in plain.warnings)


def test_installation_name_defaults_to_the_host_name():
    assert monitor.installation_name(types.SimpleNamespace(INSTALLATION_NAME="")) == socket.gethostname()
    assert monitor.mail_host(types.SimpleNamespace(INSTALLATION_NAME="")) == socket.getfqdn()
    assert monitor.mail_host(types.SimpleNamespace(INSTALLATION_NAME="customer-7")) == "customer-7 (%s)" % (
        socket.getfqdn())


# ------------------------------------------------------------------------------------------ real pings

def test_start_success_and_fail_reach_the_server_with_bodies(tmp_path, caplog):
    log_path = tmp_path / "backup.log"
    log_path.write_text("yesterday's run: not sent\n")
    with PingServer() as hc:
        pinger = monitor.Pinger(cfg(hc.url(SECRET_PATH)), logging.getLogger("t"), str(log_path))
        with open(log_path, "a") as handle:
            handle.write("tonight: postgres FAILED: cannot connect\n")
        with caplog.at_level(logging.INFO):
            assert pinger.start() is True
            assert pinger.finish(1, "failed stage postgres: cannot connect") is True
            assert monitor.Pinger(cfg(hc.url(SECRET_PATH)), logging.getLogger("t")).finish(0) is True
        start, fail, success = hc.wait(3)
    assert (start["method"], start["path"]) == ("POST", SECRET_PATH + "/start")
    assert (fail["method"], fail["path"]) == ("POST", SECRET_PATH + "/fail")
    assert (success["method"], success["path"]) == ("POST", SECRET_PATH)
    assert start["query"]["rid"] == fail["query"]["rid"] != success["query"]["rid"]
    assert "acme-prod" in start["body"] and "run started" in start["body"]
    assert fail["body"].startswith("alfresco-backup on acme-prod (host %s): FAILED, exit code 1\nfailed stage "
                                   "postgres" % socket.gethostname())
    assert "tonight: postgres FAILED" in fail["body"] and "yesterday" not in fail["body"]
    assert "OK, exit code 0" in success["body"]
    assert fail["headers"]["User-Agent"] == "alfresco-backup"
    logged = all_logged(caplog)
    assert "secret-uuid" not in logged and "http://127.0.0.1/********" in logged


def test_exitcode_style_and_plain_style(tmp_path):
    with PingServer() as hc:
        monitor.ping_once(cfg(hc.url(SECRET_PATH), PING_STYLE="exitcode"), 3, "another backup is running",
                          logging.getLogger("t"))
        monitor.ping_once(cfg(hc.url("/api/push/tok?status=up&msg=OK&ping="), PING_STYLE="plain"), 2, "PGPORT: bad",
                          logging.getLogger("t"))
        locked, kuma = hc.wait(2)
    assert locked["path"] == SECRET_PATH + "/3" and "another backup is running" in locked["body"]
    assert kuma["method"] == "GET" and kuma["path"] == "/api/push/tok"
    assert kuma["query"]["status"] == "down" and kuma["query"]["msg"].startswith("acme-prod: CONFIGURATION ERROR")


def test_a_monitor_that_is_down_is_retried_within_the_timeout_then_only_logged(caplog):
    url = "http://127.0.0.1:%d%s" % (closed_port(), SECRET_PATH)
    pinger = monitor.Pinger(cfg(url, PING_TIMEOUT=2), logging.getLogger("t"))
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        assert pinger.finish(1, "failed") is False
    elapsed = time.monotonic() - started
    assert 1.0 < elapsed < 2 + 3  # it retried for its budget, and then stopped
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert "connection refused" in warning[0].getMessage() and "attempts" in warning[0].getMessage()
    assert "result is unchanged" in warning[0].getMessage() and "secret-uuid" not in all_logged(caplog)


def test_a_slow_monitor_costs_at_most_the_timeout(caplog):
    with PingServer(delay=30) as hc:
        pinger = monitor.Pinger(cfg(hc.url(SECRET_PATH), PING_TIMEOUT=1), logging.getLogger("t"))
        started = time.monotonic()
        with caplog.at_level(logging.INFO):
            assert pinger.start() is False
        elapsed = time.monotonic() - started
        assert len(hc.requests) == 1  # it got there; the answer is what never came
    assert elapsed < 1 + 5
    assert "timed out" in all_logged(caplog) or "no answer within" in all_logged(caplog)


def test_a_wrong_url_is_not_retried_a_server_error_is():
    with PingServer(status=404) as hc:
        ok, description, _ = monitor.deliver("POST", hc.url(), "x", 5)
        assert not ok and description == "HTTP 404 Not Found" and len(hc.requests) == 1
    with PingServer(status=[503, 200]) as hc:
        ok, description, _ = monitor.deliver("POST", hc.url(), "x", 10)
        assert ok and len(hc.requests) == 2


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: cannot make test certificates")
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def test_tls_endpoint_verified_with_the_ca_file_and_refused_without(pki, caplog):
    ca_file, server_context = pki
    with PingServer(ssl_context=server_context) as hc:
        url = hc.url(SECRET_PATH)
        assert url.startswith("https://")
        with caplog.at_level(logging.INFO):
            assert monitor.Pinger(cfg(url, PING_CA_FILE=ca_file), logging.getLogger("t")).finish(0) is True
            assert len(hc.wait(1)) == 1
            refused = monitor.Pinger(cfg(url, PING_TIMEOUT=3), logging.getLogger("t"))
            started = time.monotonic()
            assert refused.finish(0) is False
            assert time.monotonic() - started < 3  # a certificate error is final: no retries
        assert len(hc.requests) == 1  # the refused ping never got through TLS to send anything
    # The right CA, but a certificate that does not name the address the URL uses.
    with PingServer(ssl_context=server_context, bind="127.0.0.2") as other:
        with caplog.at_level(logging.INFO):
            assert monitor.Pinger(cfg(other.url(SECRET_PATH), PING_CA_FILE=ca_file, PING_TIMEOUT=3),
                                  logging.getLogger("t")).finish(0) is False
        assert other.requests == []
    logged = all_logged(caplog)
    assert logged.count("certificate verification failed") == 2
    assert "set PING_CA_FILE" in logged and "is PING_CA_FILE the CA that signed it?" in logged
    assert "secret-uuid" not in logged


def test_a_bad_ca_file_is_logged_not_raised(tmp_path, caplog):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with caplog.at_level(logging.WARNING):
        assert monitor.Pinger(cfg("https://127.0.0.1:1/x", PING_CA_FILE=str(bad)), logging.getLogger("t")).start() \
            is False
    assert "cannot load PING_CA_FILE" in all_logged(caplog)


def test_without_ping_url_nothing_is_sent_or_logged(caplog):
    with caplog.at_level(logging.DEBUG):
        pinger = monitor.Pinger(cfg(""), logging.getLogger("t"))
        assert pinger.start() is False and pinger.finish(1, "x") is False
    assert not caplog.records


def test_secrets_are_masked_in_the_body(tmp_path):
    log_path = tmp_path / "log"
    log_path.write_text("")
    with PingServer() as hc:
        url = hc.url(SECRET_PATH)
        pinger = monitor.Pinger(cfg(url), logging.getLogger("t"), str(log_path), secrets=["db-pa55word"])
        with open(log_path, "a") as handle:
            handle.write("a tool printed db-pa55word and %s\n" % url)
        pinger.finish(1, "error mentioning db-pa55word")
        (request,) = hc.wait(1)
    assert "db-pa55word" not in request["body"] and url not in request["body"]
    assert request["body"].count("********") >= 3
    assert os.path.getsize(log_path) > 0


def test_monitoring_keys_are_checked_with_their_key_named(tmp_path):
    base = {"PGUSER": "a", "ALF_BASE_DIR": str(tmp_path), "BACKUP_DIR": str(tmp_path / "b")}
    with pytest.raises(config.ConfigError) as bad:
        config.validate(dict(base, METRICS_FILE=str(tmp_path / "no-such-dir" / "a.prom"),
                             PING_CA_FILE=str(tmp_path / "missing.pem"), PING_STYLE="carrier-pigeon",
                             INSTALLATION_NAME="x" * 65, PING_TIMEOUT="soon"))
    keys = [key for key, _message in bad.value.problems]
    assert sorted(keys) == ["INSTALLATION_NAME", "METRICS_FILE", "PING_CA_FILE", "PING_STYLE", "PING_TIMEOUT"]
    good = config.validate(dict(base, METRICS_FILE=str(tmp_path / "backup.txt"), INSTALLATION_NAME="Kunde Müller"))
    assert good.installation_name == "Kunde Müller"
    assert [key for key, _m in good.warnings if key == "METRICS_FILE"] == ["METRICS_FILE"]  # not *.prom


def test_subset_config_keeps_the_usable_ping_settings_of_a_broken_env():
    raw = {"PGPORT": "five", "PING_URL": "https://hc.example/uuid", "PING_STYLE": "exitcode", "PING_TIMEOUT": "x",
           "INSTALLATION_NAME": "cust-9"}
    cfg_, problems = config.subset_config(raw, config.MONITOR_KEYS)
    assert (cfg_.PING_URL, cfg_.PING_STYLE, cfg_.PING_TIMEOUT, cfg_.INSTALLATION_NAME) == (
        "https://hc.example/uuid", "exitcode", 10, "cust-9")
    assert [key for key, _m in problems] == ["PING_TIMEOUT"]
    assert config.subset_config({"PING_URL": "not a url"}, config.MONITOR_KEYS)[0].PING_URL == ""
