"""Hostile input: every ``.env`` key wrong in each way that matters, paths and passwords full of shell syntax
that must simply work, an ``.env`` readable by others, contentstore file names no shell would survive,
symlinks in the contentstore, and a BACKUP_DIR inside the contentstore.

Each is either handled correctly (proved end to end, with markers that a shell would have created) or
refused with a message naming the key or the file."""

import os
import secrets
import stat
import time

import catalog
import config
import faultkit
import pytest
from sandbox import dotenv_quote

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs backup.py as the service user (needs root)")


# ------------------------------------------------------------------------------------------- .env, key by key

@pytest.fixture
def tree(tmp_path):
    """A minimal valid install: {'env': path of a writer function's output, 'base', 'backup', ...}."""
    base = tmp_path / "alfresco"
    (base / "alf_data" / "contentstore").mkdir(parents=True)
    (base / "alf_data" / "postgresql").mkdir()
    (base / "postgresql" / "bin").mkdir(parents=True)
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    return {"root": str(tmp_path), "base": str(base), "backup": str(backup_dir)}


def write_env(tree, raw_lines=(), **values):
    """A .env with valid required keys, ``values`` (None removes a key) and ``raw_lines`` verbatim."""
    settings = {"PGUSER": "alfresco", "PGPASSWORD": "pw", "ALF_BASE_DIR": tree["base"], "BACKUP_DIR": tree["backup"]}
    settings.update(values)
    lines = ["%s=%s" % (k, dotenv_quote(v)) for k, v in settings.items() if v is not None] + list(raw_lines)
    path = os.path.join(tree["root"], "test.env")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return path


def problems(tree, raw_lines=(), **values):
    """{key: message} of the ConfigError load_config raises (empty dict when the file is valid)."""
    try:
        config.load_config(write_env(tree, raw_lines, **values))
    except config.ConfigError as exc:
        found = {}
        for key, message in exc.problems:
            found[key] = found[key] + "; " + message if key in found else message
        return found
    return {}


INT_KEYS = [name for name, kind, *_rest in config.OPTIONS if kind in ("int", "port")]
PATH_KEYS = [name for name, kind, *_rest in config.OPTIONS if kind == "path"]
CHOICE_KEYS = [name for name, kind, *_rest in config.OPTIONS if kind.startswith("choice:")]
STR_KEYS = [name for name, kind, *_rest in config.OPTIONS if kind == "str"]
BOOL_KEYS = [name for name, kind, *_rest in config.OPTIONS if kind == "bool"]
REQUIRED = [name for name, _kind, _default, required, *_rest in config.OPTIONS if required]
HOSTILE = ["$(touch /tmp/pwned)", "1; rm -rf /", "`id`"]


def test_the_option_table_is_what_these_tests_cover():
    kinds = {kind.split(":")[0] for _name, kind, *_rest in config.OPTIONS}
    assert kinds <= {"str", "int", "port", "path", "choice", "emails", "compression", "bool", "url", "name"}, kinds
    assert len(INT_KEYS) >= 10 and len(PATH_KEYS) >= 6 and len(CHOICE_KEYS) == 4


@pytest.mark.parametrize("key", INT_KEYS)
@pytest.mark.parametrize("value", ["five", "-3", "1.5", "0x10", "1e3"] + HOSTILE)
def test_int_keys_refuse_anything_but_a_whole_number(tree, key, value):
    found = problems(tree, **{key: value})
    assert key in found and ("must be a whole number" in found[key] or "must be a port number" in found[key]), found


@pytest.mark.parametrize("key", PATH_KEYS)
@pytest.mark.parametrize("value", ["relative/dir", "./here", "~/backups", "$HOME/x", "$(pwd)/x"])
def test_path_keys_refuse_relative_paths(tree, key, value):
    found = problems(tree, **{key: value})
    assert key in found and "must be an absolute path" in found[key], found


@pytest.mark.parametrize("value", ["hc-ping.com/uuid-secret", "ftp://host/uuid-secret", "https:///uuid-secret",
                                   "https://host/uuid-secret two", "https://host/uuid-secret\tx"] + HOSTILE)
def test_ping_url_refuses_what_is_not_http_and_never_shows_it(tree, value):
    found = problems(tree, PING_URL=value)
    assert "must be an http:// or https:// URL" in found.get("PING_URL", ""), found
    assert "uuid-secret" not in found["PING_URL"] and "pwned" not in found["PING_URL"]


@pytest.mark.parametrize("value", ["a\tb", "x" * 65, "new\u2028line"])
def test_installation_name_is_one_short_printable_line(tree, value):
    assert "INSTALLATION_NAME" in problems(tree, INSTALLATION_NAME=value)


@pytest.mark.parametrize("value", HOSTILE + ["Kunde Müller GmbH", 'say "hi" \\ {x}'])
def test_installation_name_with_shell_syntax_is_kept_literally(tree, value):
    assert config.load_config(write_env(tree, INSTALLATION_NAME=value)).installation_name == value


@pytest.mark.parametrize("key", ["ALF_BASE_DIR", "PG_BIN_DIR", "PGDATA", "CONTENTSTORE_DIR", "SMTP_CA_FILE",
                                 "PING_CA_FILE", "METRICS_FILE"])
def test_path_keys_that_must_exist_name_the_missing_path(tree, key):
    missing = os.path.join(tree["root"], "nowhere; $(touch x)", "dir")
    found = problems(tree, **{key: missing})
    assert key in found and "does not exist" in found[key] and missing in found[key], found


@pytest.mark.parametrize("key", ["PGPORT", "SMTP_PORT"])
def test_ports_out_of_range(tree, key):
    found = problems(tree, **{key: "70000"})
    assert key in found, found


def test_backup_dir_that_is_a_file(tree):
    path = os.path.join(tree["root"], "a-file")
    open(path, "w").close()
    found = problems(tree, BACKUP_DIR=path)
    assert "not a directory" in found.get("BACKUP_DIR", ""), found


@pytest.mark.parametrize("key", CHOICE_KEYS)
@pytest.mark.parametrize("value", ["bogus", "rsync; ls", "$(id)"])
def test_choice_keys_name_the_allowed_values(tree, key, value):
    found = problems(tree, **{key: value})
    assert key in found and "must be one of" in found[key], found


@pytest.mark.parametrize("key", BOOL_KEYS)
@pytest.mark.parametrize("value", ["maybe", "2", "true; ls", "$(id)"])
def test_bool_keys_refuse_anything_but_true_or_false(tree, key, value):
    found = problems(tree, **{key: value})
    assert key in found and "must be true or false" in found[key], found


@pytest.mark.parametrize("value", ["bzip2", "zstd:99", "gzip:0", "none:3", "zstd; ls", "server-", "zstd:$(id)"])
def test_compression_refuses_bad_methods_and_levels(tree, value):
    found = problems(tree, PG_COMPRESSION=value)
    assert "PG_COMPRESSION" in found, found


@pytest.mark.parametrize("value", ["not-an-address", "a@b, nobody", "two words@x.org"])
def test_alert_email_refuses_non_addresses(tree, value):
    found = problems(tree, SMTP_HOST="127.0.0.1", ALERT_EMAIL=value)
    assert "not an e-mail address" in found.get("ALERT_EMAIL", ""), found


@pytest.mark.parametrize("key", STR_KEYS)
def test_str_keys_refuse_a_second_line(tree, key):
    values = {key: "first\nsecond"}
    if key == "SMTP_HOST":
        values["ALERT_EMAIL"] = "a@b.org"
    found = problems(tree, **values)
    assert key in found and "single line" in found[key], found


@pytest.mark.parametrize("key", REQUIRED)
@pytest.mark.parametrize("value", ["", "   ", None])
def test_required_keys_empty_or_missing(tree, key, value):
    found = problems(tree, **{key: value})
    assert found.get(key) == "is required but not set", found


def test_every_optional_key_empty_means_its_default(tree):
    optional = [(name, default) for name, _kind, default, required, *_rest in config.OPTIONS if not required]
    cfg = config.load_config(write_env(tree, **{name: "" for name, _default in optional}))
    assert cfg.PGPORT == 5432 and cfg.RETENTION_DAYS == 7 and cfg.PG_COMPRESSION == "zstd"
    assert cfg.CONTENTSTORE_DIR == "" and cfg.contentstore_dir == os.path.join(tree["base"], "alf_data", "contentstore")
    assert cfg.SMTP_HOST == "" and cfg.ALERT_EMAIL == [] and cfg.ALERT_ON == "failure"


def test_all_bad_keys_are_named_at_once(tree):
    found = problems(tree, PGPORT="x", RETENTION_DAYS="-1", BACKUP_DIR="rel", PG_COMPRESSION="zip",
                     ALERT_ON="sometimes", PGUSER="")
    assert set(found) >= {"PGPORT", "RETENTION_DAYS", "BACKUP_DIR", "PG_COMPRESSION", "ALERT_ON", "PGUSER"}, found


def test_values_are_never_interpolated_or_executed(tree):
    """python-dotenv reads ``${VAR}`` literally here (interpolate=False); nothing is run."""
    marker = os.path.join(tree["root"], "pwned")
    weird = os.path.join(tree["root"], "${HOME} $(touch %s) `touch %s`" % (marker, marker))
    os.makedirs(weird)
    raw = ["BACKUP_DIR='%s'" % weird, "PGPASSWORD=\"${HOME}$(touch %s)\"" % marker]
    cfg = config.load_config(write_env(tree, raw_lines=raw, BACKUP_DIR=None, PGPASSWORD=None))
    assert cfg.BACKUP_DIR == weird
    assert cfg.PGPASSWORD == "${HOME}$(touch %s)" % marker
    assert not os.path.exists(marker)


def test_unknown_key_and_surrounding_spaces(tree):
    cfg = config.load_config(write_env(tree, PGPORT="  5433 ", PG_COMPRESION="gzip"))
    assert cfg.PGPORT == 5433
    assert ("PG_COMPRESION", "unknown key, ignored") in cfg.warnings


def test_env_readable_by_others_is_a_warning(tree):
    path = write_env(tree)
    os.chmod(path, 0o644)
    cfg = config.load_config(path)
    assert any(key == "--env" and "readable by other users (mode 644)" in msg for key, msg in cfg.warnings)


def test_missing_or_unreadable_env(tree):
    with pytest.raises(config.ConfigError) as missing:
        config.load_config(os.path.join(tree["root"], "no.env"))
    assert "file not found" in str(missing.value)
    path = write_env(tree)
    os.chmod(path, 0)
    if os.geteuid() != 0:  # root reads anything
        with pytest.raises(config.ConfigError) as unreadable:
            config.load_config(path)
        assert "cannot read" in str(unreadable.value)


@pytest.mark.parametrize("how", ["inside", "same", "symlink"])
def test_backup_dir_inside_the_contentstore_is_refused(tree, how):
    store = os.path.join(tree["base"], "alf_data", "contentstore")
    if how == "inside":
        target = os.path.join(store, "backups")
    elif how == "same":
        target = store
    else:
        os.mkdir(os.path.join(store, "sub"))
        target = os.path.join(tree["root"], "looks-elsewhere")
        os.symlink(os.path.join(store, "sub"), target)
    found = problems(tree, BACKUP_DIR=target)
    assert "must not be inside the contentstore" in found.get("BACKUP_DIR", ""), found


# ------------------------------------------------------------------------------------------- end to end

def _markers(token):
    return ["/tmp/pwned-%s-%d" % (token, i) for i in range(4)]


def _hostile_name(markers):
    """A path fragment with spaces, quotes, $(), backquotes and ; -- each would run a command in a shell."""
    return ("back ups; $(touch %s) `touch %s` 'q' \"dq\" #h & touch %s | touch %s"
            % tuple(markers))


@needs_root
def test_cli_refuses_bad_keys_and_runs_nothing(sandbox):
    sb = sandbox
    markers = _markers(secrets.token_hex(4))
    env_path = sb.write_env(PGPORT="5432; touch %s" % markers[0], RETENTION_DAYS="$(touch %s)" % markers[1],
                            PG_COMPRESSION="zstd`touch %s`" % markers[2],
                            CONTENTSTORE_METHOD="auto|touch " + markers[3])
    result = sb.run_cli("backup.py", env_path=env_path)
    assert result.returncode == EXIT_CONFIG
    for key in ("PGPORT", "RETENTION_DAYS", "PG_COMPRESSION", "CONTENTSTORE_METHOD"):
        assert key in result.stderr, key
    assert not [m for m in markers if os.path.exists(m)]
    assert not os.path.exists(os.path.join(sb.backup_dir, "postgres"))


@needs_root
@pytest.mark.slow
def test_hostile_paths_and_password_work_end_to_end(sandbox_factory):
    token = secrets.token_hex(4)
    markers = _markers(token)
    password = "p w'\"$(touch %s);`touch %s`#\\x" % (markers[0], markers[1])
    sb = sandbox_factory(alfresco_password=password)
    try:
        backup_dir = os.path.join(sb.root, _hostile_name(markers))
        store = os.path.join(sb.root, "content " + _hostile_name(markers))
        for path in (backup_dir, store):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mkdir(backup_dir, 0o700)
        os.rename(sb.contentstore_dir, store)
        bin_dir = os.path.join(sb.root, "pg bin " + _hostile_name(markers))
        os.makedirs(bin_dir)
        for name in os.listdir(sb.pg_bin):
            os.symlink(os.path.join(sb.real_pg_bin, name), os.path.join(bin_dir, name))
        sb.chown_to_service_user(sb.root)
        env_path = sb.write_env(BACKUP_DIR=backup_dir, CONTENTSTORE_DIR=store, WAL_ARCHIVE_DIR=sb.wal_archive_dir,
                                PG_BIN_DIR=bin_dir)
        os.chmod(env_path, 0o644)  # readable by others: a warning, the run goes on
        first = sb.run_cli("backup.py", env_path=env_path)
        assert first.returncode == EXIT_OK, first.stdout[-3000:] + first.stderr
        assert "is readable by other users (mode 644)" in first.stdout
        assert "using %s" % os.path.join(bin_dir, "pg_basebackup") in first.stdout
        time.sleep(1)
        tonight = os.path.join(store, "2025", "new tonight $(touch %s).bin" % markers[2].replace("/", "_"))
        with open(tonight, "wb") as new:
            new.write(b"tonight")
        sb.chown_to_service_user(store)
        nightly = sb.run_cli("backup.py", env_path=env_path)
        assert nightly.returncode == EXIT_OK, nightly.stdout[-3000:]
        snaps = [e for e in faultkit.entries(sb, "contentstore", backup_dir) if e.status == catalog.DONE]
        bases = [e for e in faultkit.entries(sb, "postgres", backup_dir) if e.status == catalog.DONE]
        assert len(snaps) == 2 and len(bases) == 2
        assert faultkit.tree_state(snaps[-1].path) == faultkit.tree_state(store)
        for text in (first.stdout, nightly.stdout, faultkit.backup_log(sb, backup_dir)):
            assert password not in text
        assert not [m for m in markers if os.path.exists(m)], "a shell ran part of a path or the password"
    finally:
        for marker in markers:
            if os.path.exists(marker):
                os.unlink(marker)


@needs_root
def test_restore_drill_with_a_hostile_backup_dir_runs_nothing(sandbox):
    sb = sandbox
    if not os.path.isfile(os.path.join(sb.project_dir, "restore.py")):
        pytest.skip("restore.py not yet written")
    markers = _markers(secrets.token_hex(4))
    try:
        backup_dir = os.path.join(sb.root, "b $(touch %s) `touch %s`" % (markers[0], markers[1]))
        os.makedirs(os.path.dirname(backup_dir), exist_ok=True)
        os.mkdir(backup_dir, 0o700)
        sb.chown_to_service_user(sb.root)
        env_path = sb.write_env(BACKUP_DIR=backup_dir, WAL_ARCHIVE_DIR=sb.wal_archive_dir)
        result = sb.run_cli("backup.py", env_path=env_path)
        assert result.returncode == EXIT_OK, result.stdout[-3000:]
        assert not [m for m in markers if os.path.exists(m)]
        verify = sb.run_cli("restore.py", args=["verify"], env_path=env_path)
        ran = [m for m in markers if os.path.exists(m)]
        assert not ran, "the restore drill ran a command from BACKUP_DIR's name: %s" % ran
        # Either the drill works, or it refuses the path before starting anything.
        assert verify.returncode == EXIT_OK or "BACKUP_DIR" in verify.stdout + verify.stderr, verify.stdout[-2000:]
    finally:
        for marker in markers:
            if os.path.exists(marker):
                os.unlink(marker)


def _odd_names(sb):
    """Create files no shell would survive, and symlinks pointing inside and outside the store."""
    store = os.fsencode(sb.contentstore_dir)
    outside = os.path.join(sb.root, "outside")
    os.mkdir(outside)
    with open(os.path.join(outside, "secret.txt"), "w") as handle:
        handle.write("not content\n")
    bucket = os.path.join(store, b"2024", b"3", b"7", b"14", b"5")
    odd_files = [
        os.path.join(bucket, b"with space.bin"),
        os.path.join(bucket, b"new\nline.bin"),
        os.path.join(store, b"-rf"),
        os.path.join(store, b"--delete.bin"),
        os.path.join(store, b"-e ssh"),
        os.path.join(bucket, b"\xff\xfe-latin1-\xe9.bin"),
        os.path.join(bucket, "ünïcødé.bin".encode()),
        os.path.join(store, b"-dir with space", b"$(touch x); `y`.bin"),
        os.path.join(store, b"quote's \"dq\".bin"),
    ]
    for path in odd_files:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(os.urandom(512) + path)
    os.symlink(b"2024/3/7/14/5/with space.bin", os.path.join(store, b"link-inside"))
    os.symlink(os.path.join(outside, "secret.txt").encode(), os.path.join(store, b"link-outside"))
    os.symlink(outside.encode(), os.path.join(store, b"dir-link-outside"))
    os.symlink(b"nowhere/at/all", os.path.join(store, b"dangling"))
    sb.chown_to_service_user(sb.contentstore_dir)
    return odd_files


@needs_root
@pytest.mark.slow
def test_odd_file_names_and_symlinks_are_copied_exactly(sandbox):
    sb = sandbox
    _odd_names(sb)
    for night, method in enumerate(["auto", "auto", "rsync"]):  # rsync first copy, linktree, rsync --link-dest
        if night:
            with open(os.path.join(os.fsencode(sb.contentstore_dir), b"2024", b"night-%d \n -x.bin" % night),
                      "wb") as handle:
                handle.write(b"new tonight")
            sb.chown_to_service_user(sb.contentstore_dir)
            time.sleep(1)
        result = sb.run_cli("backup.py", env_path=sb.write_env(CONTENTSTORE_METHOD=method))
        assert result.returncode == EXIT_OK, result.stdout[-3000:]
        snap = [e for e in faultkit.entries(sb, "contentstore") if e.status == catalog.DONE][-1]
        expected, actual = faultkit.tree_state(sb.contentstore_dir), faultkit.tree_state(snap.path)
        assert actual == expected, "night %d (%s):\n%s" % (night, method, faultkit.diff_trees(expected, actual))
        # Symlinks are copied as symlinks: nothing outside the store was followed into the snapshot.
        link = os.path.join(os.fsencode(snap.path), b"dir-link-outside")
        assert os.path.islink(link) and not os.path.exists(os.path.join(snap.path, "secret.txt"))
        assert stat.S_IMODE(os.stat(snap.path).st_mode) == 0o700
    assert snap.info["link_dest"] and not snap.info["link_dest"].endswith(".partial")
