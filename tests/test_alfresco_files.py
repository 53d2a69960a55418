"""Keystore and configuration copy: private plain copies, warnings for what is missing or risky."""

import logging
import os

import alfresco_files
import catalog


def make_install(root, eager=None):
    os.makedirs(os.path.join(root, "alf_data", "keystore"))
    with open(os.path.join(root, "alf_data", "keystore", "keystore"), "wb") as handle:
        handle.write(b"\x00secret")
    classes = os.path.join(root, "tomcat", "shared", "classes")
    os.makedirs(os.path.join(classes, "alfresco", "extension", "sub"))
    with open(os.path.join(classes, "alfresco", "extension", "sub", "x.xml"), "w") as handle:
        handle.write("<beans/>")
    with open(os.path.join(classes, "alfresco-global.properties"), "w") as handle:
        handle.write("dir.root=/x\n")
        if eager is not None:
            handle.write("system.content.eagerOrphanCleanup = %s\n" % eager)


def test_copy_is_private_and_complete(tmp_path):
    base, backups = str(tmp_path / "alfresco"), str(tmp_path / "backups")
    make_install(base)
    info, warnings = alfresco_files.copy_config(base, backups, "config-2024-01-01_02-00-00", logging.getLogger())
    assert warnings == [] and info["items"] == ["keystore", "alfresco-global.properties", "extension"]
    root = os.path.join(backups, "config", "config-2024-01-01_02-00-00")
    for dirpath, _dirnames, filenames in os.walk(root):
        assert os.stat(dirpath).st_mode & 0o777 == 0o700, dirpath
        for name in filenames:
            assert os.stat(os.path.join(dirpath, name)).st_mode & 0o777 == 0o600, name
    assert catalog.read_info(root)["status"] == "DONE"


def test_missing_keystore_and_eager_cleanup_are_warnings(tmp_path):
    base, backups = str(tmp_path / "alfresco"), str(tmp_path / "backups")
    make_install(base, eager="true")
    os.remove(os.path.join(base, "alf_data", "keystore", "keystore"))
    os.rmdir(os.path.join(base, "alf_data", "keystore"))
    _info, warnings = alfresco_files.copy_config(base, backups, "config-2024-01-01_02-00-00", logging.getLogger())
    assert any("keystore not found" in w for w in warnings)
    assert any("eagerOrphanCleanup" in w for w in warnings)


def test_eager_cleanup_false_is_quiet(tmp_path):
    base = str(tmp_path / "alfresco")
    make_install(base, eager="false")
    assert not alfresco_files.eager_orphan_cleanup(
        os.path.join(base, "tomcat", "shared", "classes", "alfresco-global.properties"))
