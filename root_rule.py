"""Who may run the suite's entry points: refuse root before any file the service user controls is read.

backup.py and restore.py call :func:`root_refusal` first thing; setup.py has its own, narrower rules
(setup_sys). See README.md, "Security: who may run what".
"""

import os
import pwd
import shlex
import sys


def root_refusal(env_path, argv):
    """The message for a run as root (None when not root), naming the ``sudo -u`` command to use instead.

    backup.py and restore.py run only as the service user: its ``.env``, venv, ``PG_BIN_DIR`` and
    everything under ``BACKUP_DIR`` can be changed by that user, so a root run would read and execute what
    the service user controls. Called before any file is read: the user is guessed from the owner of the
    ``.env`` (or its directory) without following a symlink."""
    if os.geteuid() != 0:
        return None
    user = None
    for path in (env_path, os.path.dirname(env_path)):
        try:
            uid = os.lstat(path).st_uid
        except OSError:
            continue
        if uid != 0:
            try:
                user = pwd.getpwuid(uid).pw_name
            except KeyError:
                user = "#%d" % uid
            break
    command = " ".join(shlex.quote(a) for a in [sys.executable, os.path.abspath(argv[0])] + list(argv[1:]))
    return ("refusing to run as root: %s runs as the Alfresco service user (the one that owns the .env, "
            "BACKUP_DIR and the data directory), since everything it reads and runs belongs to that user. Run:\n"
            "  sudo -u %s %s" % (os.path.basename(argv[0]), user or "<service user>", command))
