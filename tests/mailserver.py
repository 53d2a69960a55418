"""A real SMTP server on loopback (aiosmtpd) that keeps every message it receives, for end-to-end tests."""

import email
import socket
import time

from aiosmtpd.controller import Controller


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Collector:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.original_content or envelope.content)
        self.messages.append({"from": envelope.mail_from, "to": list(envelope.rcpt_tos), "message": message,
                              "subject": str(message["Subject"]), "body": _body(message),
                              "raw": (envelope.original_content or envelope.content).decode("utf-8", "replace")})
        return "250 OK"


def _body(message):
    if message.is_multipart():
        return "\n".join(part.get_payload(decode=True).decode("utf-8", "replace")
                         for part in message.walk() if part.get_content_type() == "text/plain")
    return message.get_payload(decode=True).decode("utf-8", "replace")


class MailServer:
    """``with MailServer() as mail:`` → ``mail.port``, ``mail.messages``, ``mail.wait(n, timeout)``."""

    def __init__(self):
        self.handler = _Collector()
        self.port = free_port()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)

    @property
    def messages(self):
        return self.handler.messages

    def wait(self, count=1, timeout=10):
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.messages

    def env(self, to="admin@example.org"):
        """The .env overrides that send alerts here (plain SMTP: loopback only)."""
        return {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": self.port, "SMTP_SECURITY": "none", "ALERT_EMAIL": to,
                "ALERT_FROM": "backup@example.org"}

    def __enter__(self):
        self.controller.start()
        return self

    def __exit__(self, *exc):
        self.controller.stop()
