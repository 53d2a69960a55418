"""Alfresco's keystore and configuration files, copied into each night's backup.

A restore onto a new host needs ``alf_data/keystore`` (encrypted properties, Solr/SSL keys),
``tomcat/shared/classes/alfresco-global.properties`` and, if present,
``tomcat/shared/classes/alfresco/extension``. They are small: plain copies, private (0600/0700), via
``config-TS.partial`` and rename.
"""

import os
import shutil
import time

import catalog
import safe_files

# (what, path relative to ALF_BASE_DIR, name in the backup)
ITEMS = [
    ("keystore", os.path.join("alf_data", "keystore"), "keystore"),
    ("alfresco-global.properties", os.path.join("tomcat", "shared", "classes", "alfresco-global.properties"),
     "alfresco-global.properties"),
    ("extension", os.path.join("tomcat", "shared", "classes", "alfresco", "extension"), "extension"),
]
REQUIRED = ("keystore", "alfresco-global.properties")


class ConfigCopyError(Exception):
    """The copy failed; the message names the file."""


def _private_copy(src, dst):
    shutil.copyfile(src, dst, follow_symlinks=True)
    os.chmod(dst, 0o600)


def copy_config(alf_base_dir, backup_dir, name, log):
    """Copy the items into ``backup_dir/config/name``. Returns (metadata dict, warnings list).

    A missing required item is a warning (the backup is still useful), never silent. Raises
    ConfigCopyError when something present cannot be copied.
    """
    started, started_iso = time.monotonic(), catalog.utc_now_iso()
    dest_root = catalog.kind_dir(backup_dir, "config")
    os.makedirs(dest_root, mode=0o700, exist_ok=True)
    final = os.path.join(dest_root, name)
    partial = final + catalog.PARTIAL_SUFFIX
    if os.path.isdir(partial):
        shutil.rmtree(partial)
    os.mkdir(partial, 0o700)
    copied, warnings, size = [], [], 0
    old_umask = os.umask(0o077)
    try:
        for what, rel, target in ITEMS:
            src = os.path.join(alf_base_dir, rel)
            dst = os.path.join(partial, target)
            if os.path.isdir(src):
                shutil.copytree(src, dst, copy_function=_private_copy)
                for root, dirs, _files in os.walk(dst):
                    for d in dirs:
                        os.chmod(os.path.join(root, d), 0o700)
                os.chmod(dst, 0o700)
            elif os.path.isfile(src):
                _private_copy(src, dst)
            else:
                if what in REQUIRED:
                    warnings.append("%s not found at %s: a restore onto a new host will need it" % (what, src))
                continue
            copied.append(target)
    except (OSError, shutil.Error) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise ConfigCopyError("copying %s: %s" % (src, exc))
    finally:
        os.umask(old_umask)
    for root, _dirs, files in os.walk(partial):
        size += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    safe_files.fsync_tree(partial)  # the keystore must be on disk before the copy counts
    info = {"kind": "config", "name": name, "status": catalog.DONE, "source": alf_base_dir,
            "started_at": started_iso, "ended_at": catalog.utc_now_iso(),
            "duration_s": round(time.monotonic() - started, 3), "items": copied, "size_bytes": size,
            "warnings": warnings}
    catalog.write_info(final, info)  # before the rename: see base_backup.take_base_backup
    os.rename(partial, final)
    catalog.fsync_dir(dest_root)
    if eager_orphan_cleanup(os.path.join(alf_base_dir, ITEMS[1][1])):
        warnings.append("system.content.eagerOrphanCleanup=true in alfresco-global.properties: deleted content "
                        "is removed at once, so a hot backup can miss files the database still references; "
                        "set it to false (orphans are then kept system.content.orphanProtectDays days)")
    for warning in warnings:
        log.warning(warning)
    return info, warnings


def eager_orphan_cleanup(properties_path):
    """True when alfresco-global.properties sets system.content.eagerOrphanCleanup=true."""
    try:
        with open(properties_path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, sep, value = line.strip().partition("=")
                if sep and key.strip() == "system.content.eagerOrphanCleanup":
                    return value.strip().lower() == "true"
    except OSError:
        pass
    return False
