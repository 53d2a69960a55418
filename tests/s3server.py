"""A real S3 server on loopback for the off-site tests: ``rclone serve s3`` over a temporary directory.

``with S3Server(owner=sb.user) as s3:`` -> ``s3.env()`` (the .env keys that point backups at it),
``s3.objects()`` ({key: bytes path} under the bucket prefix), ``s3.requests()`` ([(method words, key)] from the
server's ``-vv`` log, e.g. ('CREATE OBJECT', 'prod/wal/0000...gz')), ``s3.stop()`` / ``s3.start()`` (the same
port and data: an outage). A bucket is a subdirectory of the data directory. The rclone client config is
written 0600 for ``owner`` (the service user) with the keys inside; a ``crypt`` remote ``s3crypt:`` over
``bucket/crypt`` is in it too (password fed to ``rclone obscure -`` on stdin).
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

RCLONE = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "rclone")
BUCKET = "alfresco-backups"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rclone_binary():
    return RCLONE if os.access(RCLONE, os.X_OK) else shutil.which("rclone")


class S3Server:
    def __init__(self, owner=None, root=None, prefix="prod"):
        self.root = root or tempfile.mkdtemp(prefix="alfs3-", dir="/tmp")
        os.makedirs(self.root, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.data = os.path.join(self.root, "data")
        os.makedirs(os.path.join(self.data, BUCKET), exist_ok=True)
        self.log_file = os.path.join(self.root, "server.log")
        self.port = free_port()
        self.key, self.secret = "AK" + os.urandom(6).hex().upper(), os.urandom(16).hex()
        self.prefix = prefix
        self.owner = owner
        self.proc = None
        self.conf = os.path.join(self.root, "rclone.conf")
        self.write_conf()

    def write_conf(self, port=None):
        password = os.urandom(12).hex()
        obscured = subprocess.run([rclone_binary(), "obscure", "-"], input=password, capture_output=True, text=True,
                                  check=True).stdout.strip()
        text = ("[s3test]\ntype = s3\nprovider = Other\naccess_key_id = %s\nsecret_access_key = %s\n"
                "endpoint = http://127.0.0.1:%d\nregion = us-east-1\nforce_path_style = true\n"
                "no_check_bucket = true\n\n"
                "[s3crypt]\ntype = crypt\nremote = s3test:%s/crypt\npassword = %s\n"
                % (self.key, self.secret, port or self.port, BUCKET, obscured))
        fd = os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        if self.owner is not None and os.geteuid() == 0:
            os.chown(self.conf, self.owner.uid, self.owner.gid)

    def env(self, remote=None):
        """.env overrides for backup.py: the remote and its config file (and OFFSITE_RCLONE from the environment
        variable OFFSITE_TEST_RCLONE, e.g. /usr/bin/rclone to test Debian's 1.60 as the client)."""
        values = {"OFFSITE_REMOTE": remote or "s3test:%s/%s" % (BUCKET, self.prefix),
                  "OFFSITE_RCLONE_CONFIG": self.conf}
        if os.environ.get("OFFSITE_TEST_RCLONE"):
            values["OFFSITE_RCLONE"] = os.environ["OFFSITE_TEST_RCLONE"]
        return values

    def start(self):
        self.proc = subprocess.Popen([rclone_binary(), "serve", "s3", "--addr", "127.0.0.1:%d" % self.port,
                                      "--auth-key", "%s,%s" % (self.key, self.secret), self.data, "-vv",
                                      "--log-file", self.log_file], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={"PATH": "/usr/bin:/bin", "HOME": self.root})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("rclone serve s3 exited: %s" % self.log_tail())
                time.sleep(0.1)
        raise RuntimeError("rclone serve s3 did not listen on %d: %s" % (self.port, self.log_tail()))

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self, n=20):
        try:
            with open(self.log_file, errors="replace") as handle:
                return "".join(handle.readlines()[-n:])
        except OSError:
            return ""

    def __enter__(self):
        try:
            return self.start()
        except BaseException:  # __exit__ is not called when __enter__ raises: clean up here
            self.__exit__()
            raise

    def __exit__(self, *exc):
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- looking at what the server holds and was asked -------------------------------------------
    def base(self, prefix=None):
        return os.path.join(self.data, BUCKET, prefix if prefix is not None else self.prefix)

    def objects(self, prefix=None):
        """{key relative to the prefix: file path} of every object (rclone's in-flight temp files left out)."""
        base, found = self.base(prefix), {}
        for dirpath, _dirs, names in os.walk(base):
            for name in names:
                if not name.startswith(".rclone_temp"):
                    full = os.path.join(dirpath, name)
                    found[os.path.relpath(full, base)] = full
        return found

    def requests(self):
        """[(operation, 'bucket/key')] the server logged, in order: ('HEAD OBJECT', ...), ('CREATE OBJECT', ...),
        ('DELETE', ...), ('LIST BUCKET', '')..."""
        found = []
        try:
            with open(self.log_file, errors="replace") as handle:
                for line in handle:
                    _head, sep, text = line.rstrip("\n").partition("serve s3: ")
                    words = text.split()
                    if not sep or not words:
                        continue
                    listed = re.match(r'^bucketname: (\S+) prefix: prefix:"([^"]*)"', text)
                    if listed and found and found[-1] == ("LIST BUCKET", ""):
                        found[-1] = ("LIST BUCKET", "%s/%s" % listed.groups())
                        continue
                    op = []
                    while words and re.match(r"^[A-Z]+:?$", words[0]):
                        op.append(words.pop(0).rstrip(":"))
                        if not op[-1] or text.split()[len(op) - 1].endswith(":"):
                            break
                    if op:
                        found.append((" ".join(op), "/".join(words)))
        except OSError:
            pass
        return found

    def writes(self):
        """['bucket/key'] of every object the server completed writing, in order. (A CREATE OBJECT request is
        logged when it starts; rclone serve s3 sometimes fails one of two concurrent PUTs into one directory
        ("Dir.Rename error") and the client retries it, so requests alone would show a key twice.)"""
        found = []
        try:
            with open(self.log_file, errors="replace") as handle:
                for line in handle:
                    _head, sep, key = line.rstrip("\n").partition(": Moved (server-side) to: ")
                    if sep:
                        found.append(key.strip())
        except OSError:
            pass
        return found

    def client(self, *args, data=None):
        """Run the rclone client (as this process) with the test config: how a test deletes or replaces an
        object the way an intruder or a failing provider would, through the S3 API (the server caches its
        directory listings, so editing its data directory directly is not seen at once)."""
        proc = subprocess.run([rclone_binary(), "--config", self.conf] + list(args), input=data,
                              capture_output=True, env={"PATH": "/usr/bin:/bin", "HOME": self.root})
        if proc.returncode != 0:
            raise RuntimeError("rclone %s failed: %s" % (" ".join(args), proc.stderr.decode(errors="replace")))
        return proc.stdout

    def delete(self, key, remote=None):
        self.client("deletefile", "%s/%s" % (remote or "s3test:%s/%s" % (BUCKET, self.prefix), key))

    def put(self, key, data, remote=None):
        self.client("rcat", "%s/%s" % (remote or "s3test:%s/%s" % (BUCKET, self.prefix), key), data=data)

    def request_mark(self):
        return len(self.requests())
