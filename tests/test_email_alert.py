"""Tests for email_alert.py against a real SMTP server (aiosmtpd) on 127.0.0.1.

TLS tests use a throwaway CA and server certificates made with the ``openssl`` command at test time
(skipped when it is missing). Nothing here talks to anything but loopback.
"""

import email
import email.policy
import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import types

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

import catalog
import email_alert  # the project directory is on sys.path via conftest.py
import mail_report
from email_alert import (
    AlertError,
    mail_enabled,
    notify,
    send_mail,
    should_send,
)
from mail_report import build_report

PASSWORD = "s3cr3t-Pa55w0rd"
DB_SECRET = "db-pass-xyz"


# ------------------------------------------------------------------------------------------ helpers

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Collector:
    """aiosmtpd handler keeping every delivered envelope; can refuse RCPT or DATA."""

    def __init__(self, refuse_rcpt=(), refuse_data=False):
        self.envelopes = []
        self.refuse_rcpt = set(refuse_rcpt)
        self.refuse_data = refuse_data

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse_rcpt or "*" in self.refuse_rcpt:
            return "550 no"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.refuse_data:
            return "550 no"
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"

    def message(self, index=0):
        return email.message_from_bytes(self.envelopes[index].content, policy=email.policy.default)


class Server:
    def __init__(self, handler, **kwargs):
        self.handler = handler
        self.port = free_port()
        self.controller = Controller(handler, hostname="127.0.0.1", port=self.port,
                                     server_hostname="localhost", **kwargs)

    def __enter__(self):
        self.controller.start()
        return self

    def __exit__(self, *exc):
        self.controller.stop()


def make_cfg(port, **overrides):
    values = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": port, "SMTP_USER": "", "SMTP_PASSWORD": "",
              "SMTP_SECURITY": "none", "SMTP_TIMEOUT": 5, "SMTP_CA_FILE": "",
              "ALERT_EMAIL": ["ops@example.com", "dba@example.com"], "ALERT_FROM": "backup@example.com",
              "ALERT_ON": "failure"}
    values.update(overrides)
    return types.SimpleNamespace(**values)


STAGES = [
    {"name": "wal-check", "status": "OK", "duration": 0.42, "size": None, "detail": "wal_level=replica"},
    types.SimpleNamespace(name="basebackup", status="FAILED", duration=75.0, size=3 * 1024 ** 3,
                          detail="pg_basebackup -Ft to /backup/db/2024-05-01"),
    {"name": "contentstore", "status": "SKIPPED", "duration": None, "size": None, "detail": ""},
]


def failure_report():
    return build_report("alf1.example.com", False, STAGES,
                        error=f"pg_basebackup exited 1: connection used password {PASSWORD}",
                        tool_output_tail="line one\npg_basebackup: error: could not connect\n",
                        log_path="/var/log/alfresco-backup/backup.log",
                        extra_sections=[("Disk", "backup disk 42% used; db password " + DB_SECRET)])


@pytest.fixture(autouse=True)
def reset_warned():
    email_alert._WARNED.clear()
    yield
    email_alert._WARNED.clear()


# ------------------------------------------------------------------------------------------ TLS material

def _openssl(args, cwd):
    subprocess.run(["openssl"] + args, cwd=cwd, check=True, capture_output=True, timeout=30)


def _server_cert(cwd, name, sans):
    with open(os.path.join(cwd, name + ".ext"), "w") as fh:
        fh.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                 "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
                 f"subjectAltName={sans}\n")
    _openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
              "-keyout", name + ".key", "-out", name + ".csr", "-subj", "/CN=" + name], cwd)
    _openssl(["x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial",
              str(abs(hash(name)) % 10 ** 9 + 2), "-days", "2", "-extfile", name + ".ext", "-out", name + ".pem"], cwd)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(os.path.join(cwd, name + ".pem"), os.path.join(cwd, name + ".key"))
    return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throwaway CA, a server context valid for 127.0.0.1/localhost, and one valid for another name."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: cannot make test certificates")
    cwd = str(tmp_path_factory.mktemp("pki"))
    _openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
              "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=alfresco-backup test CA",
              "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
             cwd)
    return types.SimpleNamespace(
        ca_file=os.path.join(cwd, "ca.pem"),
        server_ctx=_server_cert(cwd, "localhost", "DNS:localhost,IP:127.0.0.1"),
        wrong_name_ctx=_server_cert(cwd, "elsewhere", "DNS:elsewhere.example"))


# ------------------------------------------------------------------------------------------ decisions

@pytest.mark.parametrize("alert_on, failed, expected", [
    ("failure", True, True), ("failure", False, False),
    ("always", True, True), ("always", False, True),
    ("never", True, False), ("never", False, False),
    ("bogus", True, True), ("bogus", False, False),
])
def test_should_send_truth_table(alert_on, failed, expected):
    cfg = make_cfg(25, ALERT_ON=alert_on)
    assert should_send(cfg, failed) is expected


def test_mail_enabled_reasons():
    assert mail_enabled(make_cfg(25)) == (True, "")
    off, reason = mail_enabled(make_cfg(25, SMTP_HOST=""))
    assert not off and "SMTP_HOST" in reason
    off, reason = mail_enabled(make_cfg(25, ALERT_EMAIL=[]))
    assert not off and "ALERT_EMAIL" in reason
    off, reason = mail_enabled(make_cfg(25, ALERT_ON="never"))
    assert not off and "never" in reason
    # A bare namespace (attributes missing) is simply "disabled", not an AttributeError.
    off, reason = mail_enabled(types.SimpleNamespace())
    assert not off and "SMTP_HOST" in reason
    assert should_send(make_cfg(25, SMTP_HOST=""), True) is False


def test_notify_without_smtp_host_warns_once_and_returns_false(caplog):
    cfg = make_cfg(free_port(), SMTP_HOST="")
    with caplog.at_level(logging.WARNING):
        assert notify(cfg, False, "s", "b", logging.getLogger("t")) is False
        assert notify(cfg, False, "s", "b", logging.getLogger("t")) is False
    warnings = [r for r in caplog.records if "no SMTP_HOST: e-mail alerts are disabled" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


def test_notify_success_run_without_smtp_host_stays_quiet(caplog):
    with caplog.at_level(logging.DEBUG):
        assert notify(make_cfg(25, SMTP_HOST=""), True, "s", "b", logging.getLogger("t")) is False
        assert notify(make_cfg(25, SMTP_HOST="", ALERT_ON="never"), False, "s", "b", logging.getLogger("t")) is False
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_notify_skips_success_when_alert_on_failure():
    handler = Collector()
    with Server(handler) as srv:
        assert notify(make_cfg(srv.port), True, "s", "b", logging.getLogger("t")) is False
        assert notify(make_cfg(srv.port, ALERT_ON="always"), True, "s", "b", logging.getLogger("t")) is True
    assert len(handler.envelopes) == 1


# ------------------------------------------------------------------------------------------ build_report

def test_build_report_failure():
    subject, body = failure_report()
    assert subject == "[alfresco-backup] FAILED on alf1.example.com: basebackup"
    assert "Failed stage: basebackup" in body
    assert "What it was doing: pg_basebackup -Ft to /backup/db/2024-05-01" in body
    assert "Error: pg_basebackup exited 1" in body
    assert "    | pg_basebackup: error: could not connect" in body
    assert "Log file: /var/log/alfresco-backup/backup.log" in body
    assert "== Disk ==\nbackup disk 42% used" in body
    table = body.split("Stages:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert table[0].split() == ["Stage", "Status", "Duration", "Size", "Detail"]
    assert table[2].split()[:4] == ["wal-check", "OK", "0.4", "s"]
    assert table[3].split()[:8] == ["basebackup", "FAILED", "1", "min", "15", "s", "3.0", "GiB"]
    assert table[4].split() == ["contentstore", "SKIPPED", "-", "-"]
    # Columns line up: every row's status starts where the header's does.
    column = table[0].index("Status")
    assert all(row[column - 2:column] == "  " and row[column] != " " for row in table[2:])


def test_build_report_success_and_warnings():
    ok = [{"name": "basebackup", "status": "OK", "duration": 3725, "size": 1536, "detail": ""}]
    subject, body = build_report("alf1", True, ok)
    assert subject == "[alfresco-backup] OK on alf1"
    assert "Failed stage" not in body and "1 h 02 min" in body and "1.5 KiB" in body
    warn = ok + [{"name": "wal-archive", "status": "WARN", "duration": 1, "size": None,
                  "detail": "last archived segment is 2 h old"}]
    subject, body = build_report("alf1", True, warn)
    assert subject == "[alfresco-backup] OK with warnings on alf1"
    assert "  - wal-archive: last archived segment is 2 h old" in body


def test_build_report_failure_without_stage_and_long_tail():
    tail = [f"line {i}" for i in range(500)]
    subject, body = build_report("alf1\nevil", False, [], error="lock held by pid 42\nsince 02:00",
                                 tool_output_tail=tail)
    assert subject == "[alfresco-backup] FAILED on alf1 evil"
    assert "Error: lock held by pid 42\n       since 02:00" in body
    assert "line 499" in body and "line 439" not in body and "440 earlier lines omitted" in body
    assert "Stages: none ran." in body


def test_human_helpers():
    assert catalog.human_size(0) == "0 B"
    assert catalog.human_size(1023) == "1023 B"
    assert catalog.human_size(5 * 1024 ** 4) == "5.0 TiB"
    assert catalog.human_size(None) == "-"
    assert mail_report.human_duration(59.94) == "59.9 s"
    assert mail_report.human_duration(61) == "1 min 01 s"


# ------------------------------------------------------------------------------------------ plain SMTP

def test_plain_send_arrives_with_secrets_masked():
    handler = Collector()
    subject, body = failure_report()
    with Server(handler) as srv:
        cfg = make_cfg(srv.port, SMTP_PASSWORD=PASSWORD)
        send_mail(cfg, subject + " " + DB_SECRET, body, secrets=[DB_SECRET])
    assert len(handler.envelopes) == 1
    env = handler.envelopes[0]
    assert sorted(env.rcpt_tos) == ["dba@example.com", "ops@example.com"]
    assert env.mail_from == "backup@example.com"
    msg = handler.message()
    assert msg["Subject"] == "[alfresco-backup] FAILED on alf1.example.com: basebackup ********"
    assert msg["To"] == "ops@example.com, dba@example.com"
    assert msg["Date"] and msg["Message-ID"]
    text = msg.get_content()
    assert "Stages:" in text and "basebackup" in text and "FAILED" in text
    assert "pg_basebackup exited 1" in text
    assert "connection used password ********" in text and "db password ********" in text
    assert PASSWORD.encode() not in env.content and DB_SECRET.encode() not in env.content


def test_default_from_uses_fqdn():
    handler = Collector()
    with Server(handler) as srv:
        send_mail(make_cfg(srv.port, ALERT_FROM="", ALERT_EMAIL=["ops@example.com"]), "s", "b")
    assert handler.envelopes[0].mail_from == "alfresco-backup@" + socket.getfqdn()


# ------------------------------------------------------------------------------------------ TLS

def test_starttls_verified_with_private_ca(pki):
    handler = Collector()
    with Server(handler, tls_context=pki.server_ctx, require_starttls=True) as srv:
        send_mail(make_cfg(srv.port, SMTP_SECURITY="starttls", SMTP_CA_FILE=pki.ca_file), "tls", "body")
        # "none" against a server demanding STARTTLS is refused, and we say so.
        with pytest.raises(AlertError, match="refused"):
            send_mail(make_cfg(srv.port), "plain", "body")
    assert [handler.message(i)["Subject"] for i in range(len(handler.envelopes))] == ["tls"]


def test_starttls_without_ca_fails_verification(pki):
    handler = Collector()
    with Server(handler, tls_context=pki.server_ctx, require_starttls=True) as srv, \
            pytest.raises(AlertError) as info:
        send_mail(make_cfg(srv.port, SMTP_SECURITY="starttls"), "tls", "body")
    message = str(info.value)
    assert "certificate verification failed" in message and f"127.0.0.1:{srv.port}" in message
    assert handler.envelopes == []


def test_starttls_checks_host_name(pki):
    handler = Collector()
    with Server(handler, tls_context=pki.wrong_name_ctx, require_starttls=True) as srv, \
            pytest.raises(AlertError, match="certificate verification failed.*(?i:hostname|ip address)"):
        send_mail(make_cfg(srv.port, SMTP_SECURITY="starttls", SMTP_CA_FILE=pki.ca_file), "tls", "body")
    assert handler.envelopes == []


def test_implicit_ssl_with_ca(pki):
    handler = Collector()
    with Server(handler, ssl_context=pki.server_ctx) as srv:
        send_mail(make_cfg(srv.port, SMTP_SECURITY="ssl", SMTP_CA_FILE=pki.ca_file), "ssl", "body")
        with pytest.raises(AlertError, match="certificate verification failed"):
            send_mail(make_cfg(srv.port, SMTP_SECURITY="ssl"), "ssl", "body")
    assert len(handler.envelopes) == 1 and handler.message()["Subject"] == "ssl"


def test_missing_ca_file_is_a_clear_error(tmp_path):
    with pytest.raises(AlertError, match="SMTP_CA_FILE"):
        send_mail(make_cfg(free_port(), SMTP_SECURITY="starttls", SMTP_CA_FILE=str(tmp_path / "nope.pem")), "s", "b")


# ------------------------------------------------------------------------------------------ AUTH

def authenticator(server, session, envelope, mechanism, auth_data):
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login == b"backup"
          and auth_data.password == PASSWORD.encode())
    # handled=False makes aiosmtpd answer "535" itself; with the default it would send nothing at all.
    return AuthResult(success=ok, handled=ok)


def test_auth_over_starttls(pki, caplog):
    handler = Collector()
    with Server(handler, tls_context=pki.server_ctx, require_starttls=True, authenticator=authenticator,
                auth_require_tls=True, auth_required=True) as srv:
        good = make_cfg(srv.port, SMTP_SECURITY="starttls", SMTP_CA_FILE=pki.ca_file, SMTP_USER="backup",
                        SMTP_PASSWORD=PASSWORD)
        send_mail(good, "authed", "password is " + PASSWORD)
        bad = make_cfg(srv.port, SMTP_SECURITY="starttls", SMTP_CA_FILE=pki.ca_file, SMTP_USER="backup",
                       SMTP_PASSWORD="wrong-" + PASSWORD)
        with pytest.raises(AlertError) as info:
            send_mail(bad, "bad", "body")
        with caplog.at_level(logging.ERROR):
            assert notify(bad, False, "bad", "body", logging.getLogger("t")) is False
        # Without a login the server refuses the mail (proves the first send really authenticated).
        with pytest.raises(AlertError):
            send_mail(make_cfg(srv.port, SMTP_SECURITY="starttls", SMTP_CA_FILE=pki.ca_file), "anon", "body")
    message = str(info.value)
    assert "authentication failed" in message and "backup" in message and f"127.0.0.1:{srv.port}" in message
    assert PASSWORD not in message
    assert caplog.records and all(PASSWORD not in r.getMessage() for r in caplog.records)
    assert len(handler.envelopes) == 1
    assert PASSWORD.encode() not in handler.envelopes[0].content
    assert "password is ********" in handler.message().get_content()


# ------------------------------------------------------------------------------------------ failures

def test_server_down_notify_returns_false_quickly(caplog):
    cfg = make_cfg(free_port(), SMTP_TIMEOUT=3)
    start = time.monotonic()
    with caplog.at_level(logging.ERROR):
        assert notify(cfg, False, "s", "b", logging.getLogger("t")) is False
    assert time.monotonic() - start < 3
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "connection refused" in errors[0] and f"127.0.0.1:{cfg.SMTP_PORT}" in errors[0]


def test_hanging_server_times_out(caplog):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    accepted = []
    stop = threading.Event()

    def accept_and_hold():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])  # never answers
            except socket.timeout:
                pass

    thread = threading.Thread(target=accept_and_hold, daemon=True)
    thread.start()
    result = []
    cfg = make_cfg(listener.getsockname()[1], SMTP_TIMEOUT=2)
    # notify runs in a thread so that a missing timeout fails this test instead of hanging the suite.
    client = threading.Thread(target=lambda: result.append(notify(cfg, False, "s", "b", logging.getLogger("t"))),
                              daemon=True)
    try:
        with caplog.at_level(logging.ERROR):
            start = time.monotonic()
            client.start()
            client.join(8)
            elapsed = time.monotonic() - start
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()  # also frees a client stuck without a timeout
        listener.close()
    assert not client.is_alive() and elapsed < 6, "notify blocked on a silent server: no timeout"
    assert result == [False]
    assert elapsed >= 1.5
    assert accepted, "the client never connected: the test did not exercise a hang"
    assert any("timed out after 2 s" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("handler_kwargs, expected", [
    ({"refuse_rcpt": ["*"]}, "refused the recipients: dba@example.com \\(550 no\\); ops@example.com \\(550 no\\)"),
    ({"refuse_data": True}, "refused the message: 550 no"),
    ({"refuse_rcpt": ["dba@example.com"]}, "accepted for ops@example.com but refused for dba@example.com"),
])
def test_server_refusals(handler_kwargs, expected, caplog):
    handler = Collector(**handler_kwargs)
    with Server(handler) as srv:
        cfg = make_cfg(srv.port)
        with pytest.raises(AlertError, match=expected):
            send_mail(cfg, "s", "b")
        with caplog.at_level(logging.ERROR):
            assert notify(cfg, False, "s", "b", logging.getLogger("t")) is False
    assert any(r.levelno == logging.ERROR and "550 no" in r.getMessage() for r in caplog.records)


def test_notify_never_raises_on_nonsense_config(caplog):
    cfg = make_cfg("not-a-port")
    with caplog.at_level(logging.ERROR):
        assert notify(cfg, False, "s", "b", None) is False
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    with pytest.raises(AlertError, match="SMTP_SECURITY"):
        send_mail(make_cfg(25, SMTP_SECURITY="tls"), "s", "b")


def test_a_password_is_never_sent_unencrypted_to_a_remote_server():
    cfg = types.SimpleNamespace(SMTP_HOST="mail.example.org", SMTP_PORT=25, SMTP_SECURITY="none",
                                SMTP_USER="backup", SMTP_PASSWORD="s3cret-pw", SMTP_TIMEOUT=2,
                                ALERT_EMAIL=["admin@example.org"], ALERT_FROM="b@example.org", ALERT_ON="failure")
    with pytest.raises(email_alert.AlertError) as error:
        email_alert.send_mail(cfg, "subject", "body")
    assert "unencrypted" in str(error.value) and "s3cret-pw" not in str(error.value)
