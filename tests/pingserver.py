"""A real HTTP(S) server on loopback that records every request it gets, standing in for Healthchecks or
Uptime Kuma in tests.

``with PingServer() as hc:`` → ``hc.url(path)``, ``hc.requests`` (dicts: method, path, query, body, headers,
at), ``hc.wait(n)``. Behaviour is set per server: ``delay`` (seconds to sleep before answering), ``status``
(HTTP status to answer; a list is consumed one per request, the last one repeating), ``barrier`` (a
``threading.Barrier`` the handler waits at for paths ending in ``/start``), ``ssl_context`` (serve HTTPS),
``bind`` (the loopback address to listen on).
"""

import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _handle(self):
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        parts = urllib.parse.urlsplit(self.path)
        record = {"method": self.command, "path": parts.path, "query": dict(urllib.parse.parse_qsl(parts.query)),
                  "body": body, "headers": dict(self.headers), "at": time.monotonic()}
        with owner.lock:
            owner.requests.append(record)
            status = owner.next_status()
        if owner.barrier is not None and parts.path.endswith("/start"):
            try:
                owner.barrier.wait()
            except threading.BrokenBarrierError:
                pass
        if owner.delay:
            time.sleep(owner.delay)
        payload = b"OK" if status < 400 else b"error"
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            pass  # the client gave up (timeout tests)

    do_GET = do_POST = do_HEAD = _handle

    def log_message(self, *args):
        pass


class PingServer:
    def __init__(self, delay=0.0, status=200, barrier=None, ssl_context=None, bind="127.0.0.1"):
        self.delay = delay
        self.statuses = list(status) if isinstance(status, (list, tuple)) else [status]
        self.barrier = barrier
        self.requests = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((bind, 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.scheme = "http"
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.host, self.port = bind, self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def next_status(self):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def url(self, path="/ping/0f3c6a4e-5d1b-4c55-9b7e-secret-uuid"):
        return "%s://%s:%d%s" % (self.scheme, self.host, self.port, path)

    def wait(self, count=1, timeout=20):
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.requests)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def make_pki(directory):
    """A throwaway CA (``ca.pem``) and a server certificate for 127.0.0.1/localhost signed by it, made with the
    ``openssl`` command. Returns (ca_file, server ssl.SSLContext). Raises subprocess.CalledProcessError."""
    import os
    import ssl
    import subprocess

    def openssl(*args):
        subprocess.run(["openssl"] + list(args), cwd=directory, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj",
            "/CN=alfresco-backup ping test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    with open(os.path.join(directory, "server.ext"), "w") as handle:
        handle.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                     "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "7",
            "-days", "2", "-extfile", "server.ext", "-out", "server.pem")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(os.path.join(directory, "server.pem"), os.path.join(directory, "server.key"))
    return os.path.join(directory, "ca.pem"), context
