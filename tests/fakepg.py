"""A fake PostgreSQL listener for tests: it speaks just enough of the protocol to show what a client would hand
to a server that is not the real one (the startup packet, a password, queries).

    server = FakeServer(unix_dir=DIR, port=5432, mode="cleartext").start()   # or tcp=True
    ... ; server.stop(); server.sessions -> [{"startup": {...}, "password": str|None, "queries": [...],
                                               "initial": bytes}]

Modes: ``cleartext`` asks for the password in clear text, then accepts anything (answers SHOW
server_version_num with 150000 and any query mentioning rolsuper/rolreplication with 't');
``scram-forged`` runs a SCRAM exchange and ends it with a wrong server signature; ``ok-without-proof`` starts
SCRAM and then says AuthenticationOk without a final message; ``silent`` accepts and records the raw bytes.
As a script (to run it as another user): ``python fakepg.py UNIX_DIR PORT MODE RECORD_FILE`` records the
sessions as JSON lines into RECORD_FILE until killed.
"""

import base64
import json
import os
import socket
import struct
import sys
import threading


def _message(kind, payload=b""):
    return kind + struct.pack("!I", len(payload) + 4) + payload


def _row(values):
    cols = b"".join(struct.pack("!i", len(v.encode())) + v.encode() for v in values)
    return _message(b"D", struct.pack("!H", len(values)) + cols)


def _describe(names):
    fields = b"".join(n.encode() + b"\0" + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0) for n in names)
    return _message(b"T", struct.pack("!H", len(names)) + fields)


class FakeServer:
    def __init__(self, unix_dir=None, port=5432, mode="cleartext", tcp=False, on_done=None):
        self.mode, self.port, self.sessions, self.on_done = mode, port, [], on_done
        if tcp:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", port))
            self.port = self.sock.getsockname()[1]
        else:
            self.path = os.path.join(unix_dir, ".s.PGSQL.%d" % port)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(self.path)
            os.chmod(self.path, 0o777)  # any client user may connect, as to a real server's socket
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=10)
        self.sock.close()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _addr = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            session = {"startup": {}, "password": None, "queries": [], "initial": b""}
            self.sessions.append(session)
            conn.settimeout(5)
            try:
                self._session(conn, session)
            except (OSError, ValueError, struct.error):
                pass
            finally:
                conn.close()
                if self.on_done:
                    self.on_done(session)

    @staticmethod
    def _exact(conn, size):
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    def _receive(self, conn):
        head = self._exact(conn, 5)
        return head[:1], self._exact(conn, struct.unpack("!I", head[1:])[0] - 4)

    def _session(self, conn, session):
        if self.mode == "silent":
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                session["initial"] += chunk
        (length,) = struct.unpack("!I", self._exact(conn, 4))
        body = self._exact(conn, length - 4)[4:]
        parts = body.split(b"\0")
        session["startup"] = {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts) - 1, 2)
                              if parts[i]}
        if self.mode == "cleartext":
            conn.sendall(_message(b"R", struct.pack("!I", 3)))
            _kind, data = self._receive(conn)
            session["password"] = data.rstrip(b"\0").decode()
        else:
            conn.sendall(_message(b"R", struct.pack("!I", 10) + b"SCRAM-SHA-256\0\0"))
            _kind, data = self._receive(conn)
            session["initial"] = data
            if self.mode == "scram-forged":
                nonce = data.split(b"r=", 1)[1].decode()
                first = "r=%sFAKE,s=%s,i=4096" % (nonce, base64.b64encode(b"salt" * 4).decode())
                conn.sendall(_message(b"R", struct.pack("!I", 11) + first.encode()))
                self._receive(conn)
                forged = "v=" + base64.b64encode(b"\0" * 32).decode()
                conn.sendall(_message(b"R", struct.pack("!I", 12) + forged.encode()))
        conn.sendall(_message(b"R", struct.pack("!I", 0)) + _message(b"S", b"server_version\x0015.0\0")
                     + _message(b"K", struct.pack("!II", 1, 2)) + _message(b"Z", b"I"))
        while True:
            kind, data = self._receive(conn)
            if kind == b"X":
                return
            sql = data.rstrip(b"\0").decode()
            session["queries"].append(sql)
            if "server_version_num" in sql:
                reply = _describe(["v"]) + _row(["150000"])
            elif "rolsuper" in sql or "rolreplication" in sql:
                reply = _describe(["a", "b"]) + _row(["t", "t"])
            else:
                reply = b""
            conn.sendall(reply + _message(b"C", b"SELECT 1\0") + _message(b"Z", b"I"))


if __name__ == "__main__":
    directory, port, mode, record = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

    def write(session):
        with open(record, "a") as out:
            out.write(json.dumps({k: v.decode("latin-1") if isinstance(v, bytes) else v
                                  for k, v in session.items()}) + "\n")

    FakeServer(directory, port, mode, on_done=write).start()._thread.join()
