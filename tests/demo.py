#!/usr/bin/env python3
"""``make demo``: build a throwaway Alfresco-like sandbox (real PostgreSQL, sample contentstore) under /tmp,
run ``backup.py`` against it twice (with new content in between), print the summary and where the backups
are. The sandbox is kept for you to look at; the server is stopped at the end.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sandbox as sandbox_module  # noqa: E402


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


def main():
    banner("1/4 Building the sandbox (PostgreSQL %s, contentstore, keystore, alfresco-global.properties)"
           % os.path.basename(os.path.dirname(sandbox_module.default_pg_bin())))
    sb = sandbox_module.Sandbox.create(n_files=200, extra_conf={"archive_timeout": "60"})
    env_path = sb.write_env()
    print("sandbox: %s\nALF_BASE_DIR=%s\nBACKUP_DIR=%s\nconfiguration: %s" % (
        sb.root, sb.alf_base_dir, sb.backup_dir, env_path))
    codes = []
    try:
        banner("2/4 First night: python backup.py --env %s" % env_path)
        codes.append(run(sb, [], env_path))
        sb.add_content(20, date=(2025, 6, 1, 2, 0))
        banner("3/4 Second night, after 20 new documents (unchanged files are hardlinked)")
        codes.append(run(sb, [], env_path))
        banner("4/4 python backup.py --status")
        run(sb, ["--status"], env_path)
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
