"""Forked worker processes for :mod:`linktree`: subtrees handed out one at a time, results sent back.

Processes, not threads: the snapshot's per-file work is Python's, and threads of one interpreter barely add
to each other on 2 cores while processes nearly double (bench/RESULTS.md, machine E: linktree's threads
0.79-0.87x of one ``cp -al``, linktree in 2 processes 0.56x). A cold cache also wants more requests in
flight than there are cores; a warm one does not (more workers only contend for the kernel's locks), so the
count is measured while the walk runs (:func:`walk`).

Each worker talks to the parent over two pipes of its own: it asks for the next item (b"N"), gets its index
(-1: no more), and at the end sends what ``finish`` returned (b"R") or what it raised (b"E"), pickled. A
worker whose parent dies stops at its next request (end of file), or sooner where ``walk_item`` asks
:func:`orphaned` (linktree does at every directory).
"""

import collections
import os
import pickle
import selectors
import signal
import stat
import struct
import time
import warnings

ADAPT_WINDOW_S = 0.25
ADAPT_SAMPLE_S = 0.01
ADAPT_DISK_WAIT = 0.1  # workers in state D, on average over a window, that earn one more worker
ADAPT_LIMIT = max(2, min(16, 2 * (os.cpu_count() or 1)))

_parent_pid = None  # set in a worker: the process that forked it


class WorkerError(Exception):
    """A worker process ended without its result (killed, out of memory)."""


def orphaned():
    """True in a worker whose parent has died (the run was killed): it must stop writing at once."""
    return _parent_pid is not None and os.getppid() != _parent_pid


def waiting_for_disk(pids):
    """How many of the processes ``pids`` are in uninterruptible sleep (state D: waiting for the disk) right
    now, read from /proc; None where that cannot be read (not Linux)."""
    waiting = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            if not os.path.isdir("/proc/self"):
                return None
            continue  # ended and reaped meanwhile
        waiting += state == b"D"
    return waiting


def _read_exact(fd, size):
    """``size`` bytes from ``fd``, fewer only at end of file."""
    chunks = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _send(fd, kind, payload=b""):
    data = kind + struct.pack("<I", len(payload)) + payload
    while data:
        data = data[os.write(fd, data):]


def _receive(fd):
    """One message of :func:`_send` as (kind, payload); (b"", b"") at end of file (the sender ended)."""
    header = _read_exact(fd, 5)
    if len(header) < 5:
        return b"", b""
    return header[:1], _read_exact(fd, struct.unpack("<I", header[1:])[0])


def _pickled_error(exc):
    """``exc`` pickled, or a WorkerError with its text where it does not survive a pickle round trip."""
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(WorkerError("%s: %s" % (type(exc).__name__, exc)))


def _worker_body(items, down, up, new_state, walk_item, finish):
    """A worker: walks the items the parent hands out into one ``new_state()``, then sends ``finish(state)``.
    Returns the exit code."""
    try:
        state = new_state()
        while True:
            _send(up, b"N")
            answer = _read_exact(down, 4)
            if len(answer) < 4:
                return 1  # end of file: the parent is gone
            index = struct.unpack("<i", answer)[0]
            if index < 0:
                break
            walk_item(state, items[index])
        _send(up, b"R", pickle.dumps(finish(state)))
    except BaseException as exc:  # noqa: B036  (carried to the parent, which raises it)
        _send(up, b"E", _pickled_error(exc))
    return 0


def _close_inherited(keep):
    """In a worker just forked: close every file descriptor but ``keep``. The parent's other threads may have
    been between creating a descriptor and closing their end of it (a subprocess's pipe, a socket bound to
    find a free port): a copy held here would keep that pipe from reaching end of file, or that port taken,
    for as long as the worker walks. An earlier worker's pipes too, which would never see end of file."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:  # no /proc: the descriptors a process of this suite can have open
        names = [str(fd) for fd in range(3, 1024)]
    for fd in sorted(int(name) for name in names):
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, already closed


class _Worker:
    def __init__(self, pid, up, down):
        self.pid, self.up, self.down, self.done = pid, up, down, False


def _start(body):
    """Fork one worker that runs ``body(down_fd, up_fd)``; returns its :class:`_Worker` (the parent's ends
    of its two pipes)."""
    global _parent_pid
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    parent_pid = os.getpid()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads (a log pump, a resolver): the worker
        # only makes system calls and pickles; it takes no lock such a thread could hold.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _parent_pid = parent_pid
            _close_inherited((0, 1, 2, down_r, up_w))
            code = body(down_r, up_w)
        finally:
            os._exit(code)  # never return into the parent's code, nor run its atexit handlers
    os.close(up_w)
    os.close(down_r)
    return _Worker(pid, up_r, down_w)


def _end(workers):
    """Close the pipes and reap every worker (killing those still running: the parent is failing); returns
    how the first that sent its result yet ended badly ended, or None."""
    failed = None
    for worker in workers:
        os.close(worker.down)
        os.close(worker.up)
        if not worker.done:
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        status = os.waitpid(worker.pid, 0)[1]
        if worker.done and status and failed is None:
            failed = ("killed by signal %d" % os.WTERMSIG(status) if os.WIFSIGNALED(status)
                      else "exit code %d" % os.WEXITSTATUS(status))
    return failed


def walk(items, count, new_state, walk_item, finish, stop=None):
    """Run ``walk_item(state, item)`` for every item of ``items`` (in order, as workers ask) in forked
    worker processes, each with its own ``state = new_state()``, and return ([finish(state) of each
    worker], workers used). ``count``: that many workers; None: as many as measurably help: one per CPU core
    to begin with, then, after each ADAPT_WINDOW_S window in which on average ADAPT_DISK_WAIT workers or more
    were waiting for the disk (state D, sampled every ADAPT_SAMPLE_S), one more, up to ADAPT_LIMIT (a cold
    cache has 0.3-0.4 of 2 workers in D, a warm one ~0.01). ``stop``: a function; once it returns true, no
    further item is handed out (each worker finishes the one it walks). Raises what a worker raised (an OSError
    keeps its errno and file name), or WorkerError for a worker that ended without its result."""
    pending = collections.deque(range(len(items)))
    workers, results, errors = [], [], []
    selector = selectors.DefaultSelector()

    def body(down, up):
        return _worker_body(items, down, up, new_state, walk_item, finish)

    def add():
        workers.append(_start(body))
        selector.register(workers[-1].up, selectors.EVENT_READ, workers[-1])

    try:
        for _ in range(min(len(items), count or max(1, os.cpu_count() or 1))):
            add()
        adapting = count is None
        waited = samples = 0
        window_ends = time.monotonic() + ADAPT_WINDOW_S
        while not all(worker.done for worker in workers):
            for key, _events in selector.select(ADAPT_SAMPLE_S if adapting else None):
                worker = key.data
                kind, payload = _receive(worker.up)
                if kind == b"N":
                    index = pending.popleft() if pending and not errors and not (stop and stop()) else -1
                    try:
                        os.write(worker.down, struct.pack("<i", index))
                    except BrokenPipeError:
                        pass  # it died: its end of file comes next
                    continue
                if kind == b"R":
                    results.append(pickle.loads(payload))
                elif kind == b"E":
                    errors.append(pickle.loads(payload))
                else:
                    errors.append(WorkerError("a worker process (pid %d) ended without its result" % worker.pid))
                selector.unregister(worker.up)
                worker.done = True
            if not adapting:
                continue
            in_d = waiting_for_disk([worker.pid for worker in workers if not worker.done])
            if in_d is None:  # cannot tell: stay at one per core
                adapting = False
                continue
            waited, samples = waited + in_d, samples + 1
            if time.monotonic() >= window_ends:
                if waited < ADAPT_DISK_WAIT * samples or not pending or errors or len(workers) >= ADAPT_LIMIT:
                    adapting = False  # settled
                    continue
                add()
                waited = samples = 0
                window_ends = time.monotonic() + ADAPT_WINDOW_S
    finally:
        selector.close()
        failed = _end(workers)
    if errors:
        raise errors[0]
    if failed:
        raise WorkerError("a worker process ended badly after its result (%s)" % failed)
    return results, len(workers)


def file_sizes(root, stop=None, nice=False, into=None):
    """{path relative to ``root``: size} of every regular file under ``root`` (no symlink followed). The top
    two levels (a contentstore's years and months) are read here, every subtree below them by a worker
    process of :func:`walk`: a cold walk waits for the disk at every directory, and several in flight finish
    it in about half the time of one (60,000 files: 1.7 s alone, 0.7 s in 4 processes). A file or directory
    that disappears meanwhile is left out. ``stop``: see :func:`walk`. ``nice``: the workers run at the lowest
    CPU priority (beside a critical path). ``into``: a dict to fill instead of a new one (it keeps what was
    found when this raises). Raises OSError (an unreadable directory) or WorkerError."""
    prefix = os.path.join(root, "")
    found = {} if into is None else into
    subtrees = [root]
    for _level in range(2):
        subtrees = [child for top in subtrees if not (stop and stop()) for child in scan_dir(top, prefix, found)]
    if subtrees:
        new_part = _new_niced_part if nice else dict
        for part in walk(subtrees, None, new_part, lambda part, top: _scan_tree(top, prefix, part),
                         lambda part: part, stop=stop)[0]:
            found.update(part)
    return found


def _new_niced_part():
    """A worker's own dict, at the lowest CPU priority: beside the drill's extraction, its critical path
    (measured: 2.0-2.5 s of extraction beside workers at normal priority, 1.6-1.7 s beside niced ones, on 2
    cores)."""
    os.nice(19)
    return {}


def scan_dir(path, prefix, found):
    """Record the regular files of directory ``path`` in ``found``; returns its subdirectories."""
    subdirs = []
    try:
        listing = os.scandir(path)
    except FileNotFoundError:
        return subdirs
    with listing:
        for entry in listing:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.path)
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode):
                found[entry.path[len(prefix):]] = info.st_size
    return subdirs


def _scan_tree(top, prefix, found):
    stack = [top]
    while stack:
        stack.extend(scan_dir(stack.pop(), prefix, found))
