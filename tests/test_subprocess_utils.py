"""Tests for subprocess_utils.py with real child processes (sh, sleep, cat): exit codes, timeouts that kill
the whole process group, secret masking in logs and errors, missing programs, and read_stream."""

import logging
import os
import signal
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import subprocess_utils as su  # noqa: E402
from subprocess_utils import CommandError  # noqa: E402

ENV = su.base_env()


def alive(pid):
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_dead(pids, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def read_pids(path, count, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as handle:
                pids = [int(x) for x in handle.read().split()]
            if len(pids) >= count:
                return pids
        time.sleep(0.02)
    raise AssertionError("the command did not write %d pids to %s" % (count, path))


def family_script(pidfile, trap=""):
    """sh that starts two background sleeps, records its own and their PIDs, then waits."""
    return ("%s sleep 100 & echo $! >> '%s'; sleep 100 & echo $! >> '%s'; echo $$ >> '%s'; wait"
            % (trap, pidfile, pidfile, pidfile))


# --- run: results and errors -----------------------------------------------------------------------------

def test_success_captures_stdout_and_stderr():
    result = su.run(["sh", "-c", "echo out1; echo out2; echo err >&2"], ENV)
    assert result.returncode == 0
    assert result.stdout == "out1\nout2"
    assert result.stderr == "err"
    assert result.argv == "sh -c echo out1; echo out2; echo err >&2"
    assert result.duration >= 0


def test_non_zero_exit_is_command_error_with_code_and_tail():
    with pytest.raises(CommandError) as info:
        su.run(["sh", "-c", "echo first >&2; echo 'the real reason' >&2; exit 3"], ENV, what="doing the thing")
    exc = info.value
    assert exc.returncode == 3 and not exc.timed_out and not exc.not_found
    assert exc.stderr_tail == "first\nthe real reason"
    assert str(exc) == "doing the thing failed (exit code 3): the real reason"


def test_error_without_stderr_says_so():
    with pytest.raises(CommandError) as info:
        su.run(["false"], ENV)
    assert str(info.value) == "false failed (exit code 1): no error output"


def test_stderr_tail_keeps_the_last_lines():
    with pytest.raises(CommandError) as info:
        su.run(["sh", "-c", "i=1; while [ $i -le 50 ]; do echo line$i >&2; i=$((i+1)); done; exit 1"], ENV)
    lines = info.value.stderr_tail.splitlines()
    assert len(lines) == su.STDERR_TAIL_LINES
    assert lines[0] == "line31" and lines[-1] == "line50"


def test_ok_codes():
    result = su.run(["sh", "-c", "exit 24"], ENV, ok_codes=(0, 24))
    assert result.returncode == 24
    with pytest.raises(CommandError):
        su.run(["sh", "-c", "exit 0"], ENV, ok_codes=(24,))


def test_killed_by_signal():
    with pytest.raises(CommandError) as info:
        su.run(["sh", "-c", "kill -9 $$"], ENV)
    assert info.value.returncode == -9
    assert "killed by signal 9" in str(info.value)


def test_program_not_found():
    with pytest.raises(CommandError) as info:
        su.run(["/nonexistent/pg_basebackup", "--version"], ENV, what="pg_basebackup --version")
    assert info.value.not_found and info.value.returncode is None
    assert "program not found: /nonexistent/pg_basebackup" in str(info.value)
    with pytest.raises(CommandError) as info:
        su.run(["no-such-program-anywhere"], ENV)
    assert info.value.not_found


def test_program_not_executable(tmp_path):
    script = tmp_path / "tool"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    with pytest.raises(CommandError) as info:
        su.run([str(script)], ENV)
    assert info.value.not_found
    assert "cannot execute" in str(info.value)


def test_stdin_cwd_and_arguments_are_literal(tmp_path):
    result = su.run(["cat"], ENV, stdin_data=b"from stdin\n")
    assert result.stdout == "from stdin"
    result = su.run(["pwd"], ENV, cwd=str(tmp_path))
    assert result.stdout == str(tmp_path)
    odd = "a b; $(touch %s) `id` 'q' \"dq\" *" % (tmp_path / "pwned")
    result = su.run(["printf", "%s", odd], ENV)
    assert result.stdout == odd
    assert not (tmp_path / "pwned").exists()


def test_non_utf8_output_does_not_break():
    result = su.run(["printf", "caf\\351\\n"], ENV)
    assert result.stdout == "caf\ufffd"


def test_arguments_are_stringified():
    assert su.run(["echo", 5432, 1.5], ENV).stdout == "5432 1.5"


# --- environment -----------------------------------------------------------------------------------------

def test_base_env_is_minimal_and_explicit(monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "leaked")
    monkeypatch.setenv("PGHOST", "elsewhere")
    env = su.base_env({"PGPORT": 5433, "PGPASSWORD": None, "PGUSER": "alfresco"})
    assert set(env) <= {"PATH", "HOME", "LANG", "LC_ALL", "TZ", "PGPORT", "PGUSER"}
    assert env["PGPORT"] == "5433" and env["LC_ALL"] == "C"
    output = su.run(["env"], env).stdout
    assert "leaked" not in output and "elsewhere" not in output
    assert "PGUSER=alfresco" in output.splitlines()


# --- timeouts --------------------------------------------------------------------------------------------

def test_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = str(tmp_path / "pids")
    started = time.monotonic()
    with pytest.raises(CommandError) as info:
        su.run(["sh", "-c", family_script(pidfile)], ENV, timeout=1, what="the slow thing")
    elapsed = time.monotonic() - started
    assert info.value.timed_out and info.value.returncode is None
    assert "the slow thing: timed out after 1 s" in str(info.value)
    assert elapsed < 4
    pids = read_pids(pidfile, 3)
    assert wait_dead(pids) == []


@pytest.mark.slow
def test_timeout_escalates_to_sigkill(tmp_path):
    pidfile = str(tmp_path / "pids")
    started = time.monotonic()
    with pytest.raises(CommandError) as info:
        su.run(["sh", "-c", family_script(pidfile, trap="trap '' TERM;")], ENV, timeout=0.5)
    assert info.value.timed_out
    # SIGTERM is ignored by all three; SIGKILL follows after the 5 s grace.
    assert 5 <= time.monotonic() - started < 9
    assert wait_dead(read_pids(pidfile, 3)) == []


def test_interrupted_wait_kills_the_child_group(tmp_path):
    pidfile = str(tmp_path / "pids")

    class Interrupted(Exception):
        pass

    def handler(_signum, _frame):
        raise Interrupted()

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(Interrupted):
            su.run(["sh", "-c", family_script(pidfile)], ENV)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert wait_dead(read_pids(pidfile, 3)) == []


def test_timeout_applies_while_child_ignores_stdin():
    started = time.monotonic()
    with pytest.raises(CommandError) as info:
        su.run(["sleep", "1.5"], ENV, stdin_data=b"x" * (1 << 20), timeout=0.2)
    assert info.value.timed_out
    assert time.monotonic() - started < 1.2


# --- secrets ---------------------------------------------------------------------------------------------

def test_secrets_are_masked_in_log_and_errors(caplog):
    caplog.set_level(logging.DEBUG, logger="subprocess")
    script = "echo user=alfresco password=$1; echo 'FATAL: bad password hunter2' >&2; exit 2"
    with pytest.raises(CommandError) as info:
        su.run(["sh", "-c", script, "sh", "hunter2"], ENV, secrets=["hunter2", ""])
    assert "hunter2" not in caplog.text
    assert "running: sh -c %s sh ********" % script.replace("hunter2", "********") in caplog.text
    assert "password=********" in caplog.text
    assert "FATAL: bad password ********" in caplog.text
    exc = info.value
    assert "hunter2" not in str(exc) and "hunter2" not in exc.argv and "hunter2" not in exc.stderr_tail
    assert "********" in exc.stderr_tail


def test_secrets_masked_on_success_and_timeout(caplog, tmp_path):
    caplog.set_level(logging.DEBUG, logger="subprocess")
    result = su.run(["echo", "s3cr3t-value"], ENV, secrets=["s3cr3t-value"])
    assert result.argv == "echo ********"
    with pytest.raises(CommandError) as info:
        su.run(["sh", "-c", "echo s3cr3t-value >&2; sleep 5"], ENV, secrets=["s3cr3t-value"], timeout=0.5)
    assert "s3cr3t-value" not in caplog.text
    assert "s3cr3t-value" not in info.value.stderr_tail and "s3cr3t-value" not in info.value.argv


def test_custom_logger_and_stdout_level(caplog):
    log = logging.getLogger("test-subprocess-custom")
    caplog.set_level(logging.DEBUG, logger="test-subprocess-custom")
    su.run(["echo", "quiet"], ENV, log=log, stdout_level=logging.DEBUG)
    records = [r for r in caplog.records if r.name == "test-subprocess-custom" and "quiet" in r.getMessage()]
    assert any(r.levelno == logging.DEBUG and r.getMessage() == "echo: quiet" for r in records)


def test_mask():
    assert su.mask("a pw b pw", ["pw"]) == "a ******** b ********"
    assert su.mask("abc", ["", None]) == "abc"


# --- read_stream -----------------------------------------------------------------------------------------

def test_read_stream_returns_what_consume_returns():
    data = su.read_stream(["sh", "-c", "printf 'a\\0b'; echo note >&2"], ENV, lambda s: s.read())
    assert data == b"a\0b"


def test_read_stream_short_consumer_does_not_break_the_producer():
    # The producer writes far more than a pipe holds; the consumer takes 10 bytes.
    result = su.read_stream(["head", "-c", "5000000", "/dev/zero"], ENV, lambda s: s.read(10))
    assert result == b"\0" * 10


def test_read_stream_non_zero_exit():
    with pytest.raises(CommandError) as info:
        su.read_stream(["sh", "-c", "echo partial; echo 'zstd: truncated input' >&2; exit 1"], ENV,
                       lambda s: s.read(), what="reading base.tar.zst")
    assert info.value.returncode == 1
    assert "reading base.tar.zst failed (exit code 1): zstd: truncated input" == str(info.value)


def test_read_stream_consumer_error_kills_producer_and_propagates():
    pids = []

    def consume(stream):
        pids.append(int(stream.readline()))
        raise ValueError("bad tar")

    with pytest.raises(ValueError, match="bad tar"):
        su.read_stream(["sh", "-c", "echo $$; exec sleep 100"], ENV, consume)
    assert wait_dead(pids) == []


def test_read_stream_timeout_is_an_error():
    started = time.monotonic()
    with pytest.raises(CommandError):
        su.read_stream(["sleep", "100"], ENV, lambda s: s.read(), timeout=0.5)
    assert time.monotonic() - started < 4


def test_read_stream_timeout_sets_timed_out():
    with pytest.raises(CommandError) as info:
        su.read_stream(["sleep", "100"], ENV, lambda s: s.read(), timeout=0.3)
    assert info.value.timed_out


def test_read_stream_program_not_found():
    with pytest.raises(CommandError) as info:
        su.read_stream(["/nonexistent/zstd", "-dc"], ENV, lambda s: s.read())
    assert info.value.not_found


def test_read_stream_masks_secrets(caplog):
    caplog.set_level(logging.DEBUG, logger="subprocess")
    with pytest.raises(CommandError) as info:
        su.read_stream(["sh", "-c", "echo tok-123 >&2; exit 1", "tok-123"], ENV, lambda s: s.read(),
                       secrets=["tok-123"])
    assert "tok-123" not in caplog.text
    assert "tok-123" not in str(info.value) and "tok-123" not in info.value.argv
