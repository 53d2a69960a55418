"""The in-process snapshot engine builds the same tree as ``rsync -a --link-dest``, links the same files."""

import hashlib
import os
import subprocess
import sys
import time

import contentstore
import linktree
import linktree_workers
import pytest

ODD_NAMES = [b"with space.bin", b"new\nline.bin", b"-leading-dash.bin", b"caf\xe9-latin1.bin", b"\xff\xfe.bin",
             b"--delete", b"*glob?.bin"]


def write(path, data, mode=0o644, mtime=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def build_source(root):
    root = os.fsencode(root)
    t = 1_600_000_000
    for i in range(30):
        write(os.path.join(root, b"2024/3/%d/10/%d" % (i % 5 + 1, i), b"%032x.bin" % i), os.urandom(100 + i * 37),
              mtime=t + i)
    for i, name in enumerate(ODD_NAMES):
        write(os.path.join(root, b"odd", name), b"odd %d" % i, mode=0o600, mtime=t)
    write(os.path.join(root, b"modes/exec.bin"), b"x", mode=0o755, mtime=t)
    write(os.path.join(root, b"modes/private.bin"), b"y", mode=0o600, mtime=t)
    os.chmod(os.path.join(root, b"modes"), 0o750)
    os.symlink(b"../2024", os.path.join(root, b"odd", b"relative-link"))
    os.symlink(b"/nonexistent/target", os.path.join(root, b"odd", b"dangling-link"))
    os.makedirs(os.path.join(root, b"empty/dir"))
    write(os.path.join(root, b"gone/soon.bin"), b"delete me", mtime=t)
    write(os.path.join(root, b"becomes-dir"), b"file first", mtime=t)
    if os.geteuid() == 0:
        os.chown(os.path.join(root, b"modes/private.bin"), 12345, 12345)


def change_source(root):
    root = os.fsencode(root)
    t = 1_700_000_000
    write(os.path.join(root, b"2025/1/2/3/4/new.bin"), os.urandom(5000), mtime=t)  # added
    write(os.path.join(root, b"2024/3/1/10/0/00000000000000000000000000000000.bin"), b"grown" * 100, mtime=t)
    os.remove(os.path.join(root, b"2024/3/2/10/1/00000000000000000000000000000001.bin"))  # deleted
    os.remove(os.path.join(root, b"gone/soon.bin"))
    os.rmdir(os.path.join(root, b"gone"))
    os.remove(os.path.join(root, b"becomes-dir"))
    write(os.path.join(root, b"becomes-dir/inside.bin"), b"now a dir", mtime=t)
    os.chmod(os.path.join(root, b"modes/exec.bin"), 0o700)  # same data, new mode: must not share the inode
    write(os.path.join(root, b"odd", b"new\nline.bin"), b"same size", mtime=t)  # in-place change, new mtime


def describe(root, dir_times=True):
    """{relpath: (type, mode, uid, size, mtime_ns, sha256-or-link-target)} of a whole tree."""
    root = os.fsencode(root)
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                result[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                result[rel] = ("dir", st.st_mode, st.st_uid, st.st_mtime_ns if dir_times else None)
            else:
                with open(path, "rb") as handle:
                    digest = hashlib.sha256(handle.read()).hexdigest()
                result[rel] = ("file", st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, digest)
    return result


def linked_to(prev, tree):
    prev, tree = os.fsencode(prev), os.fsencode(tree)
    shared = set()
    for rel, desc in describe(tree).items():
        if desc[0] == "file":
            other = os.path.join(prev, rel)
            if os.path.exists(other) and os.stat(other).st_ino == os.stat(os.path.join(tree, rel)).st_ino:
                shared.add(rel)
    return shared


def rsync(src, dst, link_dest=None):
    argv = ["rsync", "-a", "--delete"] + (["--link-dest=%s" % link_dest] if link_dest else []) + [
        src + "/", dst + "/"]
    subprocess.run(argv, check=True)


def trust_point(compare):
    """``trust_before_ns`` for a previous snapshot starting now: None ("every file") or what the nightly run
    passes ("as configured": its start minus contentstore.TRUST_MARGIN_S)."""
    if compare == "every file":
        return None
    return time.time_ns() - contentstore.TRUST_MARGIN_S * 10 ** 9


@pytest.mark.parametrize("compare", ["every file", "as configured"])
@pytest.mark.parametrize("workers", [1, 4, None])
def test_same_tree_and_same_links_as_rsync(tmp_path, workers, compare):
    src, prev = str(tmp_path / "src"), str(tmp_path / "prev")
    build_source(src)
    os.mkdir(prev)
    trust = trust_point(compare)
    rsync(src, prev)
    change_source(src)
    by_rsync, by_us = str(tmp_path / "rsync"), str(tmp_path / "ours")
    os.mkdir(by_rsync)
    os.mkdir(by_us)
    rsync(src, by_rsync, link_dest=prev)
    stats = linktree.snapshot(src, by_us, prev, workers=workers, trust_before_ns=trust)
    assert describe(by_us) == describe(src)
    # rsync with --link-dest leaves directory mtimes at "now" (seen with rsync 3.2); we keep the source's.
    assert describe(by_us, dir_times=False) == describe(by_rsync, dir_times=False)
    ours, theirs = linked_to(prev, by_us), linked_to(prev, by_rsync)
    assert ours == theirs
    assert b"modes/exec.bin" not in ours and b"2025/1/2/3/4/new.bin" not in ours
    assert b"2024/3/3/10/2/00000000000000000000000000000002.bin" in ours
    assert stats.copied == 5 and stats.linked == len(ours)
    assert os.lstat(os.path.join(by_us, "odd")).st_mtime_ns == os.lstat(os.path.join(src, "odd")).st_mtime_ns


@pytest.mark.parametrize("compare", ["every file", "as configured"])
def test_resume_keeps_what_the_interrupted_run_copied(tmp_path, compare):
    src, prev, dest = str(tmp_path / "src"), str(tmp_path / "prev"), str(tmp_path / "dest")
    build_source(src)
    os.mkdir(prev)
    trust = trust_point(compare)
    rsync(src, prev)
    change_source(src)
    os.mkdir(dest)
    linktree.snapshot(src, dest, prev, trust_before_ns=trust)
    new_file = os.path.join(dest, "2025/1/2/3/4/new.bin")
    inode_before = os.stat(new_file).st_ino
    write(os.path.join(dest, "stray-from-old-source.bin"), b"not in the source any more")
    stats = linktree.snapshot(src, dest, prev, resume=True, trust_before_ns=trust)
    assert os.stat(new_file).st_ino == inode_before  # kept, not copied again
    assert stats.bytes_copied == 0
    assert describe(dest) == describe(src)


def test_vanished_directory_is_a_warning_not_a_failure(tmp_path):
    src, dest = str(tmp_path / "src"), str(tmp_path / "dest")
    build_source(src)
    os.mkdir(dest)
    stats = linktree.snapshot(src, dest, None)
    assert stats.copied > 30 and stats.linked == 0 and stats.vanished == 0


def test_unreadable_file_fails_naming_it(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    src, dest = str(tmp_path / "src"), str(tmp_path / "dest")
    build_source(src)
    secret = os.path.join(src, "2024", "unreadable.bin")
    write(secret, b"x", mode=0o000)
    os.mkdir(dest)
    with pytest.raises(linktree.LinkTreeError, match="unreadable.bin"):
        linktree.snapshot(src, dest, None)


def test_a_sleeping_process_is_not_waiting_for_the_disk_and_a_reaped_one_is_skipped():
    sleeper = subprocess.Popen(["sleep", "30"])
    done = subprocess.Popen(["true"])
    done.wait()
    try:
        assert linktree_workers.waiting_for_disk([sleeper.pid, done.pid]) == 0
    finally:
        sleeper.kill()
        sleeper.wait()


def _slow_tree(root, dirs=40):
    for i in range(dirs):
        write(os.path.join(root, "2024/%d/%d/x.bin" % (i % 4 + 1, i)), b"x", mtime=1_600_000_000)


@pytest.mark.parametrize("in_d, expected", [(0, None), (1, linktree_workers.ADAPT_LIMIT)])
def test_workers_are_added_only_while_they_wait_for_the_disk(tmp_path, monkeypatch, in_d, expected):
    """Worker processes waiting for the disk (state D) earn more workers, up to the limit; busy ones (a warm
    cache) do not: the count stays at one per core. The walk is slowed so that it spans several windows."""
    src, dest = str(tmp_path / "src"), str(tmp_path / "dest")
    _slow_tree(src)
    os.mkdir(dest)
    real_process = linktree._process

    def slow_process(*args):
        time.sleep(0.05)
        return real_process(*args)

    monkeypatch.setattr(linktree, "_process", slow_process)
    monkeypatch.setattr(linktree_workers, "waiting_for_disk", lambda pids: in_d * len(pids))
    monkeypatch.setattr(linktree_workers, "ADAPT_WINDOW_S", 0.05)
    stats = linktree.snapshot(src, dest)
    assert stats.workers == (expected or min(os.cpu_count() or 1, 4))
    assert stats.files == 40


def test_a_worker_holds_no_descriptor_of_its_parent_but_its_own_pipes():
    """Another thread of the parent may be between creating a pipe or a socket and closing its copy when a
    worker is forked: a worker holding the write end would keep the reader from its end of file, one holding a
    socket bound to a free port would keep that port taken (the drill's server then cannot listen)."""
    import socket

    read_end, write_end = os.pipe()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    try:
        def describe(seen, _item):
            for name in os.listdir("/proc/self/fd"):
                try:
                    seen.add(os.readlink("/proc/self/fd/" + name))
                except OSError:
                    pass  # the listing's own descriptor

        parts, _count = linktree_workers.walk([1, 2, 3], 2, set, describe, sorted)
        mine = {os.readlink("/proc/self/fd/%d" % fd) for fd in (read_end, write_end, listener.fileno())}
        for held in parts:
            assert not mine & set(held), held
    finally:
        os.close(read_end)
        os.close(write_end)
        listener.close()


def test_once_stop_says_so_no_further_item_is_handed_out():
    asked = []

    def stop():
        asked.append(1)
        return len(asked) > 3

    parts, _count = linktree_workers.walk(list(range(50)), 2, list, lambda done, item: done.append(item), sorted,
                                          stop=stop)
    walked = sorted(item for part in parts for item in part)
    assert walked == list(range(len(walked))) and 0 < len(walked) <= 3


def _failing_in_workers(monkeypatch, fail):
    """Make ``fail(item)`` run for every directory a worker process walks (not in the parent)."""
    real_process = linktree._process

    def process(job, stats, item, dir_attrs):
        if linktree_workers._parent_pid is not None:
            fail(item)
        return real_process(job, stats, item, dir_attrs)

    monkeypatch.setattr(linktree, "_process", process)


def test_an_error_in_a_worker_process_fails_the_snapshot_naming_the_path(tmp_path, monkeypatch):
    import errno

    src, dest = str(tmp_path / "src"), str(tmp_path / "dest")
    _slow_tree(src)
    os.mkdir(dest)

    def fail(item):
        raise OSError(errno.EIO, "Input/output error", item[0])

    _failing_in_workers(monkeypatch, fail)
    with pytest.raises(linktree.LinkTreeError, match=r"src/2024/\d+/\d+: Input/output error"):
        linktree.snapshot(src, dest, workers=2)


def test_a_killed_worker_process_fails_the_snapshot_and_leaves_no_process(tmp_path, monkeypatch):
    import signal

    src, dest = str(tmp_path / "src"), str(tmp_path / "dest")
    _slow_tree(src)
    os.mkdir(dest)
    _failing_in_workers(monkeypatch, lambda item: os.kill(os.getpid(), signal.SIGKILL))
    before = _children()
    with pytest.raises(linktree.LinkTreeError, match="ended without its result"):
        linktree.snapshot(src, dest, workers=2)
    assert _children() == before  # every worker killed and reaped: no zombie, no orphan left writing


def _children():
    """The pids of this process's children (zombies included), from /proc."""
    return {pid for pid in _pids() if _ppid(pid) == os.getpid()}


ORPHAN_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[1])
import linktree
real = linktree._process
def slow(*args):
    time.sleep(0.05)
    return real(*args)
linktree._process = slow
linktree.snapshot(sys.argv[2], sys.argv[3], workers=2)
"""


def _alive(pid):
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_workers_stop_when_the_backup_run_is_killed(tmp_path):
    """kill -9 of the run (a timeout, an admin): its worker processes must not go on writing into the partial
    copy, which the next run resumes."""
    src, dest = str(tmp_path / "src"), str(tmp_path / "dest")
    _slow_tree(src, dirs=400)
    os.mkdir(dest)
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT, project, src, dest])
    try:
        deadline = time.monotonic() + 20
        workers = set()
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            workers = {pid for pid in _pids() if _ppid(pid) == run.pid}
        assert len(workers) == 2, "the run did not start its 2 workers"
    finally:
        run.kill()
        run.wait()
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers)


def _pids():
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _ppid(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError):
        return None


def test_file_sizes_lists_every_regular_file_as_os_walk_does_and_nothing_else(tmp_path):
    expected = {}
    for rel, size in (("top.bin", 1), ("2024/odd name\u00e9.bin", 2), ("2024/5/m.bin", 3),
                      ("2024/5/17/10/31/" + "a" * 36 + ".bin", 4), ("2023/12/31/23/59/z.bin", 0)):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
        expected[rel] = size
    for depth in range(8):  # more subtrees below the top two levels than workers
        deep = tmp_path / "2022" / "1" / str(depth) / "0"
        deep.mkdir(parents=True)
        (deep / "d.bin").write_bytes(b"yy")
        expected["2022/1/%d/0/d.bin" % depth] = 2
    os.symlink(str(tmp_path / "top.bin"), str(tmp_path / "2024" / "5" / "link.bin"))
    os.symlink(str(tmp_path / "2024"), str(tmp_path / "2023" / "12" / "dirlink"))
    os.mkfifo(str(tmp_path / "2024" / "5" / "17" / "fifo"))
    walked = {}
    for dirpath, _dirs, names in os.walk(str(tmp_path)):
        for name in names:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                walked[os.path.relpath(full, str(tmp_path))] = os.path.getsize(full)
    assert walked == expected
    assert linktree_workers.file_sizes(str(tmp_path)) == expected
    assert linktree_workers.file_sizes(str(tmp_path), nice=True) == expected
    seen = {"kept": 1}
    assert linktree_workers.file_sizes(str(tmp_path), into=seen) is seen and seen == dict(expected, kept=1)


def test_file_sizes_leaves_out_what_disappears_and_stops_when_told(tmp_path, monkeypatch):
    for rel in ("2024/1/1/a.bin", "2024/1/2/b.bin", "2024/2/1/c.bin"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"abc")
    real_scandir = os.scandir

    def vanishing(path):  # a retention run removes a night's directory while it is listed
        if str(path).endswith(os.path.join("2024", "1", "2")):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_scandir(path)

    monkeypatch.setattr(linktree_workers.os, "scandir", vanishing)
    assert linktree_workers.file_sizes(str(tmp_path)) == {"2024/1/1/a.bin": 3, "2024/2/1/c.bin": 3}
    assert linktree_workers.file_sizes(str(tmp_path), stop=lambda: True) == {}
