"""E-mail alerts for backup, setup and restore runs (standard library ``smtplib`` only).

Three layers:

* :func:`mail_enabled` / :func:`should_send` decide from the configuration whether a mail goes out;
* :func:`mail_report.build_report` turns a run's stages into a subject and a plain-text body (pure);
* :func:`send_mail` delivers it over SMTP with verified TLS and raises :class:`AlertError`;
  :func:`notify` wraps it for the entry points and never raises, because a broken mail server must not
  change the result or exit code of the backup itself.

The configuration object is read with ``getattr(cfg, NAME, default)``, so anything with the attributes
``SMTP_HOST, SMTP_PORT, SMTP_USER, SMTP_PASSWORD, SMTP_SECURITY, SMTP_TIMEOUT, SMTP_CA_FILE,
ALERT_EMAIL, ALERT_FROM, ALERT_ON`` works (config.py's object, or a ``types.SimpleNamespace``).
"""

import email.utils
import logging
import re
import smtplib
import socket
import ssl
from email.message import EmailMessage

import mail_report
from subprocess_utils import mask

LOG = logging.getLogger("email_alert")

SECURITY_MODES = ("starttls", "ssl", "none")
ALERT_ON_MODES = ("failure", "always", "never")
DEFAULT_TIMEOUT = 30

# Reasons already warned about in this process: a run that fails several times must not repeat them.
_WARNED = set()


class AlertError(Exception):
    """An alert e-mail could not be sent. The message names host:port and the cause, never a secret."""


def _get(cfg, name, default):
    value = getattr(cfg, name, default)
    return default if value is None else value


def _recipients(cfg):
    value = _get(cfg, "ALERT_EMAIL", [])
    if isinstance(value, str):
        # Tolerate an unparsed "a@x, b@y" so a config slip does not silence every alert.
        value = re.split(r"[,;\s]+", value)
    return [str(addr).strip() for addr in value if str(addr).strip()]


def _alert_on(cfg):
    value = str(_get(cfg, "ALERT_ON", "failure")).strip().lower()
    # An unknown value must not silence failure mails: treat it like the default.
    return value if value in ALERT_ON_MODES else "failure"


def mail_enabled(cfg):
    """Whether alert mail is configured at all.

    Input: the config object. Output: ``(True, "")`` or ``(False, reason)`` where reason is a
    one-line explanation (no SMTP_HOST, no ALERT_EMAIL, ALERT_ON=never). Raises nothing.
    """
    if not str(_get(cfg, "SMTP_HOST", "")).strip():
        return False, "no SMTP_HOST: e-mail alerts are disabled"
    if not _recipients(cfg):
        return False, "no ALERT_EMAIL: e-mail alerts are disabled"
    if _alert_on(cfg) == "never":
        return False, "ALERT_ON=never: e-mail alerts are disabled"
    return True, ""


def should_send(cfg, failed):
    """Whether a run with this outcome is mailed.

    Inputs: the config object, ``failed`` (bool). Output: True for a failure when ALERT_ON is
    failure/always, for a success only when ALERT_ON is always; False when mail is disabled.
    """
    if not mail_enabled(cfg)[0]:
        return False
    mode = _alert_on(cfg)
    if failed:
        return mode in ("failure", "always")
    return mode == "always"


# ---------------------------------------------------------------------------------------------- report

def _default_from():
    return f"alfresco-backup@{socket.getfqdn()}"


def _secret_list(secrets, password):
    found = {str(s) for s in tuple(secrets or ()) + (password,) if s}
    # Longest first, so a secret containing another one is masked whole.
    return sorted(found, key=len, reverse=True)


def _tls_context(ca_file):
    # create_default_context: CERT_REQUIRED + check_hostname; a private CA is added, never a bypass.
    return ssl.create_default_context(cafile=ca_file or None)


def _describe(exc, timeout, user):
    """One line saying why the SMTP conversation failed (no secrets: callers mask it anyway)."""
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return f"authentication failed for user {user!r}: {_smtp_reply(exc)}"
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "server refused the recipients: {}".format("; ".join(
            f"{addr} ({_reply_text(code, msg)})" for addr, (code, msg) in sorted(exc.recipients.items())))
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return f"server refused the sender {exc.sender}: {_smtp_reply(exc)}"
    if isinstance(exc, smtplib.SMTPDataError):
        return f"server refused the message: {_smtp_reply(exc)}"
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return f"server lacks a required extension: {exc}"
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        # smtplib reports a read timeout as "Connection unexpectedly closed: timed out".
        if isinstance(exc.__context__, (socket.timeout, TimeoutError)):
            return f"timed out after {timeout:g} s without an answer"
        return f"server closed the connection unexpectedly ({exc or 'no reply'})"
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"unexpected server reply: {_smtp_reply(exc)}"
    if isinstance(exc, smtplib.SMTPException):
        return f"SMTP error: {exc}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = getattr(exc, "verify_message", None) or str(exc)
        return (f"TLS certificate verification failed: {why} (set SMTP_CA_FILE to the CA bundle that signed "
                "the server's certificate if it is a private CA)")
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc}"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"timed out after {timeout:g} s without an answer"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is an SMTP server listening on this port?)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {exc}"
    if isinstance(exc, UnicodeError):
        return f"cannot encode the message or credentials: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _reply_text(code, msg):
    if isinstance(msg, bytes):
        msg = msg.decode("utf-8", "replace")
    return f"{code} {mail_report.one_line(msg)}"


def _smtp_reply(exc):
    return _reply_text(getattr(exc, "smtp_code", "?"), getattr(exc, "smtp_error", ""))


def _connect(host, port, security, timeout, context):
    if security == "ssl":
        return smtplib.SMTP_SSL(host, port, timeout=timeout, context=context)
    client = smtplib.SMTP(host, port, timeout=timeout)
    try:
        if security == "starttls":
            client.ehlo()
            # smtplib passes server_hostname=host, so the certificate is checked against SMTP_HOST.
            client.starttls(context=context)
            client.ehlo()
    except BaseException:
        client.close()
        raise
    return client


def _is_loopback(host):
    """True for localhost, 127.0.0.0/8 and ::1: a local relay may take a login without TLS."""
    return host in ("localhost", "::1") or host.startswith("127.")


def send_mail(cfg, subject, body, secrets=()):
    """Send one plain-text mail to every ALERT_EMAIL recipient.

    Inputs: the config object; ``subject``/``body`` text; ``secrets``, strings that must not appear
    in the mail (SMTP_PASSWORD is added): each is replaced by a mask in subject and body first.
    Connection per SMTP_SECURITY: "ssl" (implicit TLS), "starttls" (required, not opportunistic) or
    "none" (plain); TLS always verifies the certificate and the host name, trusting the system store
    plus SMTP_CA_FILE when set. SMTP_TIMEOUT bounds the connect and each later socket operation.
    Logs in only when SMTP_USER is set. Output: None.
    Raises :class:`AlertError` (host:port, mode and cause; never a secret) on any failure, including
    a server that accepted some recipients but refused others.
    """
    host = str(_get(cfg, "SMTP_HOST", "")).strip()
    security = str(_get(cfg, "SMTP_SECURITY", "starttls") or "starttls").strip().lower()
    port = int(_get(cfg, "SMTP_PORT", 0) or (465 if security == "ssl" else 587))
    timeout = float(_get(cfg, "SMTP_TIMEOUT", DEFAULT_TIMEOUT) or DEFAULT_TIMEOUT)
    user = str(_get(cfg, "SMTP_USER", ""))
    password = str(_get(cfg, "SMTP_PASSWORD", ""))
    ca_file = str(_get(cfg, "SMTP_CA_FILE", ""))
    recipients = _recipients(cfg)
    sender = str(_get(cfg, "ALERT_FROM", "")).strip() or _default_from()
    hidden = _secret_list(secrets, password)
    where = f"{host}:{port} ({security})"

    def fail(reason, cause=None):
        raise AlertError(mask(f"cannot send alert e-mail via {where}: {reason}", hidden)) from cause

    if not host:
        fail("SMTP_HOST is empty")
    if not recipients:
        fail("ALERT_EMAIL is empty")
    if security not in SECURITY_MODES:
        fail("SMTP_SECURITY must be one of {}, not {!r}".format(", ".join(SECURITY_MODES), security))
    if security == "none" and user and not _is_loopback(host):
        fail("refusing to send SMTP_PASSWORD unencrypted to a remote server: set SMTP_SECURITY=starttls or ssl")

    try:
        msg = EmailMessage()
        msg["Subject"] = mail_report.one_line(mask(subject, hidden))
        msg["From"] = sender
        msg["To"] = ", ".join(recipients)
        msg["Date"] = email.utils.formatdate(localtime=True)
        msg["Message-ID"] = email.utils.make_msgid(domain=sender.rpartition("@")[2] or "localhost")
        msg.set_content(mask(body, hidden))
    except (ValueError, TypeError) as exc:
        fail(f"cannot build the message: {exc}", exc)

    context = None
    if security != "none":
        try:
            context = _tls_context(ca_file)
        except (OSError, ValueError) as exc:
            fail(f"cannot load SMTP_CA_FILE {ca_file!r}: {exc}", exc)

    client = None
    try:
        client = _connect(host, port, security, timeout, context)
        if user:
            client.login(user, password)
        refused = client.send_message(msg, from_addr=sender, to_addrs=recipients)
    except (smtplib.SMTPException, OSError, ValueError) as exc:
        if client is not None:
            client.close()
        fail(_describe(exc, timeout, user), exc)
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        pass  # The message was accepted; a failed goodbye changes nothing.
    finally:
        client.close()
    if refused:
        fail("message accepted for {} but refused for {}".format(
            ", ".join(r for r in recipients if r not in refused),
            "; ".join(f"{addr} ({_reply_text(code, text)})" for addr, (code, text) in sorted(refused.items()))))


def notify(cfg, ok, subject, body, log=None, secrets=()):
    """Send the run's alert if the configuration asks for it; for entry points only.

    Inputs: the config object; ``ok`` (the run's result); subject/body (from :func:`build_report`);
    ``log`` (a logger; the module's when None); ``secrets`` to mask. Output: True when the mail was
    sent, False when not wanted, disabled or failed. Never raises: a mail problem is logged at ERROR
    and must not change the run's outcome. When mail is disabled (no SMTP_HOST or no ALERT_EMAIL) and
    this run failed, warns once per process that nobody will be told.
    """
    log = log or LOG
    hidden = ()
    try:
        hidden = _secret_list(secrets, _get(cfg, "SMTP_PASSWORD", ""))
        enabled, reason = mail_enabled(cfg)
        if not enabled:
            if not ok and _alert_on(cfg) != "never" and reason not in _WARNED:
                _WARNED.add(reason)
                log.warning("%s", reason)
            return False
        if not should_send(cfg, not ok):
            return False
        send_mail(cfg, subject, body, secrets=secrets)
        log.info("alert e-mail sent to %s", ", ".join(_recipients(cfg)))
        return True
    except AlertError as exc:
        log.error("%s", exc)
    except Exception as exc:  # a mail problem, or a bug here, must never end or change the run
        try:
            text = mask(f"cannot send alert e-mail: {type(exc).__name__}: {exc}", hidden)
        except Exception:  # an exception whose str() fails
            text = f"cannot send alert e-mail: {type(exc).__name__}"
        log.error("%s", text)
    return False

