"""Pings to a dead man's switch (Healthchecks, Uptime Kuma push, ...) and the installation's name.

A failure mail only comes from a run that started; a monitor that expects a ping every night also notices
the night that never ran (cron broken, server off, a hung run). Standard library only (``urllib.request``).

* :func:`ping_request` is pure: the method and URL of one ping for a style, an event and an exit code;
* :func:`ping_body` is pure: the text sent with a ping, cut to :data:`BODY_LIMIT` bytes;
* :func:`deliver` sends one ping with verified TLS, retries transient failures and gives up after a total
  time budget; it never raises;
* :class:`Pinger` is what ``backup.py`` uses: ``start()`` when a run starts, ``finish(exit_code, ...)`` at
  its end. A monitor that is down, slow or wrong is logged as a warning and changes nothing else.

The ping URL is a secret (a Healthchecks URL *is* its credential): logs only ever show
:func:`redact` (scheme and host).
"""

import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from subprocess_utils import mask

STYLES = ("healthchecks", "exitcode", "plain")
START, END = "start", "end"
# Self-hosted Healthchecks keeps the first 10,000 bytes of a body (PING_BODY_LIMIT), hosted Healthchecks.io
# 100 kB: 10,000 fits both, and the end of the log (where the reason is) is what is kept.
BODY_LIMIT = 10000
PLAIN_MSG_LIMIT = 200  # Uptime Kuma shows msg in one line of its heartbeat list
USER_AGENT = "alfresco-backup"
RESULT_WORDS = {0: "OK", 1: "FAILED", 2: "CONFIGURATION ERROR", 3: "NOT RUN (lock held)"}


def installation_name(cfg):
    """INSTALLATION_NAME, or the host name when it is empty."""
    return getattr(cfg, "INSTALLATION_NAME", "") or socket.gethostname()


def mail_host(cfg):
    """What mails call the installation: the fully qualified host name when INSTALLATION_NAME is empty or
    names this host, else ``NAME (fqdn)``, so a fleet's mails say both which customer and which machine."""
    name, fqdn = getattr(cfg, "INSTALLATION_NAME", ""), socket.getfqdn()
    if not name or name == fqdn or fqdn.startswith(name + "."):
        return fqdn
    return "%s (%s)" % (name, fqdn)


def redact(url):
    """``https://hc-ping.com/********``: a ping URL as logs may show it (scheme and host only)."""
    parts = urllib.parse.urlsplit(url or "")
    return "%s://%s/********" % (parts.scheme or "?", parts.hostname or "?")


def ping_request(url, style, event, exit_code=0, rid=None, message="", duration=None):
    """(method, url) of one ping, or None when the style sends nothing for this event. Pure.

    ``style`` is one of STYLES; ``event`` START or END; ``exit_code`` the run's (END only). healthchecks:
    ``URL/start``, ``URL`` (exit 0) or ``URL/fail``; exitcode: ``URL/start``, ``URL/<exit code>``; both keep the
    URL's own query (e.g. ``?create=1``) and add ``rid`` (Healthchecks' run id: overlapping runs are told
    apart). plain: nothing at START; at END ``URL`` with ``status=up|down``, ``msg`` and ``ping`` (the
    duration in ms) replacing those parameters if the URL has them (as Uptime Kuma's push URL does).
    Raises ValueError for an unknown style or event.
    """
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if style in ("healthchecks", "exitcode"):
        if event == START:
            suffix = "/start"
        elif event == END:
            suffix = ("" if exit_code == 0 else "/fail") if style == "healthchecks" else "/%d" % exit_code
        else:
            raise ValueError("unknown ping event %r" % event)
        if rid:
            query = [(k, v) for k, v in query if k != "rid"] + [("rid", rid)]
        path = parts.path.rstrip("/") + suffix
        method = "POST"
    elif style == "plain":
        if event == START:
            return None
        if event != END:
            raise ValueError("unknown ping event %r" % event)
        query = [(k, v) for k, v in query if k not in ("status", "msg", "ping")]
        query += [("status", "up" if exit_code == 0 else "down"), ("msg", _one_line(message)[:PLAIN_MSG_LIMIT])]
        if duration is not None:
            query.append(("ping", str(int(duration * 1000))))
        path, method = parts.path, "GET"
    else:
        raise ValueError("unknown PING_STYLE %r (one of %s)" % (style, ", ".join(STYLES)))
    return method, urllib.parse.urlunsplit(parts[:2] + (path, urllib.parse.urlencode(query), ""))


def ping_body(head, log_tail="", limit=BODY_LIMIT):
    """``head`` plus as much of the END of ``log_tail`` as fits in ``limit`` UTF-8 bytes (cut at a line
    start, with a note of what was left out). Pure; returns str."""
    head = head.rstrip("\n") + "\n"
    if not log_tail:
        return _cut_bytes(head, limit)
    title = "\n--- last lines of the log ---\n"
    room = limit - len((head + title).encode("utf-8")) - 60  # 60: the "[... omitted ...]" note
    data = log_tail.encode("utf-8")
    if room <= 0:
        return _cut_bytes(head, limit)
    if len(data) > room:
        kept = data[len(data) - room:]
        newline = kept.find(b"\n")
        kept = kept[newline + 1:] if 0 <= newline < len(kept) - 1 else kept
        note = "[... %d earlier bytes of the log omitted ...]\n" % (len(data) - len(kept))
        data = note.encode("utf-8") + kept
    return head + title + data.decode("utf-8", "ignore")


def _cut_bytes(text, limit):
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def _one_line(text):
    return " ".join(str(text).split())


def read_log_tail(path, offset=0, limit=BODY_LIMIT):
    """The last ``limit`` bytes written to ``path`` after ``offset`` (this run's part of a daily log), as
    text; '' when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            handle.seek(max(offset, size - limit, 0))
            return handle.read(limit).decode("utf-8", "replace")
    except (OSError, TypeError):
        return ""


def _context(ca_file):
    # CERT_REQUIRED + host name check; a private CA is added to the system store, never a bypass.
    return ssl.create_default_context(cafile=ca_file or None)


def _describe(exc, ca_file):
    """One line for a failed attempt, without the URL (urllib's messages carry none; masked anyway)."""
    if isinstance(exc, urllib.error.HTTPError):
        return "HTTP %d %s" % (exc.code, _one_line(exc.reason))
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, ssl.SSLCertVerificationError):
        why = getattr(reason, "verify_message", None) or str(reason)
        return "TLS certificate verification failed: %s (%s)" % (why, "is PING_CA_FILE the CA that signed it?"
                                                                 if ca_file else "set PING_CA_FILE for a private CA")
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return "cannot resolve the host name (%s)" % reason
    return "%s: %s" % (type(reason).__name__, reason)


def _attempts(method, url, body, deadline, ca_file):
    """Try until success, a final answer or ``deadline``: (ok, description, attempts)."""
    try:
        context = _context(ca_file)
    except (OSError, ValueError) as exc:
        return False, "cannot load PING_CA_FILE %s: %s" % (ca_file, exc), 0
    data = body.encode("utf-8") if method == "POST" else None
    tries, pause, last = 0, 0.5, "no attempt made"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0.05:
            return False, last, tries
        tries += 1
        request = urllib.request.Request(url, data=data, method=method, headers={
            "User-Agent": USER_AGENT, "Content-Type": "text/plain; charset=utf-8"})
        try:
            with urllib.request.urlopen(request, timeout=remaining, context=context) as response:
                response.read(1024)
                return True, "HTTP %d" % response.status, tries
        except urllib.error.HTTPError as exc:
            last = _describe(exc, ca_file)
            if exc.code < 500 and exc.code != 429:  # a wrong URL stays wrong: no retry
                return False, last, tries
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = _describe(exc, ca_file)
            if isinstance(getattr(exc, "reason", None), ssl.SSLCertVerificationError):
                return False, last, tries
        time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
        pause *= 2


def deliver(method, url, body, timeout, ca_file=""):
    """Send one ping; give up after ``timeout`` seconds in all (connect, TLS, DNS, retries: the request runs in
    a daemon thread, so even a resolver that hangs cannot hold the run). Returns (ok, description,
    seconds). Never raises."""
    started = time.monotonic()
    deadline = started + timeout
    result = []

    def work():
        try:
            result.append(_attempts(method, url, body, deadline, ca_file))
        except Exception as exc:  # a bug here must not reach the run
            result.append((False, "%s: %s" % (type(exc).__name__, exc), 0))

    thread = threading.Thread(target=work, name="ping", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    elapsed = time.monotonic() - started
    if not result:
        return False, "no answer within %g s" % timeout, elapsed
    ok, description, tries = result[0]
    if not ok and tries > 1:
        description += " (%d attempts within %g s)" % (tries, timeout)
    return ok, description, elapsed


class Pinger:
    """The pings of one run for ``cfg`` (PING_URL, PING_STYLE, PING_TIMEOUT, PING_CA_FILE,
    INSTALLATION_NAME); a no-op without PING_URL. ``log_path``/``log_offset``: where this run's log lines
    start, for the tail sent with the result. Every method returns True when the monitor took the ping and
    never raises."""

    def __init__(self, cfg, log, log_path=None, secrets=()):
        self.url = getattr(cfg, "PING_URL", "") or ""
        self.style = getattr(cfg, "PING_STYLE", "healthchecks") or "healthchecks"
        self.timeout = max(1, int(getattr(cfg, "PING_TIMEOUT", 10) or 10))
        self.ca_file = getattr(cfg, "PING_CA_FILE", "") or ""
        self.name = installation_name(cfg)
        self.log = log
        self.secrets = sorted({s for s in tuple(secrets) + (self.url,) if s}, key=len, reverse=True)
        self.rid = str(uuid.uuid4())
        self.started = time.monotonic()
        self.log_path = log_path
        try:
            self.log_offset = os.path.getsize(log_path) if log_path else 0
        except OSError:
            self.log_offset = 0

    @property
    def enabled(self):
        return bool(self.url)

    def start(self):
        """The START ping (healthchecks/exitcode styles): the monitor times the run from here."""
        body = "alfresco-backup on %s: run started (pid %d, host %s)\n" % (self.name, os.getpid(),
                                                                           socket.gethostname())
        return self._send(START, 0, body, "")

    def finish(self, exit_code, summary="", with_log=True):
        """The END ping for ``exit_code``; its body: the verdict, ``summary`` (e.g. the failed stage) and, with
        ``with_log``, the end of this run's log."""
        verdict = RESULT_WORDS.get(exit_code, "FAILED")
        head = "alfresco-backup on %s (host %s): %s, exit code %d\n%s" % (
            self.name, socket.gethostname(), verdict, exit_code, summary)
        tail = read_log_tail(self.log_path, self.log_offset) if with_log and self.log_path else ""
        message = "%s: %s%s" % (self.name, verdict, (" - " + _one_line(summary)) if summary.strip() else "")
        return self._send(END, exit_code, ping_body(head, tail), message)

    def _send(self, event, exit_code, body, message):
        if not self.enabled:
            return False
        try:
            request = ping_request(self.url, self.style, event, exit_code, rid=self.rid, message=mask(
                message, self.secrets), duration=time.monotonic() - self.started)
            if request is None:
                return False
            method, url = request
            ok, description, seconds = deliver(method, url, mask(body, self.secrets), self.timeout, self.ca_file)
            what = "%s ping (%s) to %s" % (event, self.style, redact(self.url))
            if ok:
                self.log.info("%s: %s in %.1f s", what, description, seconds)
            else:
                self.log.warning("%s failed: %s after %.1f s; the run's result is unchanged", what,
                                 mask(description, self.secrets), seconds)
            return ok
        except Exception as exc:  # monitoring must never end or change the run
            self.log.warning("ping to %s failed: %s", redact(self.url), mask("%s: %s" % (type(exc).__name__, exc),
                                                                            self.secrets))
            return False


def ping_once(cfg, exit_code, summary, log, secrets=()):
    """One END ping for a run that never got going (configuration error, lock held). Never raises."""
    return Pinger(cfg, log, secrets=secrets).finish(exit_code, summary, with_log=False)
