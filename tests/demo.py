#!/usr/bin/env python3
"""``make demo``: build a throwaway Alfresco-like sandbox (real PostgreSQL, sample contentstore) under /tmp
that is not yet set up for backups (no WAL archiving, no replication privilege, no replication lines in
pg_hba.conf), prepare it with the set-up wizard (``setup.py --non-interactive``), run ``backup.py`` against
it twice (with new content in between), print the summary and where the backups are. The sandbox is kept for
you to look at; the server is stopped at the end.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sandbox as sandbox_module  # noqa: E402

SYSTEM_PYTHON = "/usr/bin/python3"  # the wizard runs with the system python3: it is what makes the venv


def banner(text):
    print("\n" + "=" * 78 + "\n" + text + "\n" + "=" * 78, flush=True)


def run(sb, args, env_path):
    result = sb.run_cli("backup.py", args=args, env_path=env_path, timeout=900)
    summary = result.stdout.split("Backup summary", 1)
    if len(summary) == 2 and not args:
        print("Backup summary" + summary[1], end="")
    else:
        print(result.stdout, end="")
    if result.stderr.strip():
        print(result.stderr, end="", file=sys.stderr)
    return result.returncode


def quote(value):
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def set_up(sb, env_path):
    """Run the wizard non-interactively as the service user; print its output; return its exit code."""
    answers = os.path.join(sb.root, "setup-answers.env")
    values = {"ALF_BASE_DIR": sb.alf_base_dir, "BACKUP_DIR": sb.backup_dir, "PGSUPERUSER": "postgres",
              "PGSUPERPASSWORD": sb.superuser_password, "RESTART_POSTGRES": "yes",
              "VENV_DIR": os.path.join(sb.project_dir, ".venv"),
              "CRON_SCHEDULE": ""}  # a demo leaves no cron entry behind
    fd = os.open(answers, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("".join("%s=%s\n" % (k, quote(v)) for k, v in values.items()))
    sb.chown_to_service_user(answers)
    python = SYSTEM_PYTHON if os.access(SYSTEM_PYTHON, os.X_OK) else sb.python
    result = sb.run_as_service_user([python, os.path.join(sb.project_dir, "setup.py"), "--env", env_path,
                                     "--non-interactive", "--answers", answers], timeout=900)
    print(result.stdout, end="")
    if result.stderr.strip():
        print(result.stderr, end="", file=sys.stderr)
    return result.returncode


def main():
    banner("1/6 Building the sandbox (PostgreSQL %s, contentstore, keystore, alfresco-global.properties), "
           "not yet archiving WAL" % os.path.basename(os.path.dirname(sandbox_module.default_pg_bin())))
    sb = sandbox_module.Sandbox.create(n_files=200, archive=False, replication=False, hba_replication=False)
    env_path = os.path.join(sb.root, "backup.env")
    print("sandbox: %s\nALF_BASE_DIR=%s\nBACKUP_DIR=%s\nconfiguration: %s" % (
        sb.root, sb.alf_base_dir, sb.backup_dir, env_path))
    banner("2/6 Set-up wizard: python3 setup.py --env %s --non-interactive --answers setup-answers.env" % env_path)
    if set_up(sb, env_path) != 0:
        sb.stop()
        print("\nthe set-up wizard failed; the sandbox is kept in %s" % sb.root)
        return 1
    codes = []
    try:
        banner("3/6 First night: python backup.py --env %s" % env_path)
        codes.append(run(sb, [], env_path))
        sb.add_content(20, date=(2025, 6, 1, 2, 0))
        banner("4/6 Second night, after 20 new documents (unchanged files are hardlinked)")
        codes.append(run(sb, [], env_path))
        banner("5/6 python backup.py --status")
        run(sb, ["--status"], env_path)
        banner("6/6 Restore drill of the backup just made: python restore.py --env %s verify" % env_path)
        drill = sb.run_cli("restore.py", args=["verify"], env_path=env_path, timeout=900)
        text = drill.stdout
        print(text[text.find("Restore drill"):] if "Restore drill" in text else text, end="")
        if drill.stderr.strip():
            print(drill.stderr, end="", file=sys.stderr)
        codes.append(drill.returncode)
    finally:
        sb.stop()
    print("\nBackups are in %s:" % sb.backup_dir)
    for kind in ("postgres", "contentstore", "config"):
        folder = os.path.join(sb.backup_dir, kind)
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                print("  %s/%s" % (kind, name))
    print("\nThe server is stopped. Start it again: %s %s start --root %s\nRemove everything: %s %s destroy "
          "--root %s" % (sys.executable, os.path.abspath(sandbox_module.__file__), sb.root, sys.executable,
                         os.path.abspath(sandbox_module.__file__), sb.root))
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
