"""The wizard's last steps: the Python environment (9), the cron entry (10) and the final check (11)."""

import os
import sys

import setup_files
import setup_formats
import setup_safefs
import setup_sys
import subprocess_utils
from setup_steps import CHANGED, FAILED, PASSED, SKIPPED, UNCHANGED, WOULD
from setup_sys import SetupError


# ---- 9. Python environment --------------------------------------------------------------------------------
def base_python():
    """The system interpreter to build the venv from (the one running this, outside any venv)."""
    if sys.prefix != sys.base_prefix:
        for name in ("python3", "python"):
            candidate = os.path.join(sys.base_prefix, "bin", name)
            if os.access(candidate, os.X_OK):
                return candidate
    return sys.executable


def venv_step(ctx, venv_dir):
    """Make ``venv_dir`` a venv the service user can run with python-dotenv and psycopg2 (creating it and
    running pip install -r requirements.txt when needed). Returns its python. Raises SetupError with pip's
    output when that fails."""
    python = os.path.join(venv_dir, "bin", "python")
    user = ctx.service_user
    if os.access(python, os.X_OK) and _imports_ok(user, python):
        ctx.record("venv", UNCHANGED, "%s imports python-dotenv and psycopg2" % venv_dir)
        return python
    requirements = os.path.join(ctx.project_dir, "requirements.txt")
    create = not os.path.exists(python)
    changes = (["create the venv %s (%s -m venv) as %s" % (venv_dir, base_python(), user.name)] if create else [])
    changes.append("%s -m pip install -r %s" % (python, requirements))
    if not ctx.decide("APPLY_VENV", changes):
        ctx.record("venv", WOULD if ctx.dry_run else SKIPPED, venv_dir)
        return python
    owner = setup_sys.owner_of(venv_dir) if os.path.exists(venv_dir) else None
    if owner is not None and owner != user and not setup_sys.i_am_root():
        raise SetupError("%s belongs to %s; run setup.py with sudo or choose another VENV_DIR"
                         % (venv_dir, owner.name))
    if not create and owner is not None and owner.uid == 0 and user.uid != 0:
        # pip would run as root the code of whatever is in (or downloaded into) that venv.
        raise SetupError("the venv %s belongs to root and does not import dotenv and psycopg2; setup.py does not run "
                         "pip as root: fix it yourself (sudo %s -m pip install -r %s) or choose another VENV_DIR"
                         % (venv_dir, python, requirements))
    try:
        if create:
            setup_safefs.ensure_dir(venv_dir, user, 0o755, adopt_root=True)
            setup_sys.run_as(user, [base_python(), "-m", "venv", venv_dir], timeout=300, what="python3 -m venv")
        # A venv that existed already is installed into as its owner; a new one is the service user's.
        installer = owner if owner is not None and not create else user
        result = setup_sys.run_as(installer, [python, "-m", "pip", "install", "--disable-pip-version-check",
                                              "-q", "-r", requirements], timeout=900, what="pip install")
    except subprocess_utils.CommandError as exc:
        raise SetupError("%s\n%s\nthe venv %s is NOT usable; fix the cause (network, python3-venv) and run "
                         "setup.py again" % (exc, exc.stderr_tail, venv_dir))
    if not _imports_ok(user, python):
        raise SetupError("pip install finished but %s cannot import dotenv and psycopg2:\n%s"
                         % (python, result.stdout[-2000:]))
    ctx.record("venv", CHANGED, "%s%s with %s" % ("created " if create else "installed into ",
                                                  venv_dir, os.path.basename(requirements)))
    return python


def _imports_ok(user, python):
    try:
        setup_sys.run_as(user, [python, "-c", "import dotenv, psycopg2"], timeout=60, what="venv check")
        return True
    except subprocess_utils.CommandError:
        return False


# ---- 10. cron -----------------------------------------------------------------------------------------------
def _crontab_argv(user, *args):
    if setup_sys.i_am_root():
        return [setup_sys.root_program("crontab"), "-u", user.name] + list(args)
    return ["crontab"] + list(args)


def read_crontab(user):
    """The service user's crontab text ('' when it has none). Raises SetupError."""
    env = setup_sys.user_env(user)
    try:
        result = subprocess_utils.run(_crontab_argv(user, "-l"), env, timeout=30, ok_codes=(0, 1),
                                      what="crontab -l")
    except subprocess_utils.CommandError as exc:
        raise SetupError("cannot read the crontab of %s: %s" % (user.name, exc))
    if result.returncode == 1:
        if "no crontab" in result.stderr.lower():
            return ""
        raise SetupError("crontab -l for %s failed: %s" % (user.name, result.stderr.strip()))
    return result.stdout + "\n" if result.stdout and not result.stdout.endswith("\n") else result.stdout


def cron_step(ctx, schedule, python, log_dir):
    """Merge the nightly entry into the service user's crontab (never root's). Raises SetupError."""
    user = ctx.service_user
    if user.uid == 0:
        raise SetupError("refusing to install the backup in root's crontab: set SERVICE_USER")
    if user.uid != os.geteuid() and not setup_sys.i_am_root():
        raise SetupError("cannot edit the crontab of %s as %s: run setup.py with sudo" % (user.name,
                                                                                       setup_sys.me().name))
    current = read_crontab(user)
    try:
        marker, entry = setup_formats.cron_entry(schedule, ctx.project_dir, python, os.path.abspath(ctx.env_path),
                                               log_dir)
    except setup_formats.TextError as exc:
        raise SetupError("no cron entry: %s" % exc)
    new, note = setup_formats.merge_crontab(current, marker, entry)
    if ctx.values.get("OFFSITE_REMOTE"):  # the off-site copy ships every 5 minutes (README, Off-site copy)
        offsite = setup_formats.offsite_cron_entry(ctx.project_dir, python, os.path.abspath(ctx.env_path), log_dir)
        new, _note = setup_formats.merge_crontab(new, *offsite)
        entry += "\n" + offsite[1]
    if new == current:
        ctx.record("cron", UNCHANGED, note or "the crontab of %s already has the entry" % user.name)
        return
    if not ctx.decide("APPLY_CRON", ["install in the crontab of %s: %s" % (user.name, entry)],
                      [setup_files.unified_diff(current, new, "crontab of %s" % user.name)]):
        ctx.record("cron", WOULD if ctx.dry_run else SKIPPED, entry)
        return
    try:
        subprocess_utils.run(_crontab_argv(user, "-"), setup_sys.user_env(user), timeout=30,
                             stdin_data=new.encode("utf-8"), what="crontab -")
    except subprocess_utils.CommandError as exc:
        raise SetupError("cannot install the crontab of %s: %s (is the user allowed in /etc/cron.allow?)"
                         % (user.name, exc))
    if read_crontab(user) != new:
        raise SetupError("the crontab of %s does not read back as written" % user.name)
    # What cron will run, read back the way cron reads it (an unescaped % would cut the command short).
    command, stdin = setup_formats.cron_runs(entry)
    if stdin or "--env %s " % setup_formats.sh_quote(os.path.abspath(ctx.env_path)) not in command:
        raise SetupError("cron would not run the entry as written (%r): fix the paths in it" % command)
    ctx.record("cron", CHANGED, "%s: %s" % (user.name, entry))


# ---- 11. verify -----------------------------------------------------------------------------------------------
def verify(ctx, python):
    """A replication connection as PGUSER, then ``backup.py --check``; prints each result line. Returns True
    when everything passed."""
    ok = True
    try:
        out = ctx.user_psql.run("IDENTIFY_SYSTEM", replication=True).strip()
        ctx.say("  OK   replication_login      %s can open a replication connection (%s)"
                % (ctx.values["PGUSER"], out.split("|")[0] if out else "?"))
    except SetupError as exc:
        ok = False
        ctx.say("  FAIL replication_login      %s" % exc)
    argv = [python, os.path.join(ctx.project_dir, "backup.py"), "--env", os.path.abspath(ctx.env_path), "--check"]
    timeout = 120 + int(ctx.values.get("WAL_WAIT_TIMEOUT") or 60)
    try:
        result = setup_sys.run_as(ctx.service_user, argv, timeout=timeout, ok_codes=(0, 1, 2),
                                  what="backup.py --check")
    except subprocess_utils.CommandError as exc:
        ctx.say("  FAIL backup.py --check: %s" % exc)
        return False
    for line in setup_sys.printable(result.stdout).splitlines():
        if line.split(" ", 1)[0] in ("OK", "WARN", "FAIL"):
            ctx.say("  " + line)
    if result.returncode != 0:
        ctx.say("  backup.py --check exit code %d:\n%s" % (result.returncode, setup_sys.printable(
            (result.stdout + result.stderr)[-3000:])))
    ok = ok and result.returncode == 0
    ctx.record("verify", PASSED if ok else FAILED, "backup.py --check %s" % ("passed" if ok else "FAILED"))
    return ok
