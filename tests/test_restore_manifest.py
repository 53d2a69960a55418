"""restore_manifest: the manifest read, authenticated and compared with the digests of an extraction; and
end to end, a base backup whose data was changed in place (same size, so pg_verifybackup --skip-checksums
alone would pass) is refused by restore.py postgres and by the drill, naming the file."""

import glob
import hashlib
import io
import os
import tarfile

import pytest
import restore_manifest
import tar_extract
from test_postgres import manifest_bytes


def entry(path, data, algorithm="SHA256", encoded=False):
    found = {"Size": len(data), "Last-Modified": "2024-01-31 02:00:01 GMT", "Checksum-Algorithm": algorithm,
             "Checksum": hashlib.sha256(data).hexdigest() if algorithm == "SHA256" else "0badc0de"}
    found["Encoded-Path" if encoded else "Path"] = path.encode("utf-8", "surrogateescape").hex() if encoded else path
    return found


FILES = {"backup_label": b"START WAL LOCATION: 0/2000028\n", "base/1/1259": os.urandom(8192), "PG_VERSION": b"15\n"}


def write(tmp_path, data):
    path = tmp_path / "backup_manifest"
    path.write_bytes(data)
    return str(path)


def test_load_authenticates_and_names_the_algorithm(tmp_path):
    manifest = restore_manifest.load(write(tmp_path, manifest_bytes([entry(n, d) for n, d in FILES.items()])))
    assert manifest.algorithm == "sha256" and set(manifest.files) == set(FILES)
    assert manifest.files["PG_VERSION"] == (3, "SHA256", hashlib.sha256(b"15\n").hexdigest())
    with pytest.raises(restore_manifest.ManifestError, match="checksum mismatch"):
        restore_manifest.load(write(tmp_path, manifest_bytes([entry("x", b"x")],
                                                             tamper=lambda b: b.replace(b'"x"', b'"y"'))))
    with pytest.raises(restore_manifest.ManifestError, match="damaged or truncated"):
        restore_manifest.load(write(tmp_path, manifest_bytes([entry("x", b"x")])[:-30]))


def test_crc32c_or_mixed_algorithms_get_no_digest(tmp_path):
    crc = restore_manifest.load(write(tmp_path, manifest_bytes([entry("a", b"a", "CRC32C")])))
    assert crc.algorithm is None
    mixed = restore_manifest.load(write(tmp_path, manifest_bytes([entry("a", b"a"), entry("b", b"b", "CRC32C")])))
    assert mixed.algorithm is None


def extracted(tmp_path, files):
    tmp_path.mkdir()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    path = tmp_path / "base.tar"
    path.write_bytes(buffer.getvalue())
    dest = tmp_path / "dest"
    dest.mkdir()
    return tar_extract.extract(str(path), str(dest), digest="sha256")


def test_problems_name_missing_resized_and_changed_files(tmp_path):
    odd = "base/1/caf\udce9"  # a non-UTF-8 name, hex-encoded in the manifest
    files = dict(FILES, **{odd: b"odd"})
    manifest = restore_manifest.load(write(tmp_path, manifest_bytes(
        [entry(n, d) for n, d in FILES.items()] + [entry(odd, b"odd", encoded=True)])))
    assert restore_manifest.problems(manifest, extracted(tmp_path / "good", files)) == []
    changed = dict(files, **{"base/1/1259": b"\0" * 8192, "PG_VERSION": b"16\n\n"})
    del changed["backup_label"]
    found = restore_manifest.problems(manifest, extracted(tmp_path / "bad", changed))
    assert found == ["size differs for PG_VERSION: manifest 3, extracted 4", "missing from base.tar: backup_label",
                     "checksum differs for base/1/1259"]
    with pytest.raises(restore_manifest.ManifestError, match="base/1/1259"):
        restore_manifest.check(manifest, extracted(tmp_path / "bad2", changed))


def tamper_in_place(tar):
    """Overwrite 16 bytes in the middle of the largest data file inside an uncompressed base.tar (its size
    and the tar stay valid). Returns the member's name."""
    with tarfile.open(tar) as archive:
        member = max((m for m in archive if m.isfile() and m.name.startswith("base/")), key=lambda m: m.size)
    with open(tar, "r+b") as handle:
        handle.seek(member.offset_data + member.size // 2)
        handle.write(b"\xde\xad\xbe\xef" * 4)
    return member.name


def test_a_base_backup_changed_in_place_is_refused_naming_the_file(sandbox):
    sb = sandbox
    env = sb.write_env(PG_COMPRESSION="none")
    result = sb.run_cli("backup.py", env_path=env)
    assert result.returncode == 0, result.stdout + result.stderr
    base = sorted(glob.glob(os.path.join(sb.backup_dir, "postgres", "base-*[0-9]")))[-1]
    name = tamper_in_place(os.path.join(base, "base.tar"))
    dest = os.path.join(sb.root, "restored")
    restored = sb.run_cli("restore.py", ["postgres", "--to", dest, "--immediate"], env_path=env)
    assert restored.returncode == 1, restored.stdout + restored.stderr
    assert "checksum differs for %s" % name in restored.stdout + restored.stderr
    drill = sb.run_cli("restore.py", ["verify"], env_path=env)
    assert drill.returncode == 1 and "Restore drill FAILED" in drill.stdout, drill.stdout + drill.stderr
    assert "checksum differs for %s" % name in drill.stdout
    assert not glob.glob(os.path.join(sb.backup_dir, ".verify-*"))
