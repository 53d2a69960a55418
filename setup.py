#!/usr/bin/env python3
"""The set-up wizard: ``python3 setup.py [--env PATH] [--dry-run] [--non-interactive --answers FILE]``.

Run once as the Alfresco service user, or with sudo (it then acts for SUDO_USER, or the owner of the data
directory, and leaves no root-owned file behind). Steps: 1 prerequisites, 2 detect the install, 3 .env,
4 directories, 5 PostgreSQL settings, 6 pg_hba.conf, 7 replication privilege, 8 restart, 9 venv, 10 cron,
11 verify (``backup.py --check``). Each step says what it will change and asks first; running it again
changes nothing. Standard library only: this is what creates the venv. Exit codes: EXIT_CODES.
"""

import os
import stat
import sys

sys.dont_write_bytecode = True  # under sudo, no root-owned __pycache__ may appear in the project
PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))


def _writable_by_others(info):
    return not stat.S_ISLNK(info.st_mode) and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _untrusted_project(project_dir):
    """Under sudo Python runs this project's modules as root: the paths (the project directory, a directory
    above it, a module, __pycache__ or what it holds, the venv this interpreter belongs to) a user other than
    root could change, as (path, uid)."""
    found = []
    venv = [sys.prefix] if sys.prefix != sys.base_prefix else []  # its site-packages are imported too
    for start in sorted({project_dir, os.path.realpath(project_dir)}) + venv:
        probe = start
        while True:
            info = os.lstat(probe)
            loose = _writable_by_others(info) and not (probe != start and info.st_mode & stat.S_ISVTX)
            if (info.st_uid != 0 or loose) and (probe, info.st_uid) not in found:
                found.append((probe, info.st_uid))
            if probe == "/":
                break
            probe = os.path.dirname(probe)
    cache = os.path.join(project_dir, "__pycache__")
    names = [os.path.join(project_dir, n) for n in os.listdir(project_dir) if n.endswith(".py")]
    names += [cache] if os.path.lexists(cache) else []
    if os.path.isdir(cache) and not os.path.islink(cache):
        names += [os.path.join(cache, n) for n in os.listdir(cache)]
    for path in names:
        for info in [os.lstat(path)] + ([os.stat(path)] if os.path.islink(path) else []):
            if info.st_uid != 0 or _writable_by_others(info):
                found.append((path, info.st_uid))
                break
    return found


if os.geteuid() == 0 and __name__ == "__main__":
    try:
        _UNTRUSTED = _untrusted_project(PROJECT_DIR)
    except FileNotFoundError:
        _UNTRUSTED = []
    if _UNTRUSTED:
        _PATH, _UID = _UNTRUSTED[0]
        if sys.prefix != sys.base_prefix and (_PATH + "/").startswith(sys.prefix + "/"):
            _FIX = "run it with the system interpreter: sudo /usr/bin/python3 %s/setup.py" % PROJECT_DIR
        elif (_PATH + "/").startswith(PROJECT_DIR + "/"):
            _FIX = "sudo chown -R root:root %s && sudo chmod -R go-w %s" % (PROJECT_DIR, PROJECT_DIR)
        else:
            _FIX = ("move the project into a directory only root can change (e.g. /opt), or: sudo chown root:root %s "
                    "&& sudo chmod go-w %s" % (_PATH, _PATH))
        sys.stderr.write("setup.py: refusing to run as root: %s can be changed by uid %d%s, so Python would run that "
                         "user's code as root. Fix:\n  %s\nor run setup.py as the service user, without sudo.\n"
                         % (_PATH, _UID, " (and %d more path(s))" % (len(_UNTRUSTED) - 1) if len(_UNTRUSTED) > 1
                            else "", _FIX))
        sys.exit(2)

import argparse  # noqa: E402  (after the checks above on purpose: the project's modules are imported below)

import postgres  # noqa: E402  (stdlib only at import time; psycopg2 is imported late and not used here)
import setup_answers  # noqa: E402
import setup_files  # noqa: E402
import setup_finish  # noqa: E402
import setup_formats  # noqa: E402
import setup_pg  # noqa: E402
import setup_safefs  # noqa: E402
import setup_service  # noqa: E402
import setup_steps  # noqa: E402
from setup_answers import CONFIRM_KEYS, WIZARD_KEYS, Ui  # noqa: E402
from setup_sys import AnswerError, SetupError  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_ANSWERS, EXIT_INCOMPLETE = 0, 1, 2, 3
EXIT_CODES = {
    EXIT_OK: "set up and verified (or a dry run that could read everything)",
    EXIT_FAILED: "a step failed: the message says what, and what was already applied",
    EXIT_ANSWERS: "a wrong or missing answer or prerequisite; nothing was changed",
    EXIT_INCOMPLETE: "done except what was declined or must wait (a PostgreSQL restart): see the summary",
}


def run(ctx, ui, env_exists):
    """All steps in order. Returns the exit code; raises AnswerError/SetupError."""
    ctx.header(1, "Prerequisites")
    setup_steps.prerequisites(ctx)
    existing_text, ctx.env_owner = setup_safefs.read_env(ctx.env_path) if env_exists else (None, None)
    try:
        existing = setup_files.parse_env(existing_text or "", os.environ)
    except setup_files.TextError as exc:
        raise AnswerError("%s: %s" % (ctx.env_path, exc))
    ctx.header(2, "Detect the Alfresco install")
    base = ui.ask("ALF_BASE_DIR", "Alfresco install directory", setup_steps.guess_base(existing),
                  check=lambda v: None if v and os.path.isdir(v) else "%r is not a directory" % v)
    facts = setup_steps.detect(ctx, os.path.normpath(base), ui.answers.get("PGDATA") or existing.get("PGDATA"))
    setup_steps.show_detected(ctx, facts)
    ctx.header(3, "Configuration file %s" % ctx.env_path)
    setup_answers.collect_env(ctx, ui, facts, existing, existing_text)
    ctx.values["ALF_BASE_DIR"] = os.path.normpath(base)
    setup_answers.preflight(ctx, ui, facts)
    backup_dir = os.path.normpath(ctx.values["BACKUP_DIR"])
    log_dir = ui.ask("CRON_LOG_DIR", WIZARD_KEYS["CRON_LOG_DIR"][1], os.path.join(backup_dir, "logs"),
                     check=lambda v: None if os.path.isabs(v) else "must be an absolute path")
    venv = ui.ask("VENV_DIR", WIZARD_KEYS["VENV_DIR"][1], os.path.join(ctx.project_dir, ".venv"),
                  check=lambda v: None if os.path.isabs(v) else "must be an absolute path")
    schedule = ui.ask("CRON_SCHEDULE", WIZARD_KEYS["CRON_SCHEDULE"][1], "0 2 * * *",
                      check=lambda v: None if not v or setup_formats.valid_schedule(v) else "not a cron schedule")
    timeouts = _seconds(ui, "ALFRESCO_STOP_TIMEOUT"), _seconds(ui, "ALFRESCO_START_TIMEOUT")
    setup_steps.write_env(ctx, existing_text)
    ctx.header(4, "Directories")
    setup_steps.directories(ctx, log_dir)
    ctx.header(5, "PostgreSQL settings (PostgreSQL %s)" % postgres.version_label(ctx.server_num))
    setup_pg.settings_step(ctx)
    ctx.header(6, "pg_hba.conf")
    setup_pg.hba_step(ctx)
    ctx.header(7, "Replication privilege")
    setup_pg.role_step(ctx)
    ctx.header(8, "Restart")
    restarted = setup_service.restart_step(ctx, *timeouts)
    ctx.header(9, "Python environment")
    python = setup_finish.venv_step(ctx, venv)
    ctx.header(10, "Cron")
    if schedule:
        setup_finish.cron_step(ctx, schedule, python, log_dir)
    else:
        ctx.record("cron", setup_steps.UNCHANGED, "no cron entry (CRON_SCHEDULE is empty)")
    ctx.header(11, "Verify")
    check = "%s %s --env %s --check" % (python, os.path.join(ctx.project_dir, "backup.py"), ctx.env_path)
    if ctx.dry_run:
        ctx.record("verify", setup_steps.WOULD, check)
    elif not restarted or not os.path.exists(ctx.env_path):
        ctx.record("verify", setup_steps.PENDING, "%s, then: %s" % (
            "after the restart" if not restarted else "once %s exists" % ctx.env_path, check))
    else:
        setup_finish.verify(ctx, python)
    return outcome(ctx)


def _seconds(ui, key):
    value = ui.answers.get(key, WIZARD_KEYS[key][0]).strip()
    if not value.isdigit():
        raise AnswerError("%s must be a number of seconds, got %r" % (key, value))
    return int(value)


def outcome(ctx):
    statuses = [status for _s, status, _d in ctx.results]
    if setup_steps.FAILED in statuses:
        return EXIT_FAILED
    if ctx.dry_run:
        return EXIT_OK
    if setup_steps.PENDING in statuses or setup_steps.SKIPPED in statuses:
        return EXIT_INCOMPLETE
    return EXIT_OK


def summary(ctx, code):
    ctx.say("\n== Summary ==")
    for step, status, detail in ctx.results:
        ctx.say("  %-22s %-13s %s" % (step, status, detail))
    ctx.say("setup.py: %s" % EXIT_CODES[code])


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Set up the Alfresco backup on this server: .env, directories, PostgreSQL WAL archiving, "
                    "pg_hba.conf, replication privilege, restart, venv, cron, and a final check.",
        epilog="Exit codes: " + "; ".join("%d %s" % item for item in sorted(EXIT_CODES.items())) +
               ". Answer keys: the .env keys plus " + ", ".join(list(WIZARD_KEYS) + list(CONFIRM_KEYS)) + ".")
    parser.add_argument("--env", metavar="PATH", help="the .env to write (default: .env next to backup.py)")
    parser.add_argument("--answers", metavar="FILE", help="answers in .env format (defaults for the prompts; "
                                                          "with --non-interactive, the only input)")
    parser.add_argument("--non-interactive", action="store_true", help="ask nothing: take --answers and defaults")
    parser.add_argument("--dry-run", action="store_true", help="show every change (diffs for files); change nothing")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env_path = os.path.abspath(args.env or os.path.join(PROJECT_DIR, ".env"))
    try:
        answers = setup_answers.load_answers(args.answers) if args.answers else {}
        if not args.non_interactive and not sys.stdin.isatty():
            raise AnswerError("no terminal to ask on: use --non-interactive --answers FILE")
    except AnswerError as exc:
        sys.stderr.write("setup.py: %s\n" % exc)
        return EXIT_ANSWERS
    ui = Ui(not args.non_interactive, answers)
    ctx = setup_steps.Context(ui, PROJECT_DIR, env_path, args.dry_run)
    if args.dry_run:
        ctx.say("DRY RUN: nothing will be changed.")
    try:
        code = run(ctx, ui, os.path.lexists(env_path))
    except AnswerError as exc:
        ctx.say("\nERROR: %s" % exc)
        ctx.say(_applied(ctx).strip() or "Nothing was changed on the server.")
        return EXIT_ANSWERS
    except SetupError as exc:
        ctx.record("(stopped)", setup_steps.FAILED, str(exc).splitlines()[0])
        summary(ctx, EXIT_FAILED)
        ctx.say("\nERROR: %s%s" % (exc, _applied(ctx) or "\nNothing was changed on the server."))
        return EXIT_FAILED
    except KeyboardInterrupt:
        ctx.say("\ninterrupted.%s" % (_applied(ctx) or " Nothing was changed on the server."))
        return EXIT_FAILED
    summary(ctx, code)
    return code


def _applied(ctx):
    if not ctx.applied:
        return ""
    return "\nApplied on the server before this point (still in effect):\n  " + "\n  ".join(ctx.applied)


if __name__ == "__main__":
    sys.exit(main())
