"""Shared pytest setup: the project directory on sys.path, markers, and the sandbox fixtures.

Fixtures:
    service_user     (session) the sandbox's ServiceUser; creates the ``alfbackup`` user when run as root
    sandbox          (function) a running Sandbox with default options, destroyed afterwards
    sandbox_factory  (function) ``make(**Sandbox.create kwargs) -> Sandbox``; all destroyed afterwards
    cron_guard       (function) restores the service user's crontab; serialises crontab writers across runs
See tests/sandbox.py for the Sandbox API.
"""

import os
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PROJECT_DIR = os.path.dirname(TESTS_DIR)
for _path in (TESTS_DIR, PROJECT_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import sandbox as sandbox_module  # noqa: E402  (needs the sys.path entries above)
from s3server import S3Server  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "matrix: runs against several PostgreSQL versions or setups")


@pytest.fixture(scope="session")
def service_user():
    return sandbox_module.service_user()


@pytest.fixture
def sandbox_factory(service_user):
    made = []

    def make(**kwargs):
        sb = sandbox_module.Sandbox.create(**kwargs)
        made.append(sb)
        return sb

    yield make
    for sb in reversed(made):
        sb.destroy()


@pytest.fixture
def sandbox(sandbox_factory):
    return sandbox_factory()


@pytest.fixture
def cron_guard(service_user):
    """The service user's crontab, put back as it was afterwards; other test runs on this machine that also
    write it wait meanwhile (sandbox.CrontabGuard)."""
    guard = sandbox_module.CrontabGuard(service_user.name)
    yield guard
    guard.release()


@pytest.fixture
def s3(service_user):
    """A real S3 server on loopback (rclone serve s3, tests/s3server.py), stopped afterwards."""
    with S3Server(owner=service_user) as server:
        yield server
