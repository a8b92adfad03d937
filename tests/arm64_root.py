"""An emulated arm64 Debian 12 (bookworm) root for tests: the place a Raspberry Pi image is
installed and run on this x86_64 machine.

What it is: a minimal arm64 Debian root (python3, python3-venv) built with mmdebstrap from the
Debian mirror this machine's apt already uses (read from /etc/apt at run time, so no archive
host name is written anywhere in the repository), run through qemu-aarch64 (qemu-user-static,
registered with binfmt_misc with the fix-binary flag, so the root needs no qemu binary of its
own) under chroot. The chroot shares this machine's network namespace: a process in the root
reaches a broker on the host's 127.0.0.1.

Cache: the built root is a zstd tarball under /var/cache/fleetlearn/arm64-root/ (outside the
clone; FLEETLEARN_CACHE overrides the base), keyed by a hash of everything that decides its
contents (suite, architecture, variant, package list, this recipe's version). A cold build takes
minutes (dpkg runs the arm64 maintainer scripts under emulation); a warm set-up only unpacks the
tarball into a fresh directory, so every test session starts from the same clean root.

Pitfalls this handles (each measured on this machine):
- binfmt_misc may not be mounted: it is mounted, then `update-binfmts --enable qemu-aarch64`.
- Debian 12's qemu 7.2 passes the host's x86 /proc/cpuinfo through, and onnxruntime's CPU
  detection segfaults on it: a plausible Cortex-A72 cpuinfo is bind-mounted over the root's.
- Mounts need root. Teardown unmounts in reverse order (lazily if busy) and deletes the root
  only once nothing is mounted under it anymore: deleting through a bind mount of /dev would
  delete the host's /dev.
When any of this is impossible here (not root, no binfmt_misc, tools missing), `Unavailable`
says why; tests skip with that reason.

Run as a script (`make arm64-root`) to build or check the cache and print the timings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = "bookworm"
ARCH = "arm64"
VARIANT = "minbase"
# What install.sh needs on a stock Debian 12 / Raspberry Pi OS: Python 3.11 with venv (which
# brings ensurepip's bundled pip and setuptools wheels). Nothing else: the image is offline.
PACKAGES = ("python3", "python3-venv")
# Bump when the recipe below changes in a way that changes the root.
RECIPE_VERSION = 1
# Docs, man pages and translations are dead weight in a test root (and slow to unpack).
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
APT_DIR = Path("/etc/apt")
TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "zstd": "zstd",
    "update-binfmts": "binfmt-support",
    "qemu-aarch64-static": "qemu-user-static",
}
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_ENTRY = "qemu-aarch64"


class Unavailable(RuntimeError):
    """This machine cannot run an emulated arm64 root; the message says why."""


def cache_dir() -> Path:
    return Path(os.environ.get("FLEETLEARN_CACHE", "/var/cache/fleetlearn")) / "arm64-root"


def cache_key() -> str:
    recipe = f"{RECIPE_VERSION}|{SUITE}|{ARCH}|{VARIANT}|{','.join(sorted(PACKAGES))}|{','.join(DPKG_EXCLUDES)}"
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def tarball_path() -> Path:
    return cache_dir() / f"debian-{SUITE}-{ARCH}-{cache_key()}.tar.zst"


# ---------------------------------------------------------------------------- apt sources


def _deb822_entries(text: str) -> list[dict[str, str]]:
    entries, current = [], {}
    for line in text.splitlines() + [""]:
        if not line.strip():
            if current:
                entries.append(current)
            current = {}
            continue
        if line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and current:  # continuation line
            last = list(current)[-1]
            current[last] += " " + line.strip()
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip().lower()] = value.strip()
    return entries


def debian_sources(apt_dir: Path = APT_DIR, suite: str = SUITE) -> list[str]:
    """One-line `deb URI SUITE COMPONENTS` entries for `suite` (and its -updates/-security), read
    from this machine's apt configuration (deb822 .sources files and sources.list files)."""
    lines: list[str] = []

    def wanted(s: str) -> bool:
        return s == suite or s.startswith(suite + "-")

    files = sorted((apt_dir / "sources.list.d").glob("*.sources")) if (apt_dir / "sources.list.d").is_dir() else []
    for path in files:
        for e in _deb822_entries(path.read_text(encoding="utf-8", errors="replace")):
            if "deb" not in e.get("types", "").split() or e.get("enabled", "yes").lower() == "no":
                continue
            opts = f"[signed-by={e['signed-by']}] " if e.get("signed-by", "").startswith("/") else ""
            for uri in e.get("uris", "").split():
                for s in e.get("suites", "").split():
                    if wanted(s):
                        lines.append(f"deb {opts}{uri} {s} {e.get('components', 'main')}")
    lists = [apt_dir / "sources.list"] + (
        sorted((apt_dir / "sources.list.d").glob("*.list")) if (apt_dir / "sources.list.d").is_dir() else []
    )
    for path in lists:
        if not path.is_file():
            continue
        for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
            m = re.match(r"^\s*deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.+?)\s*$", raw.split("#", 1)[0])
            if m and wanted(m.group(3)):
                lines.append(f"deb {m.group(1) or ''}{m.group(2)} {m.group(3)} {m.group(4)}")
    out = list(dict.fromkeys(lines))
    if not any(re.search(rf"\s{re.escape(suite)}\s", line) for line in out):
        raise Unavailable(
            f"no apt source for Debian {suite} in {apt_dir} (sources.list or sources.list.d/*.sources): cannot build the arm64 root"
        )
    return out


# ---------------------------------------------------------------------------- binfmt


def missing_tools() -> list[str]:
    return sorted(
        pkg
        for tool, pkg in TOOLS.items()
        if shutil.which(tool) is None and not Path(f"/usr/bin/{tool}").exists() and not Path(f"/usr/sbin/{tool}").exists()
    )


def ensure_binfmt() -> None:
    """qemu-aarch64 registered and enabled with binfmt_misc, or Unavailable saying why."""
    if os.geteuid() != 0:
        raise Unavailable("the emulated arm64 root needs root (mount, chroot, binfmt_misc); run the tests as root, as CI does")
    missing = missing_tools()
    if missing:
        raise Unavailable(
            f"missing Debian packages for the arm64 root: {' '.join(missing)} (make test installs them with apt-get)"
        )
    if not (BINFMT_DIR / "status").exists():
        proc = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise Unavailable(
                f"cannot mount binfmt_misc at {BINFMT_DIR}: {proc.stderr.strip() or proc.returncode} (a container without that privilege cannot emulate arm64)"
            )
    entry = BINFMT_DIR / BINFMT_ENTRY
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        proc = subprocess.run(["update-binfmts", "--enable", BINFMT_ENTRY], capture_output=True, text=True)
        if proc.returncode != 0 and not (entry.exists() and entry.read_text().startswith("enabled")):
            raise Unavailable(f"update-binfmts --enable {BINFMT_ENTRY} failed: {(proc.stderr or proc.stdout).strip()[:300]}")
    text = entry.read_text() if entry.exists() else ""
    if not text.startswith("enabled"):
        raise Unavailable(f"binfmt_misc entry {entry} is not enabled after update-binfmts")
    flags = re.search(r"^flags:\s*(\S*)", text, re.M)
    if flags is None or "F" not in flags.group(1):
        raise Unavailable(f"binfmt_misc entry {BINFMT_ENTRY} lacks the fix-binary (F) flag: a chroot could not find qemu")


# ---------------------------------------------------------------------------- build / cache


def build_tarball(log=print) -> Path:
    """Cold build: mmdebstrap an arm64 root into a scratch directory, pack it as the cache tarball."""
    ensure_binfmt()
    sources = debian_sources()
    out = tarball_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="build-", dir=out.parent))
    try:
        root = scratch / "root"
        cmd = ["mmdebstrap", "--quiet", "--mode=root", f"--variant={VARIANT}", f"--architectures={ARCH}", "--format=directory"]
        cmd += [f"--include={','.join(PACKAGES)}"]
        cmd += [f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES]
        cmd += ['--aptopt=Acquire::Languages "none"', SUITE, str(root)] + sources
        log(f"arm64-root: building {out.name} with mmdebstrap ({len(sources)} apt sources from {APT_DIR}); takes minutes")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed ({proc.returncode}):\n{(proc.stderr + proc.stdout)[-3000:]}")
        # Leave no trace of this machine's apt configuration in the cached root.
        for p in [root / "etc/apt/sources.list"] + list((root / "etc/apt/sources.list.d").glob("*")):
            if p.is_file():
                p.write_text("")
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
        tmp = scratch / "root.tar.zst"
        subprocess.run(
            ["tar", "--numeric-owner", "--xattrs", "-I", "zstd -T0 -3", "-C", str(root), "-cf", str(tmp), "."], check=True
        )
        os.replace(tmp, out)
        return out
    finally:
        remove_unmounted(scratch)


def ensure_tarball(log=print) -> tuple[Path, bool]:
    """(the cached tarball, whether it was built now)."""
    out = tarball_path()
    if out.is_file():
        return out, False
    return build_tarball(log), True


def cpuinfo_file(cores: int | None = None) -> Path:
    """A plausible /proc/cpuinfo of a Raspberry Pi 4 (Cortex-A72), one entry per host core."""
    cores = cores or os.cpu_count() or 1
    path = cache_dir() / f"cpuinfo-cortex-a72-{cores}.txt"
    if not path.is_file():
        block = (
            "processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
            "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n"
        )
        text = "".join(block.format(n=n) for n in range(cores))
        text += "Hardware\t: BCM2835\nRevision\t: c03114\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def cached_wheelhouse(project_wheel: Path, profile_name: str) -> Path:
    """A profile's dependency wheels, resolved by flash's own code (wheels.dependency_requirements,
    for the profile's architecture and engine) and downloaded once into
    /var/cache/fleetlearn/wheels/, keyed by the requirement set; for `flash --wheelhouse`."""
    from fleetlearn.firmware_configs import wheels
    from fleetlearn.firmware_configs.profiles import load_profile

    profile = load_profile(profile_name)
    reqs = wheels.dependency_requirements(project_wheel, profile, profile.training.engine, [])
    key = hashlib.sha256(json.dumps([profile.arch, profile.python, profile.glibc, sorted(reqs)]).encode()).hexdigest()[:16]
    dest = cache_dir().parent / "wheels" / f"{profile.arch}-cp{profile.python.replace('.', '')}-{key}"
    if not (dest / ".complete").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
        try:
            wheels.download_dependencies(reqs, profile, tmp, None)
            (tmp / ".complete").write_text("\n".join(reqs) + "\n")
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ---------------------------------------------------------------------------- the running root


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` (from /proc/self/mountinfo), deepest first."""
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def remove_unmounted(path: Path) -> None:
    """rm -rf `path`, but only once nothing is mounted below it: mmdebstrap mounts /proc, /sys and
    /dev into the root it builds, and a run killed mid-way can leave them mounted. Deleting
    through a mount of the host's /dev would delete the host's device nodes."""
    if not path.exists():
        return
    for point in mounts_under(path):
        subprocess.run(["umount", "-R", "-l", point], capture_output=True)
    left = mounts_under(path)
    if left:
        raise RuntimeError(f"{path}: still mounted ({', '.join(left)}); not deleting it. Unmount them by hand, then remove it.")
    shutil.rmtree(path, ignore_errors=True)


class Arm64Root:
    """A fresh arm64 root unpacked from the cache, with /proc, /sys, /dev and the ARM cpuinfo
    mounted. Use as a context manager; `run`/`popen` execute commands inside (chroot)."""

    def __init__(self, workdir: Path, tarball: Path):
        self.path = workdir / "arm64-root"
        self.tarball = tarball
        self._mounted: list[Path] = []

    def __enter__(self) -> Arm64Root:
        try:
            self.path.mkdir(parents=True)
            subprocess.run(["tar", "--numeric-owner", "-I", "zstd", "-C", str(self.path), "-xf", str(self.tarball)], check=True)
            self._mount(["-t", "proc", "proc"], "proc")
            self._mount(["--rbind", "/sys"], "sys")
            self._mount(["--make-rslave"], "sys", source=False)
            self._mount(["--rbind", "/dev"], "dev")
            self._mount(["--make-rslave"], "dev", source=False)
            self._mount(["--bind", str(cpuinfo_file())], "proc/cpuinfo")
        except BaseException:
            self.close()
            raise
        return self

    def _mount(self, args: list[str], target: str, source: bool = True) -> None:
        where = self.path / target
        subprocess.run(["mount", *args, str(where)], check=True, capture_output=True)
        if source and where not in self._mounted:
            self._mounted.append(where)

    def close(self) -> None:
        for where in reversed(self._mounted):
            if subprocess.run(["umount", "-R", str(where)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-R", "-l", str(where)], capture_output=True)
        self._mounted.clear()
        remove_unmounted(self.path)  # also anything a test mounted itself

    def __exit__(self, *exc) -> None:
        self.close()

    def env(self, **extra: str) -> dict[str, str]:
        base = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
        }
        return {**base, **extra}

    def command(self, *argv: str) -> list[str]:
        return ["chroot", str(self.path), *argv]

    def run(self, *argv: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*argv), capture_output=True, text=True, timeout=timeout, env=env or self.env())

    def popen(self, *argv: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(*argv), env=env or self.env(), **kw)


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build (or check) the cached arm64 Debian root the emulation tests use.")
    ap.add_argument("action", choices=["build", "check", "path"], nargs="?", default="build")
    args = ap.parse_args(argv)
    if args.action == "path":
        print(tarball_path())
        return 0
    try:
        t0 = time.monotonic()
        tarball, built = ensure_tarball()
        t1 = time.monotonic()
        print(
            f"arm64-root: {'built' if built else 'cached'} {tarball} ({tarball.stat().st_size / 1e6:.0f} MB) in {t1 - t0:.1f} s"
        )
        if args.action == "check":
            work = Path(tempfile.mkdtemp(prefix="arm64-root-", dir="/var/tmp"))
            try:
                with Arm64Root(work, tarball) as root:
                    t2 = time.monotonic()
                    proc = root.run("python3", "-c", "import platform, sys; print(platform.machine(), sys.version.split()[0])")
                    print(
                        f"arm64-root: unpacked and mounted in {t2 - t1:.1f} s; inside: {proc.stdout.strip() or proc.stderr.strip()} ({time.monotonic() - t2:.1f} s)"
                    )
                    if proc.returncode != 0 or not proc.stdout.startswith("aarch64"):
                        return 1
            finally:
                remove_unmounted(work)
    except Unavailable as exc:
        print(f"arm64-root: unavailable: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
