"""mypy over the package as it installs: `fleetlearn.export` lives in export/ (pyproject's
package-dir mapping), which mypy's module finder cannot follow. So build the installed layout
as a tree of symlinks from pyproject's own mapping, and check `-p fleetlearn` there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["package-dir"]
    tree = ROOT / ".venv" / "typecheck"
    shutil.rmtree(tree, ignore_errors=True)
    top = tree / "fleetlearn"
    top.mkdir(parents=True)
    for path in sorted((ROOT / mapping["fleetlearn"]).glob("*.py")):
        (top / path.name).symlink_to(path)
    for package, folder in sorted(mapping.items()):
        if package != "fleetlearn":
            (tree / package.replace(".", "/")).symlink_to(ROOT / folder, target_is_directory=True)
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "fleetlearn"]
    return subprocess.run(cmd, cwd=tree).returncode


if __name__ == "__main__":
    sys.exit(main())
