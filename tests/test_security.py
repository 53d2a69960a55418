"""Security of a real run: backups, logs and metadata private to the service user; the database and SMTP
passwords never on a command line, in a log, a mail or a traceback; SMTP TLS certificates verified; nothing
in the product runs through a shell."""

import ast
import email
import json
import os
import shutil
import ssl
import stat
import subprocess
import threading
import time

import catalog
import faultkit
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from sandbox import free_port

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs backup.py as the service user (needs root)")
SMTP_USER = "backup-mailer"
SMTP_PASSWORD = "smtp-S3cret-" + os.urandom(6).hex()


# ------------------------------------------------------------------------------------------- helpers

def backup(sb, env_path, timeout=600):
    result = sb.run_cli("backup.py", env_path=env_path, timeout=timeout)
    return result


def _openssl(args, cwd):
    subprocess.run(["openssl"] + args, cwd=cwd, check=True, capture_output=True, timeout=60)


def _server_ctx(cwd, name, sans):
    with open(os.path.join(cwd, name + ".ext"), "w") as handle:
        handle.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                     "extendedKeyUsage=serverAuth\nsubjectAltName=%s\n" % sans)
    _openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
              name + ".key", "-out", name + ".csr", "-subj", "/CN=" + name], cwd)
    _openssl(["x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
              "-days", "2", "-extfile", name + ".ext", "-out", name + ".pem"], cwd)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(os.path.join(cwd, name + ".pem"), os.path.join(cwd, name + ".key"))
    return ctx


@pytest.fixture
def pki(sandbox):
    """A throwaway CA (readable by the service user) and server contexts for 127.0.0.1 and another name."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    cwd = os.path.join(sandbox.root, "pki")
    os.mkdir(cwd, 0o755)
    _openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
              "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=alfresco-backup security test CA",
              "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
             cwd)
    os.chmod(os.path.join(cwd, "ca.pem"), 0o644)
    return {"ca_file": os.path.join(cwd, "ca.pem"),
            "good": _server_ctx(cwd, "loopback", "IP:127.0.0.1,DNS:localhost"),
            "wrong_name": _server_ctx(cwd, "elsewhere", "DNS:elsewhere.example")}


class _Keeper:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(envelope.original_content or envelope.content)
        return "250 OK"


def _authenticator(server, session, envelope, mechanism, auth_data):
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login == SMTP_USER.encode()
          and auth_data.password == SMTP_PASSWORD.encode())
    return AuthResult(success=ok, handled=ok)


class TlsSmtp:
    """aiosmtpd on 127.0.0.1 requiring STARTTLS and AUTH (LOGIN/PLAIN with SMTP_USER/SMTP_PASSWORD)."""

    def __init__(self, ctx):
        self.keeper = _Keeper()
        self.port = free_port()
        self.controller = Controller(self.keeper, hostname="127.0.0.1", port=self.port, server_hostname="localhost",
                                     tls_context=ctx, require_starttls=True, authenticator=_authenticator,
                                     auth_require_tls=True, auth_required=True)

    def env(self, ca_file):
        return {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": self.port, "SMTP_SECURITY": "starttls",
                "SMTP_USER": SMTP_USER, "SMTP_PASSWORD": SMTP_PASSWORD, "SMTP_CA_FILE": ca_file,
                "SMTP_TIMEOUT": 10, "ALERT_EMAIL": "admin@example.org", "ALERT_FROM": "backup@example.org"}

    def wait(self, count=1, timeout=15):
        deadline = time.monotonic() + timeout
        while len(self.keeper.messages) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.keeper.messages

    def __enter__(self):
        self.controller.start()
        return self

    def __exit__(self, *exc):
        self.controller.stop()


def _decoded(raw):
    message = email.message_from_bytes(raw)
    parts = [part.get_payload(decode=True) or b"" for part in message.walk() if not part.is_multipart()]
    return raw.decode("utf-8", "replace") + "\n".join(p.decode("utf-8", "replace") for p in parts)


class CmdlineWatcher:
    """Reads every /proc/*/cmdline in a loop; ``leaks`` are command lines holding a secret, ``seen`` the
    program names met (to prove the watch saw the run's tools)."""

    def __init__(self, secrets):
        self.secrets = [s.encode() for s in secrets]
        self.leaks, self.seen = [], set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self._stop.is_set():
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                argv = faultkit.cmdline(int(name))
                if not argv:
                    continue
                joined = b"\0".join(argv)
                self.seen.add(os.path.basename(argv[0]).decode("utf-8", "replace"))
                if any(secret in joined for secret in self.secrets):
                    self.leaks.append(joined)
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


# ------------------------------------------------------------------------------------------- modes

@needs_root
def test_everything_in_backup_dir_is_private_to_the_service_user(sandbox):
    sb = sandbox
    backup_dir = os.path.join(sb.root, "new", "backups")  # made by backup.py itself
    env_path = sb.write_env(BACKUP_DIR=backup_dir, WAL_ARCHIVE_DIR=sb.wal_archive_dir)
    os.makedirs(os.path.dirname(backup_dir), mode=0o755)
    sb.chown_to_service_user(os.path.dirname(backup_dir))
    for night in range(2):  # the first copy (rsync) and a nightly one (in-process engine)
        sb.add_content(2, date=(2025, 8, 1 + night, 0, 0))
        result = backup(sb, env_path)
        assert result.returncode == 0, result.stdout[-3000:]
    snapshots = {e.path for e in faultkit.entries(sb, "contentstore", backup_dir)}
    assert len(snapshots) == 2
    checked, inside_snapshots = 0, 0
    for top in (backup_dir, sb.wal_archive_dir):
        for dirpath, dirnames, filenames in os.walk(top):
            if any(dirpath == s or dirpath.startswith(s + "/") for s in snapshots):
                inside_snapshots += len(filenames)
                continue  # the snapshot's inner tree keeps the contentstore's own modes (see below)
            for name in [""] + dirnames + filenames:
                path = os.path.join(dirpath, name) if name else dirpath
                st = os.lstat(path)
                assert (st.st_uid, st.st_gid) == (sb.uid, sb.gid), path
                if path in snapshots or stat.S_ISDIR(st.st_mode):
                    assert stat.S_IMODE(st.st_mode) == 0o700, (path, oct(st.st_mode))
                else:
                    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, (path, oct(st.st_mode))
                checked += 1
    assert checked > 30 and inside_snapshots > 80, (checked, inside_snapshots)
    # Inside a snapshot, files keep the source's modes (0644 here): acceptable, because the snapshot root and
    # BACKUP_DIR/contentstore are 0700, so no other user can reach them; a restore must give the files back
    # with the modes Alfresco had.
    some = sorted(snapshots)[-1]
    rel = sorted(sb.content_files())[0]
    assert stat.S_IMODE(os.stat(os.path.join(some, rel)).st_mode) == stat.S_IMODE(
        os.stat(os.path.join(sb.contentstore_dir, rel)).st_mode)
    # Proof: another unprivileged user can read neither a snapshot's file nor the log.
    for path in (os.path.join(some, rel), faultkit.glob.glob(os.path.join(backup_dir, "backup-*.log"))[0]):
        other = subprocess.run(["cat", path], user="nobody", group="nogroup", extra_groups=[], capture_output=True)
        assert other.returncode != 0 and b"Permission denied" in other.stderr, path


# ------------------------------------------------------------------------------------------- secrets

def _corrupt_metadata(sb, secret):
    """A DONE snapshot whose metadata holds ``secret`` where a number belongs: the space estimate raises an
    unexpected ValueError quoting it (a traceback path)."""
    folder = os.path.join(sb.backup_dir, "contentstore")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    name = "contentstore-2020-01-01_00-00-00"
    os.mkdir(os.path.join(folder, name), 0o700)
    with open(os.path.join(folder, name + ".json"), "w") as handle:
        json.dump({"kind": "contentstore", "name": name, "status": "DONE", "link_dest": "contentstore-x",
                   "bytes_copied": secret, "files": 1}, handle)
    sb.chown_to_service_user(folder)


def _corrupt_base_metadata(sb, secret):
    """A DONE base backup whose metadata holds ``secret`` as its start segment: the WAL health check raises
    an unexpected ValueError quoting it (a traceback path)."""
    folder = os.path.join(sb.backup_dir, "postgres")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    name = "base-2020-01-01_00-00-00"
    os.mkdir(os.path.join(folder, name), 0o700)
    with open(os.path.join(folder, name + ".json"), "w") as handle:
        json.dump({"kind": "postgres", "name": name, "status": "DONE", "start_wal_file": secret,
                   "ended_at": "2020-01-01T00:00:00+00:00", "size_bytes": 1}, handle)
    sb.chown_to_service_user(folder)


@needs_root
@pytest.mark.slow
def test_passwords_never_in_logs_mails_tracebacks_or_command_lines(sandbox, pki):
    sb = sandbox
    secrets = [sb.alfresco_password, SMTP_PASSWORD]
    with TlsSmtp(pki["good"]) as smtp, CmdlineWatcher(secrets) as watch:
        # A good night, with a summary mail sent over verified STARTTLS and AUTH.
        env_path = sb.write_env(ALERT_ON="always", **smtp.env(pki["ca_file"]))
        good = backup(sb, env_path)
        assert good.returncode == 0, good.stdout[-3000:]
        assert len(smtp.wait(1)) == 1, good.stdout[-2000:]
        # A night with an unexpected error whose message quotes the database password.
        _corrupt_base_metadata(sb, sb.alfresco_password)
        bad = backup(sb, env_path)
        assert bad.returncode == 1
        assert len(smtp.wait(2)) == 2, bad.stdout[-2000:]
        verify = faultkit.restore_verify(sb, env_path)
    log = faultkit.backup_log(sb)
    assert "Traceback" in log and "unexpected ValueError" in log  # the error path really ran ...
    assert "not a WAL segment name: '********'" in log  # ... and was masked
    texts = {"good stdout": good.stdout + good.stderr, "bad stdout": bad.stdout + bad.stderr, "log": log}
    texts.update({"mail %d" % i: _decoded(raw) for i, raw in enumerate(smtp.keeper.messages)})
    if verify is not None:
        texts["verify"] = verify.stdout + verify.stderr
    for name, text in texts.items():
        for secret in secrets:
            assert secret not in text, "%s holds a password" % name
    assert "unexpected ValueError" in texts["mail 1"]
    assert not watch.leaks, watch.leaks[:3]
    assert {"pg_basebackup", "rsync"} <= {s.rsplit("/", 1)[-1] for s in watch.seen}, sorted(watch.seen)[:50]


@needs_root
def test_smtp_certificate_is_verified(sandbox, pki):
    sb = sandbox
    with TlsSmtp(pki["wrong_name"]) as smtp:
        result = backup(sb, sb.write_env(ALERT_ON="always", **smtp.env(pki["ca_file"])))
        delivered = smtp.wait(1, timeout=0.5)
    assert result.returncode == 0
    assert not delivered
    assert "TLS certificate verification failed" in result.stdout, result.stdout[-2000:]
    with TlsSmtp(pki["good"]) as smtp:  # right name, but a CA the system does not trust
        result = backup(sb, sb.write_env(ALERT_ON="always", **dict(smtp.env(""), SMTP_CA_FILE="")))
        delivered = smtp.wait(1, timeout=0.5)
    assert result.returncode == 0 and not delivered
    assert "TLS certificate verification failed" in result.stdout
    assert SMTP_PASSWORD not in result.stdout + faultkit.backup_log(sb)


@needs_root
def test_a_corrupt_metadata_file_does_not_stop_the_backups(sandbox):
    sb = sandbox
    _corrupt_metadata(sb, "lots")
    result = backup(sb, sb.write_env())
    assert "not enough free space" not in result.stdout
    assert [e.status for e in faultkit.entries(sb, "postgres")] == [catalog.DONE]


# ------------------------------------------------------------------------------------------- static

def _product_modules():
    return sorted(n for n in os.listdir(PROJECT_DIR) if n.endswith(".py"))


def test_nothing_runs_through_a_shell():
    """No shell=True, os.system, os.popen, subprocess.getoutput, or sh -c in the product modules; only
    subprocess_utils.py (and the standalone wal.py) may import subprocess."""
    offenders, importers = [], set()
    modules = _product_modules()
    assert "backup.py" in modules and "subprocess_utils.py" in modules
    for module in modules:
        with open(os.path.join(PROJECT_DIR, module), encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), module)
        for node in ast.walk(tree):
            where = "%s:%d" % (module, getattr(node, "lineno", 0))
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if "subprocess" in names or "pty" in names or "commands" in names:
                    importers.add(module)
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant)
                                                       and keyword.value.value is False):
                        offenders.append(where + " shell=")
                func = node.func
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                    if (func.value.id, func.attr) in {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"),
                                                      ("subprocess", "getstatusoutput"), ("os", "execl"),
                                                      ("os", "spawnl")}:
                        offenders.append(where + " %s.%s" % (func.value.id, func.attr))
            if isinstance(node, ast.List) and len(node.elts) >= 2:
                first, second = node.elts[0], node.elts[1]
                if (isinstance(first, ast.Constant) and isinstance(second, ast.Constant)
                        and str(first.value).rsplit("/", 1)[-1] in ("sh", "bash", "dash") and second.value == "-c"):
                    offenders.append(where + " [sh, -c]")
    assert not offenders, offenders
    assert importers <= {"subprocess_utils.py", "wal.py"}, importers
