"""A real btrfs file system on a loop device, for tests and the benchmark (root only).

``LoopBtrfs.create(size)`` makes an image file under /tmp, ``mkfs.btrfs`` on it, and mounts it with
``-o loop`` (with ``user_subvol_rm_allowed`` unless asked otherwise) on a world-traversable directory;
``destroy()`` unmounts it, detaches the loop device and removes the image. ``unavailable()`` says why it
cannot work here (not root, no loop device, no btrfs tools), or None.
"""

import os
import shutil
import subprocess
import tempfile
import time


class LoopBtrfsError(Exception):
    """The file system could not be made or mounted; the message has the command's output."""


def unavailable():
    """None when a loop-mounted btrfs can be made here, else the reason (str)."""
    if os.geteuid() != 0:
        return "needs root (mkfs.btrfs on a file, mount -o loop)"
    for tool in ("mkfs.btrfs", "btrfs", "mount", "umount", "losetup"):
        if shutil.which(tool) is None:
            return "%s is not installed (btrfs-progs, util-linux)" % tool
    if not os.path.exists("/dev/loop-control") and not os.path.exists("/dev/loop0"):
        return "no loop device (/dev/loop-control)"
    with open("/proc/filesystems", encoding="utf-8") as handle:
        if "btrfs" not in handle.read():
            probe = subprocess.run(["modprobe", "btrfs"], capture_output=True, text=True, check=False)
            if probe.returncode != 0:
                return "the kernel has no btrfs support"
    return None


def _run(argv):
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise LoopBtrfsError("%s failed (exit %d): %s" % (" ".join(argv), proc.returncode,
                                                          (proc.stderr or proc.stdout).strip()))
    return proc.stdout


class LoopBtrfs:
    """A mounted loop btrfs: ``mountpoint``, ``image``, ``options``."""

    def __init__(self, base, image, mountpoint, options):
        self.base = base
        self.image = image
        self.mountpoint = mountpoint
        self.options = options

    @classmethod
    def create(cls, size=1 << 30, user_subvol_rm_allowed=True, workdir="/tmp"):
        """Make, format and mount one. Raises LoopBtrfsError (nothing is left behind then)."""
        base = tempfile.mkdtemp(prefix="alfbtrfs-", dir=workdir)
        os.chmod(base, 0o755)
        image, mountpoint = os.path.join(base, "btrfs.img"), os.path.join(base, "mnt")
        options = "loop" + (",user_subvol_rm_allowed" if user_subvol_rm_allowed else "")
        made = cls(base, image, mountpoint, options)
        try:
            with open(image, "wb") as handle:
                handle.truncate(size)
            os.mkdir(mountpoint, 0o755)
            _run(["mkfs.btrfs", "-q", image])
            _run(["mount", "-o", options, image, mountpoint])
            os.chmod(mountpoint, 0o755)
        except BaseException:
            made.destroy()
            raise
        return made

    def loop_devices(self):
        """The loop devices backed by the image (normally none left after umount)."""
        proc = subprocess.run(["losetup", "-j", self.image], capture_output=True, text=True, check=False)
        return [line.split(":", 1)[0] for line in proc.stdout.splitlines() if line.strip()]

    def destroy(self):
        """Unmount (retrying while busy, then lazily), detach the loop device, remove the image. Never raises."""
        if os.path.ismount(self.mountpoint):
            for _attempt in range(20):
                if subprocess.run(["umount", self.mountpoint], capture_output=True, check=False).returncode == 0:
                    break
                time.sleep(0.25)
            else:
                subprocess.run(["umount", "-l", self.mountpoint], capture_output=True, check=False)
        for device in self.loop_devices() if os.path.exists(self.image) else []:
            subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
        shutil.rmtree(self.base, ignore_errors=True)
