"""A small PostgreSQL client speaking the frontend/backend protocol 3.0 (PostgreSQL 7.4 and later), standard
library only.

Why it exists: ``setup.py`` may run as root. It logs in (as PGUSER and as the superuser) from its own process,
so a password is never in another program's environment or on a command line, and no binary the service
user owns (the bundle's ``psql``) runs with it. It speaks only what the wizard needs:

- a startup packet of plain values: a database name holding ``=`` is a name, never a connection string
  (which is what ``psql -d`` would make of it);
- SCRAM-SHA-256 (RFC 5802/7677, the server's signature is verified) and md5 authentication. A request for
  the password in clear text (pg_hba.conf method ``password``) is refused, so a server that is not the real
  one never receives the password itself;
- the simple query protocol (statements, variables and psql-shaped output: pgtext.py);
- ``replication=true`` sessions (IDENTIFY_SYSTEM).
No TLS, no COPY data, no extended protocol.

API: ``login(sock, user, database, password=None, replication=False, timeout=30) -> Session``;
``Session.query(sql) -> [Result]``; ``Session.close()``. Errors: PgError, AuthRefused.
"""

import base64
import binascii
import hashlib
import hmac
import os
import stringprep
import struct
import unicodedata

PROTOCOL_3 = 196608
AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 0, 3, 5, 10, 11, 12
SCRAM_SHA_256 = "SCRAM-SHA-256"
MAX_MESSAGE = 64 << 20
MAX_SCRAM_ITERATIONS = 10_000_000  # a server asking more only makes us burn CPU


class PgError(Exception):
    """A server error (``fields``: {field code: text}, e.g. 'S' severity, 'C' SQLSTATE, 'M' message) or a
    protocol problem (no fields). ``str()`` reads like psql's message: ``FATAL:  password authentication
    failed for user "x"``."""

    def __init__(self, message, fields=None):
        super().__init__(message)
        self.fields = fields or {}

    @property
    def sqlstate(self):
        return self.fields.get("C")


class AuthRefused(PgError):
    """The server asked for an authentication this client does not do (clear text, Kerberos, GSS, ...)."""


def _cstr(text):
    data = str(text).encode("utf-8")
    if b"\0" in data:
        raise ValueError("a NUL character cannot be sent to PostgreSQL")
    return data + b"\0"


def _server_error(data):
    fields = {}
    for part in data.split(b"\0"):
        if part:
            fields[part[:1].decode("ascii", "replace")] = part[1:].decode("utf-8", "replace")
    text = "%s:  %s" % (fields.get("V") or fields.get("S") or "ERROR", fields.get("M", "(no message)"))
    for code, label in (("D", "DETAIL"), ("H", "HINT")):
        if fields.get(code):
            text += "\n%s:  %s" % (label, fields[code])
    return PgError(text, fields)


# ---- authentication --------------------------------------------------------------------------------------
def saslprep(password):
    """The password as PostgreSQL's SCRAM hashes it: ASCII as it is; otherwise RFC 4013 SASLprep, or the
    password unchanged when SASLprep refuses it (PostgreSQL falls back the same way)."""
    if all(ord(char) < 128 for char in password):
        return password
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c))
    prepared = unicodedata.normalize("NFKC", mapped)
    prohibited = (stringprep.in_table_c12, stringprep.in_table_c21, stringprep.in_table_c22,
                  stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6,
                  stringprep.in_table_c7, stringprep.in_table_c8, stringprep.in_table_c9, stringprep.in_table_a1)
    if not prepared or any(test(c) for c in prepared for test in prohibited):
        return password
    if any(stringprep.in_table_d1(c) for c in prepared) and (
            any(stringprep.in_table_d2(c) for c in prepared)
            or not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1]))):
        return password
    return prepared


def md5_response(password, user, salt):
    """The md5 method's answer: 'md5' + md5(md5(password + user) + salt), hex."""
    inner = hashlib.md5((password + user).encode("utf-8")).hexdigest()
    return "md5" + hashlib.md5(inner.encode("ascii") + salt).hexdigest()


def _hmac(key, message):
    return hmac.new(key, message, hashlib.sha256).digest()


class Scram:
    """One SCRAM-SHA-256 exchange without channel binding (``n,,``): client_first(), client_final(server
    first message), verify(server final message). Raises PgError for a malformed or forged answer."""

    def __init__(self, password, nonce=None):
        self.password = saslprep(password).encode("utf-8")
        self.nonce = nonce or base64.b64encode(os.urandom(18)).decode("ascii")
        self.first_bare = "n=,r=" + self.nonce  # the user name is the startup packet's, as in libpq
        self.verified = False
        self.auth_message = self.server_key = None

    def client_first(self):
        return "n,," + self.first_bare

    def client_final(self, server_first):
        attrs = dict(part.split("=", 1) for part in server_first.split(",") if "=" in part)
        nonce, salt, rounds = attrs.get("r", ""), attrs.get("s", ""), attrs.get("i", "")
        if not (nonce.startswith(self.nonce) and len(nonce) > len(self.nonce) and salt and rounds.isdigit()
                and 0 < int(rounds) <= MAX_SCRAM_ITERATIONS):
            raise PgError("invalid SCRAM challenge from the server: %r" % server_first[:200])
        try:
            salt_bytes = base64.b64decode(salt, validate=True)
        except (binascii.Error, ValueError):
            raise PgError("invalid SCRAM salt from the server")
        salted = hashlib.pbkdf2_hmac("sha256", self.password, salt_bytes, int(rounds))
        client_key = _hmac(salted, b"Client Key")
        without_proof = "c=biws,r=" + nonce
        self.auth_message = ",".join((self.first_bare, server_first, without_proof)).encode("utf-8")
        signature = _hmac(hashlib.sha256(client_key).digest(), self.auth_message)
        self.server_key = _hmac(salted, b"Server Key")
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        return without_proof + ",p=" + base64.b64encode(proof).decode("ascii")

    def verify(self, server_final):
        attrs = dict(part.split("=", 1) for part in server_final.split(",") if "=" in part)
        if "e" in attrs:
            raise PgError("SCRAM authentication failed: %s" % attrs["e"])
        if self.auth_message is None:
            raise PgError("SCRAM final message before the challenge")
        expected = base64.b64encode(_hmac(self.server_key, self.auth_message)).decode("ascii")
        if not hmac.compare_digest(attrs.get("v", ""), expected):
            raise PgError("the server's SCRAM signature is wrong: it does not know the password (is it the real "
                          "server?)")
        self.verified = True


# ---- sessions --------------------------------------------------------------------------------------------
class Result:
    """One statement's result: ``columns`` (names), ``rows`` (lists of str or None for NULL), ``command``
    (the CommandComplete tag, e.g. 'SELECT 1', 'ALTER ROLE')."""

    def __init__(self):
        self.columns, self.rows, self.command = [], [], None


class Session:
    """A logged-in connection (from :func:`login`). ``parameters``: what the server reported
    (server_version, standard_conforming_strings, ...)."""

    def __init__(self, sock, timeout):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.parameters = {}

    def _send(self, kind, payload):
        self.sock.sendall(kind + struct.pack("!I", len(payload) + 4) + payload)

    def _exact(self, size):
        chunks = []
        while size:
            chunk = self.sock.recv(min(size, 1 << 16))
            if not chunk:
                raise PgError("the server closed the connection unexpectedly")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def _receive(self):
        head = self._exact(5)
        (length,) = struct.unpack("!I", head[1:])
        if length < 4 or length > MAX_MESSAGE:
            raise PgError("malformed message from the server (length %d)" % length)
        return head[:1], self._exact(length - 4)

    def _note(self, kind, data):
        """Handle the messages that may come at any time; True when ``kind`` was one of them."""
        if kind == b"S":
            name, _sep, value = data.rstrip(b"\0").partition(b"\0")
            self.parameters[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
            return True
        return kind in (b"N", b"A", b"K", b"v")  # notice, notification, cancel key, protocol negotiation

    def _startup(self, user, database, password, replication, application_name):
        params = [("user", user), ("database", database), ("application_name", application_name),
                  ("client_encoding", "UTF8")]
        if replication:
            params.append(("replication", "true"))
        body = struct.pack("!I", PROTOCOL_3) + b"".join(_cstr(k) + _cstr(v) for k, v in params) + b"\0"
        self.sock.sendall(struct.pack("!I", len(body) + 4) + body)
        scram = None
        while True:
            kind, data = self._receive()
            if kind == b"E":
                raise _server_error(data)
            if kind == b"Z":
                return
            if self._note(kind, data):
                continue
            if kind != b"R" or len(data) < 4:
                raise PgError("unexpected message %r from the server during login" % kind)
            (code,) = struct.unpack("!I", data[:4])
            if code == AUTH_OK:
                if scram is not None and not scram.verified:
                    raise PgError("the server accepted the login without proving it knows the password")
            elif code == AUTH_CLEARTEXT:
                raise AuthRefused("the server asks for the password in clear text (pg_hba.conf method 'password'); "
                                  "it is not sent: use scram-sha-256 or md5 for this connection")
            elif code == AUTH_MD5:
                self._send(b"p", _cstr(md5_response(_needed(password), user, data[4:8])))
            elif code == AUTH_SASL:
                mechanisms = [m.decode("ascii", "replace") for m in data[4:].split(b"\0") if m]
                if SCRAM_SHA_256 not in mechanisms:
                    raise AuthRefused("the server offers only %s (this client does SCRAM-SHA-256 without TLS)"
                                      % ", ".join(mechanisms))
                scram = Scram(_needed(password))
                first = scram.client_first().encode("utf-8")
                self._send(b"p", _cstr(SCRAM_SHA_256) + struct.pack("!i", len(first)) + first)
            elif code == AUTH_SASL_CONTINUE and scram is not None:
                self._send(b"p", scram.client_final(data[4:].decode("utf-8", "replace")).encode("utf-8"))
            elif code == AUTH_SASL_FINAL and scram is not None:
                scram.verify(data[4:].decode("utf-8", "replace"))
            else:
                raise AuthRefused("unsupported authentication request %d from the server" % code)

    def query(self, sql):
        """[Result] of ``sql`` sent as one simple query (one Result per statement in it). Raises PgError with
        the first error (the server is ready for the next query again)."""
        self._send(b"Q", _cstr(sql))
        results, current, error = [], None, None
        while True:
            kind, data = self._receive()
            if kind == b"T":
                current = Result()
                current.columns = _column_names(data)
                results.append(current)
            elif kind == b"D":
                if current is None:
                    current = Result()
                    results.append(current)
                current.rows.append(_data_row(data))
            elif kind == b"C":
                if current is None:
                    current = Result()
                    results.append(current)
                current.command, current = data.rstrip(b"\0").decode("utf-8", "replace"), None
            elif kind == b"I":
                current = None
            elif kind == b"E":
                error = error or _server_error(data)
            elif kind == b"G":
                self._send(b"f", _cstr("COPY FROM STDIN is not supported by setup.py"))
            elif kind == b"W":
                raise PgError("the server started a COPY BOTH (streaming) exchange; not supported here")
            elif kind == b"Z":
                break
            elif not (self._note(kind, data) or kind in (b"H", b"d", b"c")):  # COPY TO STDOUT data is dropped
                raise PgError("unexpected message %r from the server" % kind)
        if error is not None:
            raise error
        return results

    def close(self):
        try:
            self._send(b"X", b"")
        except OSError:
            pass
        self.sock.close()


def _needed(password):
    if not password:
        raise PgError("fe_sendauth: no password supplied")
    return password


def _column_names(data):
    (count,) = struct.unpack("!H", data[:2])
    names, pos = [], 2
    for _ in range(count):
        end = data.index(b"\0", pos)
        names.append(data[pos:end].decode("utf-8", "replace"))
        pos = end + 1 + 18  # table oid, column number, type oid, size, modifier, format
    return names


def _data_row(data):
    (count,) = struct.unpack("!H", data[:2])
    row, pos = [], 2
    for _ in range(count):
        (length,) = struct.unpack("!i", data[pos:pos + 4])
        pos += 4
        if length < 0:
            row.append(None)
        else:
            row.append(data[pos:pos + length].decode("utf-8", "replace"))
            pos += length
    return row


def login(sock, user, database, password=None, replication=False, timeout=30,
          application_name="alfresco-backup-setup"):
    """A Session on the connected socket ``sock`` (closed on failure). ``password`` None/'' is fine for
    trust/peer logins. Raises PgError (AuthRefused for a method refused here), OSError for the network."""
    session = Session(sock, timeout)
    try:
        session._startup(user, database, password, replication, application_name)
    except BaseException:
        sock.close()
        raise
    return session
