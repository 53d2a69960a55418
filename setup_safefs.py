"""Files the set-up wizard reads or writes that another user can change: the service user's (the old .env,
BACKUP_DIR, setup-backups/), PostgreSQL's (postgresql.conf, postgresql.auto.conf, pg_hba.conf,
postmaster.pid) and Alfresco's (catalina.pid, alfresco-global.properties). The wizard may run as root.

Rules:
- Read: never through a symbolic link (O_NOFOLLOW), never a FIFO or a device (O_NONBLOCK, then a regular
  file is required), and the owner is checked on the open descriptor against who may own the file. A
  root-owned file counts only where nobody but root can change its path (setup_sys.root_safe_path): a link
  planted by the service user or PostgreSQL's user never hands /etc/shadow to setup-backups/ or a .bak.
- Rewrite in place (PostgreSQL's files): only through such a descriptor of the file's rightful owner, never
  root's.
- Files for the service user: a new file (O_EXCL) beside the name, mode and owner set on its descriptor
  (fchmod/fchown), fsynced, then renamed over the name (a planted link is replaced, never written through).
- Directories: opened O_DIRECTORY|O_NOFOLLOW, the owner checked, fchmod/fchown on the descriptor; a
  symbolic link is refused (a BACKUP_DIR/logs link to a root directory never makes that one 0700).
Parent directories are opened by path, so another user may swap one for a link. That is harmless because
what is checked is the descriptor finally opened: its owner must be the user who may own it (and a directory
we create in must be that user's, or root's on a root-safe path), so a swap only ever leads to files that
user could change anyway. Standard library only.
"""

import errno
import os
import stat

import setup_sys
from setup_sys import SetupError

MAX_TEXT = 16 << 20  # configuration files; a larger one is not what it claims to be
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
ANY_OWNER = "any"


class UnsafeFile(SetupError):
    """A file or directory is a symbolic link, not a regular file/directory, or belongs to the wrong user."""


def _who(uid):
    try:
        return "%s (uid %d)" % (setup_sys.User.by_uid(uid).name, uid)
    except KeyError:
        return "uid %d" % uid


def _acceptable(info, path, owners, root_ok):
    """None when ``info`` (fstat of ``path``) has an owner in ``owners`` (None: anyone but root), or is root's
    on a root-safe path and ``root_ok``, or ``owners`` is ANY_OWNER; else what is wrong."""
    if owners == ANY_OWNER:
        return None
    if owners is None and info.st_uid != 0 or owners is not None and info.st_uid in owners:
        return None
    if info.st_uid == 0 and root_ok and setup_sys.root_safe_path(path):
        return None
    wanted = "a user other than root" if owners is None else " or ".join(_who(u) for u in sorted(owners)) or "?"
    return "belongs to %s, not to %s" % (_who(info.st_uid), wanted)


def open_checked(path, owners, flags=os.O_RDONLY, root_ok=True):
    """A descriptor of the regular file ``path`` (``flags``: O_RDONLY or O_WRONLY; never created or truncated
    here), owned by a uid in ``owners`` (None: anyone but root; a root-owned file only with ``root_ok`` on a
    root-safe path). Raises FileNotFoundError when it is missing, UnsafeFile or SetupError otherwise."""
    try:
        fd = os.open(path, (_READ & ~os.O_RDONLY) | flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile("%s is a symbolic link: setup.py does not follow it (neither PostgreSQL, Alfresco nor "
                             "this program makes one there); remove it, or put the real file in its place" % path)
        raise SetupError("cannot open %s: %s" % (path, exc.strerror))
    # The descriptor is what is checked, not the path: a parent swapped for a link since can only have led to a
    # file of an owner allowed here.
    info = os.fstat(fd)
    problem = "is not a regular file" if not stat.S_ISREG(info.st_mode) else _acceptable(info, path, owners, root_ok)
    if problem:
        os.close(fd)
        raise UnsafeFile("%s %s: setup.py does not use it; fix its owner, or remove it" % (path, problem))
    return fd


def read_checked(path, owners, root_ok=True):
    """The text of ``path`` (see open_checked), or None when it does not exist. Raises UnsafeFile/SetupError."""
    text, _uid = _read(path, owners, root_ok)
    return text


def _read(path, owners, root_ok):
    try:
        fd = open_checked(path, owners, root_ok=root_ok)
    except FileNotFoundError:
        return None, None
    with os.fdopen(fd, "rb") as handle:
        uid = os.fstat(handle.fileno()).st_uid
        try:
            data = handle.read(MAX_TEXT + 1)
        except OSError as exc:
            raise SetupError("cannot read %s: %s" % (path, exc.strerror))
    if len(data) > MAX_TEXT:
        raise UnsafeFile("%s is larger than %d MB: not a configuration file" % (path, MAX_TEXT >> 20))
    return data.decode("utf-8", "surrogateescape"), uid


def read_env(path):
    """(text, owner uid) of the existing .env at ``path``, or (None, None): not a link, a regular file of a
    user other than root (or root's on a root-safe path). The caller checks the owner is the service user
    before anything is written (who that is is only known later). Raises AnswerError."""
    try:
        return _read(path, None, True)
    except SetupError as exc:
        raise setup_sys.AnswerError(str(exc))


def read_text(path):
    """The text of ``path`` (never through a symbolic link, a regular file of any owner), or None when it does
    not exist: for files no other user can change; read_checked for the others. Raises SetupError."""
    text, _uid = _read(path, ANY_OWNER, True)
    return text


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def rewrite_in_place(path, text, owner_uid=None):
    """Replace the content of the existing regular file ``path`` keeping its inode, owner and mode
    (PostgreSQL's own files: no temporary file ever appears in the data directory), through an O_NOFOLLOW
    descriptor whose owner must be ``owner_uid`` (None: the owner of the directory holding it), never root.
    A hard link of another file of that owner changes only what that owner could change. Raises SetupError."""
    if owner_uid is None:
        owner_uid = os.stat(os.path.dirname(os.path.abspath(path))).st_uid
    if owner_uid == 0:
        raise UnsafeFile("refusing to rewrite %s: PostgreSQL's files are never root's" % path)
    fd = open_checked(path, {owner_uid}, os.O_WRONLY, root_ok=False)
    try:
        data = text.encode("utf-8", "surrogateescape")
        _write_all(fd, data)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    except OSError as exc:
        raise SetupError("cannot write %s: %s" % (path, exc.strerror))
    finally:
        os.close(fd)


def _parent_fd(path, owner):
    """A descriptor of the directory holding ``path``; as root it must be ``owner``'s or root's on a root-safe
    path (a directory another user can change could be a swapped link to anywhere)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd = os.open(directory, _DIR)
    except OSError as exc:
        raise SetupError("cannot open the directory %s: %s" % (directory, exc.strerror))
    if setup_sys.i_am_root():
        problem = _acceptable(os.fstat(fd), directory, {owner.uid} if owner is not None else set(), True)
        if problem:
            os.close(fd)
            raise UnsafeFile("%s %s: setup.py does not create files in it as root" % (directory, problem))
    return fd


def write_private(path, text, owner, mode=0o600):
    """Write ``text`` to ``path`` atomically (a new file beside it, fsync, rename over the name, fsync of the
    directory), mode ``mode``, owned by ``owner`` (when root), both set on the descriptor. Raises SetupError."""
    name = os.path.basename(path)
    dfd = _parent_fd(path, owner)
    tmp = None
    try:
        for _attempt in range(20):
            candidate = ".%s.%s" % (name, os.urandom(6).hex())
            try:
                fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=dfd)
            except FileExistsError:
                continue
            tmp = candidate
            break
        else:
            raise SetupError("cannot create a temporary file beside %s" % path)
        try:
            _write_all(fd, text.encode("utf-8", "surrogateescape"))
            os.fsync(fd)
            os.fchmod(fd, mode)
            if setup_sys.i_am_root() and owner is not None:
                os.fchown(fd, owner.uid, owner.gid)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        tmp = None
        os.fsync(dfd)
    except OSError as exc:
        raise SetupError("cannot write %s: %s" % (path, exc.strerror))
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
        os.close(dfd)


def fix_file(path, owner, mode=0o600):
    """Give the existing regular file ``path`` mode ``mode`` and (as root) the owner ``owner``, through an
    O_NOFOLLOW descriptor of a file of ``owner`` (or of root on a root-safe path). Raises SetupError."""
    fd = open_checked(path, {owner.uid}, root_ok=True)
    try:
        os.fchmod(fd, mode)
        if setup_sys.i_am_root():
            os.fchown(fd, owner.uid, owner.gid)
    except OSError as exc:
        raise SetupError("cannot set the mode/owner of %s: %s" % (path, exc.strerror))
    finally:
        os.close(fd)


def ensure_dir(path, owner, mode=0o700, group_gid=None, adopt_root=False):
    """Create the directory ``path`` (missing parents too: ``owner``'s, 0700) or fix the existing one: mode
    ``mode``, owner ``owner`` (as root), group ``group_gid`` (None: the owner's for a new directory, kept for
    an existing one). Never through a symbolic link; an existing directory must be ``owner``'s already, or
    (``adopt_root``, as root) an empty root-owned one on a root-safe path (a BACKUP_DIR the admin made).
    Returns True when it was created. Raises UnsafeFile/SetupError."""
    path = os.path.abspath(path)
    if not os.path.lexists(os.path.dirname(path)):
        ensure_dir(os.path.dirname(path), owner)
    pfd = _parent_fd(path, owner)
    name = os.path.basename(path)
    try:
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
            created = True
        except FileExistsError:
            created = False
        try:
            fd = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=pfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeFile("%s is %s: setup.py changes only real directories; remove it, or give the real "
                                 "directory's path" % (path, "a symbolic link" if os.path.islink(path)
                                                       else "not a directory"))
            raise SetupError("cannot open %s: %s" % (path, exc.strerror))
    except OSError as exc:
        raise SetupError("cannot create %s: %s" % (path, exc.strerror))
    finally:
        os.close(pfd)
    try:
        _fix_dir(fd, path, owner, mode, group_gid, created, adopt_root)
    finally:
        os.close(fd)
    return created


def _fix_dir(fd, path, owner, mode, group_gid, created, adopt_root):
    info = os.fstat(fd)
    if not created and owner is not None and info.st_uid != owner.uid:
        adoptable = (adopt_root and setup_sys.i_am_root() and info.st_uid == 0 and not os.listdir(fd)
                     and setup_sys.root_safe_path(os.path.dirname(path)))
        if not adoptable:
            raise UnsafeFile("%s belongs to %s, not to %s: setup.py does not take it over; chown it yourself if it "
                             "is meant for the backups, or choose another directory" % (
                                 path, _who(info.st_uid), owner.name))
    try:
        if setup_sys.i_am_root() and owner is not None:
            gid = group_gid if group_gid is not None else (owner.gid if created else info.st_gid)
            os.fchown(fd, owner.uid, gid)
        elif group_gid is not None and info.st_gid != group_gid:
            os.fchown(fd, -1, group_gid)
        os.fchmod(fd, mode)
    except OSError as exc:
        raise SetupError("cannot set owner/mode of %s: %s" % (path, exc.strerror))


def make_private_dir(path, owner, mode=0o700, group_gid=None):
    """ensure_dir under its earlier name. Returns True when ``path`` was created."""
    return ensure_dir(path, owner, mode, group_gid)
