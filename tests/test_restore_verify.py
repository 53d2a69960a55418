"""restore_verify.warm_cache: the sizes it records for the content check are those a stat would give."""

import os
import threading

import restore_verify


def test_warm_cache_records_the_size_of_every_regular_file_and_nothing_else(tmp_path):
    store = tmp_path / "contentstore"
    files = {"2024/3/7/14/5/a.bin": 5, "2024/3/7/14/5/b.bin": 0, "2025/1/1/0/0/c d.bin": 70000, "top.bin": 3}
    for rel, size in files.items():
        (store / rel).parent.mkdir(parents=True, exist_ok=True)
        (store / rel).write_bytes(b"x" * size)
    os.symlink("2024/3/7/14/5/a.bin", str(store / "link.bin"))
    (store / "empty-dir").mkdir()
    seen = {}
    restore_verify.warm_cache(str(store) + "/", threading.Event(), seen)
    assert seen == files
    for rel, size in seen.items():
        assert os.stat(os.path.join(str(store), rel)).st_size == size


def test_warm_cache_stops_when_asked_and_what_it_saw_is_still_right(tmp_path):
    store = tmp_path / "contentstore"
    for n in range(50):
        (store / str(n)).mkdir(parents=True)
        (store / str(n) / "f.bin").write_bytes(b"y" * n)
    stop, seen = threading.Event(), {}
    stop.set()
    restore_verify.warm_cache(str(store), stop, seen)
    assert seen == {}
    restore_verify.warm_cache(str(store), threading.Event(), seen)
    assert seen == {"%d/f.bin" % n: n for n in range(50)}
