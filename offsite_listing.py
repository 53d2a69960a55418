"""The list of files of one contentstore snapshot, for its off-site manifest: walked, or derived from the
previous snapshot's list when the snapshot engine recorded which directories it changed.

Why derive: a first upload lists every night kept locally, and a cold walk reads every directory of the store
once per night (60,000 files in 15,000 directories: ~1.2 s a night on the bench machine), although a night
changes a few hundred of them. The linktree engine (hardlink mode, unchanged directories trusted) records in
the snapshot's metadata (``changed_dirs``) every directory it did not make an exact copy of the previous
snapshot's (:mod:`linktree`); every other directory holds the same names as there, its files the same inodes.
So the night's list is: the files found now in each changed directory, plus the previous list's files whose
directory is unchanged and still present (a directory is present when the nearest changed directory above it
still holds the subdirectory leading to it). The result is checked against the engine's own count and bytes
of regular files; any doubt (no record, another engine, a full-compare night, the previous list unknown, a
mismatch) means the walk.
"""

import itertools
import os

import linktree_workers

DERIVE_MAX_SHARE = 4  # derive when at most 1 in this many directories changed


def shippable_name(rel):
    """True for a path rclone's --files-from-raw and the record can carry: valid UTF-8, no newline or tab."""
    if any(c in rel for c in "\n\r\t"):
        return False
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _split(sizes):
    """([(relpath, size)] sorted, [(unshippable relpath, size)] sorted) of {relpath: size}."""
    files, skipped = [], []
    for rel, size in sorted(sizes.items()):
        (files if shippable_name(rel) else skipped).append((rel, size))
    return files, skipped


def walk_files(root):
    """([(relpath, size)] of the regular files under ``root``, sorted; the same of those with a name
    :func:`shippable_name` refuses). The subtrees are read by worker processes
    (:func:`linktree_workers.file_sizes`): a cold walk of the whole store (60,000 files, 5 nights: 12-13 s with
    one os.walk, 6.7 s so). Raises OSError or linktree_workers.WorkerError."""
    return _split(linktree_workers.file_sizes(root))


def derivable(info):
    """The name of the snapshot whose list this one's can be derived from (its metadata ``info``), or None."""
    if info.get("engine") != "linktree" or info.get("compare") != "changed directories":
        return None
    changed = info.get("changed_dirs")
    if not isinstance(changed, list) or not isinstance(info.get("regular_bytes"), int):
        return None
    # Changed directories are read one after the other, a walk reads several at once: deriving pays only
    # when most directories were unchanged (a night after the store's directories were all new: walk).
    if len(changed) * DERIVE_MAX_SHARE > (info.get("dirs_trusted") or 0) + (info.get("dirs_compared") or 0):
        return None
    return info.get("link_dest") or None


def derive_files(root, info, base_files, base_skipped):
    """The (files, skipped) of :func:`walk_files` for snapshot ``root`` with metadata ``info``, derived from
    the list of its link base (``info["link_dest"]``): ``base_files`` and ``base_skipped`` as walk_files
    gives them (``base_skipped`` None when unknown). None when the result does not match the engine's counts
    (then walk; e.g. a changed directory gone since). Raises OSError (a changed directory unreadable)."""
    changed = set(info["changed_dirs"])
    if "" not in changed:  # the engine always records the root: a record without it is not one of ours
        return None
    sizes, subdirs, prefix = {}, {}, os.path.join(root, "")
    for rel_dir in changed:
        # The walk's own reading of one directory: the same files left out (vanished, not regular).
        found = linktree_workers.scan_dir(os.path.join(root, rel_dir) if rel_dir else root, prefix, sizes)
        subdirs[rel_dir] = set(os.path.basename(path) for path in found)
    present = {}

    def is_present(rel_dir):
        chain = []
        while rel_dir not in present:
            parent, _slash, name = rel_dir.rpartition("/")
            if parent in changed:
                present[rel_dir] = name in subdirs[parent]
                break
            chain.append(rel_dir)
            rel_dir = parent
        for below in chain:
            present[below] = present[rel_dir]
        return present[rel_dir]

    for rel, size in itertools.chain(base_files, base_skipped or ()):
        rel_dir = rel.rpartition("/")[0]
        if rel_dir not in changed and is_present(rel_dir):
            sizes[rel] = size
    # Against the engine's own count: e.g. the base's unshippable names unknown, a record not matching.
    if len(sizes) != info.get("files") or sum(sizes.values()) != info["regular_bytes"]:
        return None
    return _split(sizes)
