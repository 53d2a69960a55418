"""A base backup's ``backup_manifest`` (PostgreSQL 13+): authenticated after each backup (base_backup, against
the sizes in base.tar) and checked while the backup is extracted by a restore.

pg_basebackup lists every file of the data directory in the manifest with its size and checksum; we ask
for SHA-256 (postgres.basebackup_plan). :func:`load` reads and authenticates the manifest; the restore
hashes each file as it writes it (tar_extract.extract with ``digest``) and :func:`problems` compares: the job
``pg_verifybackup`` does after the extraction, without reading the restored gigabytes a second time.
``pg_verifybackup --skip-checksums`` still runs afterwards for the rest of its checks (files present and
not extra, sizes, the system identifier). Manifests with CRC32C checksums (the PostgreSQL default, e.g.
backups made by hand) get no digest here and the full ``pg_verifybackup``.
"""

import collections
import hashlib
import json

# Manifest algorithm names -> hashlib names; CRC32C (and NONE) have no counterpart in the standard library.
HASHLIB_NAMES = {"SHA224": "sha224", "SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}
SHOW = 5

Manifest = collections.namedtuple("Manifest", "path files algorithm wal_range")
Manifest.__doc__ = ("``files``: {member name: (size, algorithm, checksum)}; ``algorithm``: the hashlib name "
                    "when every file has the same SHA checksum, else None; ``wal_range``: {'start_lsn', "
                    "'end_lsn', 'timeline'} of the first/last WAL range, or {} when it lists none.")


class ManifestError(Exception):
    """The manifest is damaged, or the restored files do not match it."""


def load(path):
    """Read and authenticate ``backup_manifest`` (its own SHA-256 over everything before
    ``Manifest-Checksum``). Returns a :class:`Manifest`. Raises ManifestError."""
    with open(path, "rb") as handle:
        raw = handle.read()
    marker = raw.rfind(b'"Manifest-Checksum"')
    try:
        if marker < 0:
            raise ValueError("no Manifest-Checksum")
        data = json.loads(raw.decode("utf-8"))
        expected = data["Manifest-Checksum"]
        entries = data.get("Files", [])
        ranges = data.get("WAL-Ranges") or []
        wal_range = {"start_lsn": ranges[0]["Start-LSN"], "end_lsn": ranges[-1]["End-LSN"],
                     "timeline": ranges[-1]["Timeline"]} if ranges else {}
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ManifestError("%s is damaged or truncated: %s" % (path, exc))
    if hashlib.sha256(raw[:marker]).hexdigest() != expected:
        raise ManifestError("%s: checksum mismatch, the manifest is damaged" % path)
    files, algorithms = {}, set()
    for entry in entries:
        name = entry.get("Path")
        if name is None and entry.get("Encoded-Path"):
            # Non-UTF-8 names are hex-encoded in the manifest; tarfile names them with surrogateescape.
            name = bytes.fromhex(entry["Encoded-Path"]).decode("utf-8", "surrogateescape")
        algorithm = entry.get("Checksum-Algorithm", "NONE")
        files[name] = (entry.get("Size"), algorithm, entry.get("Checksum"))
        algorithms.add(algorithm)
    only = algorithms.pop() if len(algorithms) == 1 else None
    return Manifest(path, files, HASHLIB_NAMES.get(only), wal_range)


def problems(manifest, digests):
    """Lines naming each manifest file that the extraction did not write with its size and checksum;
    ``digests``: {name: (size, hex digest)} from tar_extract.extract. Empty when everything matches."""
    found = []
    for name, (size, _algorithm, checksum) in sorted(manifest.files.items()):
        got = digests.get(name)
        if got is None:
            found.append("missing from base.tar: %s" % name)
        elif got[0] != size:
            found.append("size differs for %s: manifest %s, extracted %d" % (name, size, got[0]))
        elif checksum is not None and got[1] != checksum.lower():
            found.append("checksum differs for %s" % name)
    return found


def check(manifest, digests):
    """Raise ManifestError naming the first mismatches, if any (see :func:`problems`)."""
    found = problems(manifest, digests)
    if found:
        more = " (and %d more)" % (len(found) - SHOW) if len(found) > SHOW else ""
        raise ManifestError("the restored files do not match %s: %s%s" % (manifest.path, "; ".join(found[:SHOW]), more))
