"""pgwire.py and setup_db.Psql against a real server (the sandbox) and fake ones (tests/fakepg.py): SCRAM and
md5 logins, output shaped exactly like ``psql -A -t`` (psql itself is the oracle), values quoted right
whatever standard_conforming_strings says, replication sessions, peer logins as the OS user, and a server
that is not the real one never getting a password."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import pgtext
import pgwire
import pytest
import setup_db
import setup_sys
from fakepg import FakeServer
from setup_sys import SetupError

TESTS = os.path.dirname(os.path.abspath(__file__))
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="acts as other OS users")


def session(sb, user="alfresco", password=None, host=None, os_user=None, database="alfresco"):
    password = {"alfresco": sb.alfresco_password, "postgres": sb.superuser_password}.get(user) \
        if password is None else password
    return setup_db.Psql(None, host or sb.socket_dir, sb.port, database, user, password,
                         os_user or setup_sys.User.named(sb.service_user), sb.uid)


def prepend_hba(sb, line):
    path = os.path.join(sb.pgdata, "pg_hba.conf")
    with open(path) as handle:
        text = handle.read()
    with open(path, "w") as handle:
        handle.write(line + "\n" + text)
    sb.chown_to_service_user(path)
    sb.reload()
    time.sleep(0.5)


QUERIES = ["SELECT 1", "SELECT NULL::text, 'a|b', E'two\\nlines', true, false, ''",
           "SELECT g, g * 2 FROM generate_series(1, 3) g", "SELECT 1; SELECT 2;", "SELECT 'grüße ✓'",
           "SELECT 1 WHERE false", "SHOW server_version_num", "-- only a comment\nSELECT 'x;y' AS \"a;b\"",
           "SELECT json_agg(x) FROM (VALUES (1), (NULL)) v(x)", "SELECT $body$ ; $body$"]


def test_output_is_what_psql_prints(sandbox):
    for sql in QUERIES:
        assert session(sandbox).run(sql).strip() == sandbox.psql(sql), sql


TRICKY = ["it's", "back\\slash", "\\'; DROP TABLE alf_node; --", "$$ dollar $$", ":'v'", "grüße", 'a"b', "x\ny", ""]


@pytest.mark.parametrize("conforming", ["on", "off"])
def test_values_are_quoted_whatever_standard_conforming_strings_says(sandbox, conforming):
    db = session(sandbox)
    for value in TRICKY:
        got = db.run("SET standard_conforming_strings = %s; SELECT :'v' = %s, length(:'v')" % (
            conforming, pgtext.quote_literal(value)), {"v": value})
        assert got == "t|%d" % len(value), (value, got)
        if value:
            name = db.run('CREATE TEMP TABLE :"n" (x int); SELECT relname FROM pg_class WHERE relname = :\'n\'',
                          {"n": value})
            assert name == value
    assert sandbox.psql("SELECT count(*) FROM alf_node") != ""  # nothing injected


def test_wrong_or_missing_passwords_read_like_psql(sandbox):
    with pytest.raises(SetupError, match='login as role alfresco .*password authentication failed for user "alfresco"'):
        session(sandbox, password="wrong").run("SELECT 1")
    with pytest.raises(SetupError, match="no password supplied"):
        session(sandbox, password="").run("SELECT 1")
    with pytest.raises(SetupError, match="SQL as role alfresco .*relation \"nowhere\" does not exist"):
        session(sandbox).run("SELECT * FROM nowhere")


def test_md5_login_over_tcp(sandbox):
    sandbox.psql("SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD 'm d5''pw';", user="postgres")
    assert sandbox.psql("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'md5user'",
                        user="postgres") == "md5"
    prepend_hba(sandbox, "host all md5user 127.0.0.1/32 md5")
    db = session(sandbox, user="md5user", password="m d5'pw", host="127.0.0.1")
    assert db.run("SELECT current_user") == "md5user"


def test_a_replication_session_identifies_the_system(sandbox):
    out = session(sandbox).run("IDENTIFY_SYSTEM", replication=True)
    system_id = sandbox.psql("SELECT system_identifier FROM pg_control_system()", user="postgres")
    assert out.split("|")[0] == system_id


@root_only
def test_a_peer_login_is_made_as_the_os_user(sandbox):
    sb = sandbox
    sb.psql('CREATE ROLE "%s" LOGIN' % sb.service_user, user="postgres")
    prepend_hba(sb, "local all %s peer" % sb.service_user)
    db = session(sb, user=sb.service_user, password="", os_user=setup_sys.User.named(sb.service_user))
    assert db.run("SELECT current_user") == sb.service_user
    with pytest.raises(SetupError, match="Peer authentication failed"):
        session(sb, user=sb.service_user, password="", os_user=setup_sys.me()).run("SELECT 1")


@pytest.mark.parametrize("mode,message", [("cleartext", "clear text"), ("scram-forged", "signature is wrong"),
                                          ("ok-without-proof", "without proving")])
def test_a_fake_server_never_gets_the_password(tmp_path, mode, message):
    fake = FakeServer(str(tmp_path), 5999, mode).start()
    try:
        db = setup_db.Psql(None, str(tmp_path), 5999, "dbname=alfresco host=/elsewhere", "postgres", "s3cret-pw",
                           setup_sys.me())
        with pytest.raises(SetupError, match=message):
            db.run("SELECT 1")
    finally:
        fake.stop()
    (seen,) = fake.sessions
    # The database name went as a name, never parsed as a connection string; no password in any form.
    assert seen["startup"]["database"] == "dbname=alfresco host=/elsewhere" and seen["startup"]["user"] == "postgres"
    assert seen["password"] is None and b"s3cret-pw" not in seen["initial"] and seen["queries"] == []


@pytest.fixture
def public_dir(service_user):
    """A directory under /tmp the service user owns (pytest's tmp_path is not reachable for it)."""
    path = tempfile.mkdtemp(prefix="pgwire-", dir="/tmp")
    os.chown(path, service_user.uid, service_user.gid)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


@root_only
def test_a_socket_of_another_user_gets_nothing(public_dir, service_user):
    directory = public_dir
    record = directory / "sessions.jsonl"
    fake = subprocess.Popen([sys.executable, os.path.join(TESTS, "fakepg.py"), str(directory), "5998", "silent",
                             str(record)], user=service_user.uid, group=service_user.gid, extra_groups=[],
                            cwd="/")
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(str(directory / ".s.PGSQL.5998")) and time.monotonic() < deadline:
            time.sleep(0.05)
        nobody = 65534  # the server is said to run as nobody: the service user's socket is not it
        db = setup_db.Psql(None, str(directory), 5998, "alfresco", "postgres", "s3cret-pw", setup_sys.me(), nobody)
        with pytest.raises(SetupError, match="served by a process of uid %d" % service_user.uid):
            db.run("SELECT 1")
        # The same listener, taken for the server, does get a startup packet: the check is what stopped it.
        trusted = setup_db.Psql(None, str(directory), 5998, "alfresco", "postgres", "s3cret-pw", setup_sys.me(),
                                service_user.uid)
        with pytest.raises(SetupError):
            trusted.run("SELECT 1", timeout=2)
        deadline = time.monotonic() + 20
        while (not record.exists() or len(record.read_text().splitlines()) < 2) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        fake.kill()
        fake.wait()
    refused, trusted_session = [json.loads(line) for line in record.read_text().splitlines()]
    assert refused["initial"] == "" and "user\x00postgres" in trusted_session["initial"]


# ---- pure parts ----------------------------------------------------------------------------------------------
def test_statements_split_and_bind_like_psql():
    split = pgtext.statements("SELECT :'a', :\"b\"; SELECT ':''a''' || $q$:'a';$q$ -- :'a' ;\n; /* ; */ SELECT 1::int",
                              {"a": "it's", "b": "x"})
    assert split == ["SELECT 'it''s', \"x\";", "SELECT ':''a''' || $q$:'a';$q$ -- :'a' ;\n;",
                     "/* ; */ SELECT 1::int"]
    assert pgtext.statements("CREATE RULE r AS ON INSERT TO t DO (SELECT 1; SELECT 2);") == [
        "CREATE RULE r AS ON INSERT TO t DO (SELECT 1; SELECT 2);"]
    assert pgtext.statements("-- nothing\n ; ;") == []
    with pytest.raises(KeyError):
        pgtext.statements("SELECT :'missing'")
    assert pgtext.quote_literal("a\\b'c") == " E'a\\\\b''c'" and pgtext.quote_ident('x"y') == '"x""y"'
    with pytest.raises(ValueError):
        pgtext.quote_literal("nul\0")


def test_pgpass_follows_libpq_rules():
    text = "# comment\n/srv/run:5432:alfresco:alfresco:first\nlocalhost:*:*:postgres:p\\:w\\\\x\n*:*:*:*:any\n"
    assert setup_db.pgpass_password(text, "/srv/run", 5432, "alfresco", "alfresco") == "first"
    assert setup_db.pgpass_password(text, "/tmp", 5432, "x", "postgres") == "p:w\\x"
    assert setup_db.pgpass_password(text, "/srv/run", 5432, "x", "postgres") == "any"
    assert setup_db.pgpass_password("h:1:d:u\n", "h", 1, "d", "u") is None


def test_saslprep_maps_like_rfc_4013():
    assert pgwire.saslprep("plain ascii\x07") == "plain ascii\x07"
    assert pgwire.saslprep("I\u00adX") == "IX" and pgwire.saslprep("\u2168") == "IX"
    assert pgwire.saslprep("a\u0007é") == "a\u0007é"  # prohibited: used as it is, like PostgreSQL
