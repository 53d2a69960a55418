"""Tests for config.py: validation of raw values, .env loading, and the generated env.example / README table.

Pure logic plus small files in a temporary directory; no server.
"""

import io
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import config  # noqa: E402
from config import ConfigError  # noqa: E402


@pytest.fixture
def tree(tmp_path):
    """An Alfresco-shaped install: ALF_BASE_DIR with alf_data/contentstore, and a BACKUP_DIR beside it."""
    base = tmp_path / "alfresco"
    (base / "alf_data" / "contentstore").mkdir(parents=True)
    (base / "alf_data" / "postgresql").mkdir()
    backups = tmp_path / "backups"
    backups.mkdir()
    return {"base": str(base), "backups": str(backups), "store": str(base / "alf_data" / "contentstore"),
            "tmp": tmp_path}


def minimal(tree, **extra):
    raw = {"PGUSER": "alfresco", "ALF_BASE_DIR": tree["base"], "BACKUP_DIR": tree["backups"]}
    raw.update(extra)
    return raw


def problem_keys(exc):
    return [key for key, _msg in exc.problems]


def problem_for(exc, key):
    messages = [msg for k, msg in exc.problems if k == key]
    assert messages, "no problem reported for %s in %s" % (key, exc.problems)
    return messages[0]


# --- validate: good values and defaults -------------------------------------------------------------------

def test_minimal_config_gets_typed_defaults(tree):
    cfg = config.validate(minimal(tree))
    assert cfg.PGUSER == "alfresco"
    assert cfg.PGPORT == 5432 and isinstance(cfg.PGPORT, int)
    assert cfg.PGHOST == "localhost"
    assert cfg.PG_COMPRESSION == "zstd"
    assert cfg.RETENTION_DAYS == 7
    assert cfg.SMTP_SECURITY == "starttls"
    assert cfg.ALERT_ON == "failure"
    assert cfg.ALERT_EMAIL == []
    assert cfg.contentstore_dir == tree["store"]
    assert cfg.pgdata == os.path.join(tree["base"], "alf_data", "postgresql")
    assert cfg.wal_archive_dir == os.path.join(tree["backups"], "pg_wal")


def test_explicit_dirs_override_derived_ones(tree):
    store = tree["tmp"] / "elsewhere-store"
    store.mkdir()
    archive = str(tree["tmp"] / "archive")
    cfg = config.validate(minimal(tree, CONTENTSTORE_DIR=str(store), WAL_ARCHIVE_DIR=archive))
    assert cfg.contentstore_dir == str(store)
    assert cfg.wal_archive_dir == archive


def test_values_are_stripped_and_normalised(tree):
    cfg = config.validate(minimal(tree, PGPORT=" 5433 ", SMTP_SECURITY="SSL", PG_COMPRESSION="ZSTD:3",
                                  BACKUP_DIR=tree["backups"] + "//", ALERT_EMAIL=" a@example.com , b@example.org ",
                                  SMTP_HOST="mail.example.com"))
    assert cfg.PGPORT == 5433
    assert cfg.SMTP_SECURITY == "ssl"
    assert cfg.PG_COMPRESSION == "zstd:3"
    assert cfg.BACKUP_DIR == tree["backups"]
    assert cfg.ALERT_EMAIL == ["a@example.com", "b@example.org"]


@pytest.mark.parametrize("value", ["gzip", "zstd", "lz4", "none", "gzip:9", "zstd:19", "lz4:1"])
def test_good_compression_values(tree, value):
    assert config.validate(minimal(tree, PG_COMPRESSION=value)).PG_COMPRESSION == value


def test_secrets_lists_only_non_empty_secret_values(tree):
    cfg = config.validate(minimal(tree, PGPASSWORD="s3cret", SMTP_USER="u"))
    assert cfg.secrets() == ["s3cret"]
    assert ("SMTP_PASSWORD", "empty while SMTP_USER is set") in cfg.warnings


# --- validate: every problem at once ----------------------------------------------------------------------

def test_every_problem_is_reported_at_once_with_its_key(tree):
    raw = {
        "PGUSER": "",                              # empty required
        "PGPORT": "54x2",                          # not an integer
        "RETENTION_DAYS": "-1",                    # negative is not a whole number >= 0
        "ALF_BASE_DIR": "/nonexistent/alfresco",   # directory does not exist
        "BACKUP_DIR": "relative/backups",          # relative path
        "SMTP_SECURITY": "tls",                    # bad choice
        "SMTP_HOST": "mail.example.com",
        "ALERT_EMAIL": "admin@example.com, not-an-address",  # bad e-mail
        "PG_COMPRESSION": "brotli",                # bad compression
    }
    with pytest.raises(ConfigError) as info:
        config.validate(raw, env_path="/etc/x.env")
    keys = problem_keys(info.value)
    for key in ("PGUSER", "PGPORT", "RETENTION_DAYS", "ALF_BASE_DIR", "BACKUP_DIR", "SMTP_SECURITY",
                "ALERT_EMAIL", "PG_COMPRESSION"):
        assert key in keys, key
    assert "required" in problem_for(info.value, "PGUSER")
    assert "'54x2'" in problem_for(info.value, "PGPORT")
    assert "absolute" in problem_for(info.value, "BACKUP_DIR")
    assert "does not exist" in problem_for(info.value, "ALF_BASE_DIR")
    assert "starttls" in problem_for(info.value, "SMTP_SECURITY")
    assert "not-an-address" in problem_for(info.value, "ALERT_EMAIL")
    assert "brotli" in problem_for(info.value, "PG_COMPRESSION")
    text = str(info.value)
    assert "/etc/x.env" in text
    for key in keys:
        assert "%s: " % key in text


@pytest.mark.parametrize("key,value", [
    ("PGPORT", "5432.0"), ("PGPORT", "0x10"), ("SMTP_TIMEOUT", "thirty"), ("WAL_WAIT_TIMEOUT", "1e3")])
def test_non_integers_are_refused(tree, key, value):
    with pytest.raises(ConfigError) as info:
        config.validate(minimal(tree, **{key: value}))
    assert problem_keys(info.value) == [key]


@pytest.mark.parametrize("value", ["brotli", "gzip:", "gzip:level=3", "zstd:-1", "zstd:100", "gzip,zstd"])
def test_bad_compression_is_refused(tree, value):
    with pytest.raises(ConfigError) as info:
        config.validate(minimal(tree, PG_COMPRESSION=value))
    assert problem_keys(info.value) == ["PG_COMPRESSION"]


@pytest.mark.parametrize("value", ["gzip:10", "zstd:23", "lz4:99"])
def test_out_of_range_compression_level_is_refused(tree, value):
    with pytest.raises(ConfigError) as info:
        config.validate(minimal(tree, PG_COMPRESSION=value))
    assert problem_keys(info.value) == ["PG_COMPRESSION"]


@pytest.mark.parametrize("value", ["admin", "admin@", "@example.com", "a@b@c", "a b@example.com"])
def test_bad_email_is_refused(tree, value):
    with pytest.raises(ConfigError) as info:
        config.validate(minimal(tree, SMTP_HOST="mail.example.com", ALERT_EMAIL=value))
    assert "ALERT_EMAIL" in problem_keys(info.value)


def test_smtp_host_without_recipients_is_an_error(tree):
    with pytest.raises(ConfigError) as info:
        config.validate(minimal(tree, SMTP_HOST="mail.example.com"))
    assert problem_keys(info.value) == ["ALERT_EMAIL"]


def test_no_smtp_host_is_only_a_warning(tree):
    cfg = config.validate(minimal(tree))
    assert "SMTP_HOST" in [key for key, _ in cfg.warnings]


def test_secret_with_a_newline_is_refused_without_echoing_it(tree):
    with pytest.raises(ConfigError) as info:
        config.validate(minimal(tree, PGPASSWORD="abc\ndef-secret"))
    assert problem_keys(info.value) == ["PGPASSWORD"]
    assert "def-secret" not in str(info.value)


def test_path_with_newline_is_refused(tree):
    with pytest.raises(ConfigError) as info:
        config.validate(minimal(tree, WAL_ARCHIVE_DIR="/tmp/a\nb"))
    assert problem_keys(info.value) == ["WAL_ARCHIVE_DIR"]


@pytest.mark.parametrize("key", ["ALF_BASE_DIR", "PG_BIN_DIR", "PGDATA", "CONTENTSTORE_DIR"])
def test_missing_directories_are_refused(tree, key):
    raw = minimal(tree, **{key: str(tree["tmp"] / "missing")})
    with pytest.raises(ConfigError) as info:
        config.validate(raw)
    assert key in problem_keys(info.value)
    # Without check_paths the same values pass: the checks are what refuses them.
    config.validate(raw, check_paths=False)


def test_backup_dir_that_is_a_file_is_refused(tree):
    path = tree["tmp"] / "afile"
    path.write_text("x")
    with pytest.raises(ConfigError) as info:
        config.validate(minimal(tree, BACKUP_DIR=str(path)))
    assert problem_keys(info.value) == ["BACKUP_DIR"]


def test_missing_smtp_ca_file_is_refused(tree):
    with pytest.raises(ConfigError) as info:
        config.validate(minimal(tree, SMTP_CA_FILE=str(tree["tmp"] / "ca.pem")))
    assert problem_keys(info.value) == ["SMTP_CA_FILE"]


# --- BACKUP_DIR inside the contentstore ------------------------------------------------------------------

@pytest.mark.parametrize("sub", ["", "backups", "2024/nested/backups"])
def test_backup_dir_inside_default_contentstore_is_refused(tree, sub):
    backup_dir = os.path.join(tree["store"], sub) if sub else tree["store"]
    with pytest.raises(ConfigError) as info:
        config.validate(minimal(tree, BACKUP_DIR=backup_dir))
    assert "contentstore" in problem_for(info.value, "BACKUP_DIR")


def test_backup_dir_inside_explicit_contentstore_is_refused(tree):
    store = tree["tmp"] / "store"
    store.mkdir()
    with pytest.raises(ConfigError) as info:
        config.validate(minimal(tree, CONTENTSTORE_DIR=str(store), BACKUP_DIR=str(store / "bk")))
    assert problem_keys(info.value) == ["BACKUP_DIR"]


def test_backup_dir_inside_contentstore_through_a_symlink_is_refused(tree):
    link = tree["tmp"] / "link-to-store"
    link.symlink_to(tree["store"])
    with pytest.raises(ConfigError) as info:
        config.validate(minimal(tree, BACKUP_DIR=str(link / "backups")))
    assert problem_keys(info.value) == ["BACKUP_DIR"]


def test_sibling_with_contentstore_prefix_is_accepted(tree):
    sibling = tree["store"] + "-backups"
    os.mkdir(sibling)
    assert config.validate(minimal(tree, BACKUP_DIR=sibling)).BACKUP_DIR == sibling


# --- paths are literal -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["with space", "it's \"quoted\"", "$(touch pwned)", "a;rm -rf x", "`id`&|<>*?"])
def test_odd_characters_in_paths_are_literal(tree, name):
    base = tree["tmp"] / name
    (base / "alf_data" / "contentstore").mkdir(parents=True)
    cfg = config.validate(minimal(tree, ALF_BASE_DIR=str(base)))
    assert cfg.ALF_BASE_DIR == str(base)
    assert cfg.contentstore_dir == str(base / "alf_data" / "contentstore")
    assert not (tree["tmp"] / "pwned").exists()


def test_odd_characters_survive_the_env_file(tree):
    base = tree["tmp"] / "a b $(touch pwned); 'q' \"dq\""
    base.mkdir()
    env = tree["tmp"] / ".env"
    env.write_text("PGUSER=alfresco\nALF_BASE_DIR=%s\nBACKUP_DIR=%s\n" % (base, tree["backups"]))
    env.chmod(0o600)
    cfg = config.load_config(str(env))
    assert cfg.ALF_BASE_DIR == str(base)
    assert not (tree["tmp"] / "pwned").exists()


def test_env_file_values_are_not_interpolated_from_the_environment(tree, monkeypatch):
    monkeypatch.setenv("ALFBK_TEST_VAR", "from-environment")
    env = tree["tmp"] / ".env"
    env.write_text("PGUSER=alfresco\nALF_BASE_DIR=%s\nBACKUP_DIR=%s\nPGPASSWORD=pa${ALFBK_TEST_VAR}ss\n"
                   % (tree["base"], tree["backups"]))
    env.chmod(0o600)
    assert config.load_config(str(env)).PGPASSWORD == "pa${ALFBK_TEST_VAR}ss"


# --- warnings --------------------------------------------------------------------------------------------

def test_unknown_key_is_a_warning_not_an_error(tree):
    cfg = config.validate(minimal(tree, PGPASWORD="typo"))
    assert ("PGPASWORD", "unknown key, ignored") in cfg.warnings


def test_env_file_readable_by_others_warns_with_chmod(tree):
    env = tree["tmp"] / ".env"
    env.write_text("PGUSER=alfresco\nALF_BASE_DIR=%s\nBACKUP_DIR=%s\n" % (tree["base"], tree["backups"]))
    env.chmod(0o644)
    cfg = config.load_config(str(env))
    messages = [msg for key, msg in cfg.warnings if key == "--env"]
    assert len(messages) == 1 and "chmod 600" in messages[0]
    env.chmod(0o600)
    cfg = config.load_config(str(env))
    assert [msg for key, msg in cfg.warnings if key == "--env"] == []
    assert cfg.env_path == str(env)


def test_load_config_reads_values_and_reports_problems_with_path(tree):
    env = tree["tmp"] / ".env"
    env.write_text("# comment\nPGUSER=alfresco\nALF_BASE_DIR=%s\nBACKUP_DIR=%s\nPGPORT=abc\n"
                   % (tree["base"], tree["backups"]))
    env.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        config.load_config(str(env))
    assert problem_keys(info.value) == ["PGPORT"]
    assert info.value.path == str(env)


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load_config(str(tmp_path / "nope.env"))
    assert problem_keys(info.value) == ["--env"]
    assert "not found" in str(info.value)


def test_environment_does_not_override_env_file(tree, monkeypatch):
    monkeypatch.setenv("PGUSER", "from-cron")
    monkeypatch.setenv("PGPORT", "9999")
    env = tree["tmp"] / ".env"
    env.write_text("PGUSER=alfresco\nALF_BASE_DIR=%s\nBACKUP_DIR=%s\n" % (tree["base"], tree["backups"]))
    env.chmod(0o600)
    cfg = config.load_config(str(env))
    assert cfg.PGUSER == "alfresco"
    assert cfg.PGPORT == 5432


# --- mail_config -----------------------------------------------------------------------------------------

def test_mail_config_needs_host_and_valid_recipients():
    assert config.mail_config({}) is None
    assert config.mail_config({"SMTP_HOST": "mail.example.com"}) is None
    assert config.mail_config({"ALERT_EMAIL": "a@example.com"}) is None
    assert config.mail_config({"SMTP_HOST": "mail.example.com", "ALERT_EMAIL": "not-an-address"}) is None
    assert config.mail_config({"SMTP_HOST": "mail.example.com", "ALERT_EMAIL": "a@example.com",
                               "SMTP_PORT": "x"}) is None


def test_mail_config_ignores_problems_outside_mail_settings():
    mail = config.mail_config({"SMTP_HOST": " mail.example.com ", "ALERT_EMAIL": "a@example.com,b@example.com",
                               "PGPORT": "garbage", "SMTP_SECURITY": "SSL", "SMTP_PASSWORD": "pw"})
    assert mail is not None
    assert mail.SMTP_HOST == "mail.example.com"
    assert mail.ALERT_EMAIL == ["a@example.com", "b@example.com"]
    assert mail.SMTP_PORT == 587 and mail.SMTP_TIMEOUT == 30
    assert mail.SMTP_SECURITY == "ssl"
    assert mail.ALERT_ON == "failure"
    assert mail.secrets() == ["pw"]
    assert not hasattr(mail, "PGPORT")


# --- generated files -------------------------------------------------------------------------------------

def test_env_example_has_every_option_with_its_default():
    text = config.env_example()
    for name, _kind, default, _required, description, _secret in config.OPTIONS:
        assert re.search(r"^%s=%s$" % (re.escape(name), re.escape(default or "")), text, re.M), name
        assert description in text
    assert "chmod 600" in text


def test_env_example_parses_and_only_required_keys_are_missing():
    from dotenv import dotenv_values

    values = dotenv_values(stream=io.StringIO(config.env_example()))
    assert sorted(values) == sorted(config.OPTION_NAMES)
    with pytest.raises(ConfigError) as info:
        config.validate({k: v or "" for k, v in values.items()}, check_paths=False)
    required = [row[0] for row in config.OPTIONS if row[3]]
    assert sorted(problem_keys(info.value)) == sorted(required)


def test_markdown_table_has_one_well_formed_row_per_option():
    lines = config.markdown_table().splitlines()
    assert lines[0].startswith("| Key |")
    rows = lines[2:]
    assert len(rows) == len(config.OPTIONS)
    for row, option in zip(rows, config.OPTIONS):
        assert row.startswith("| `%s` |" % option[0])
        # Five columns: a stray '|' (e.g. from a choice type) would break the table.
        assert row.count("|") == 6, row
        if option[5]:
            assert "(secret)" in row


def test_option_table_is_consistent():
    assert len(set(config.OPTION_NAMES)) == len(config.OPTION_NAMES)
    for name, kind, default, required, description, _secret in config.OPTIONS:
        kinds = ("str", "int", "port", "bool", "path", "emails", "compression", "url", "name")
        assert kind in kinds or kind.startswith("choice:"), name
        assert description
        assert not (required and default), name
        if default:
            problems = []
            config._convert(name, kind, default, problems)
            assert problems == [], name


def test_cli_prints_generated_files(tmp_path):
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config.py")
    out = subprocess.run([sys.executable, script, "--env-example"], stdout=subprocess.PIPE, check=True)
    assert out.stdout.decode() == config.env_example() + "\n"
    bad = subprocess.run([sys.executable, script], capture_output=True)
    assert bad.returncode != 0 and b"usage" in bad.stderr


def test_config_error_lists_problems():
    exc = ConfigError([("A", "bad"), ("B", "worse")], "/x/.env")
    assert exc.problems == [("A", "bad"), ("B", "worse")]
    assert "A: bad" in str(exc) and "B: worse" in str(exc)



@pytest.mark.parametrize("raw,expected", [("true", True), ("YES", True), ("1", True), ("off", False),
                                          ("false", False), ("0", False)])
def test_bool_values(tree, raw, expected):
    assert config.validate(minimal(tree, VERIFY_AFTER_BACKUP=raw)).VERIFY_AFTER_BACKUP is expected


def test_bad_bool_is_named(tree):
    with pytest.raises(config.ConfigError) as error:
        config.validate(minimal(tree, VERIFY_AFTER_BACKUP="maybe"))
    assert error.value.problems == [("VERIFY_AFTER_BACKUP", "must be true or false, got 'maybe'")]
