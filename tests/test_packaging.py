"""The package a user installs: its version, the wheel's contents, the released model inside it.

Building the wheel needs ``build`` (the dev extra) and runs without build isolation, with the
setuptools already installed (no network). CI builds it with isolation and installs it (.ci/run).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import edgekidney
from edgekidney import released

REPO = Path(__file__).resolve().parents[1]
RELEASE = REPO / "models" / released.RELEASED
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def test_version_is_the_changelogs_newest_and_the_cli_prints_it():
    newest = re.search(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", (REPO / "CHANGELOG.md").read_text(), re.M)
    assert newest and newest.group(1) == edgekidney.__version__
    r = subprocess.run([sys.executable, "-m", "edgekidney", "--version"], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"edgekidney {edgekidney.__version__}", r.stdout + r.stderr


def test_the_wheel_installs_the_release_where_a_name_finds_it():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    data_files = config["tool"]["setuptools"]["data-files"]
    target = f"share/edgekidney/models/{released.RELEASED}"
    folder = f"models/{released.RELEASED}"
    assert data_files == {target: [f"{folder}/*.onnx", f"{folder}/*.json", f"{folder}/MODEL_CARD.md",
                                   f"{folder}/SHA256SUMS"]}  # the release's files, and nothing else (no examples)
    # released.py looks in <prefix>/share/edgekidney/models, where pip puts the wheel's data files
    assert Path(sys.prefix) / "share" / "edgekidney" / "models" in released.search_path()


def test_the_released_model_is_whole():
    if not (RELEASE / "SHA256SUMS").is_file():
        pytest.skip(f"the released model is not in this checkout ({RELEASE})")
    names = {p.name for p in RELEASE.iterdir()}
    cpu, gpu = released.form_file(RELEASE, "cpu"), released.form_file(RELEASE, "gpu")
    assert cpu is not None and gpu is not None
    assert {cpu.name, gpu.name, cpu.with_suffix(".json").name, gpu.with_suffix(".json").name,
            "MODEL_CARD.md", "SHA256SUMS"} <= names
    for line in (RELEASE / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        name = name.lstrip("*")
        assert hashlib.sha256((RELEASE / name).read_bytes()).hexdigest() == digest, name


def test_wheel_contents(tmp_path):
    pytest.importorskip("build")
    if not __import__("importlib").util.find_spec("setuptools"):
        pytest.skip("setuptools is not installed (the build runs without isolation)")
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(REPO)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    version = edgekidney.__version__
    assert (tmp_path / f"edgekidney-{version}.tar.gz").is_file()
    wheel = tmp_path / f"edgekidney-{version}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert "edgekidney/cli.py" in names and "edgekidney/released.py" in names
    assert not [n for n in names if n.startswith(("examples/", "tests/", "models/"))], names
    data = f"edgekidney-{version}.data/data/share/edgekidney/models/{released.RELEASED}/"
    shipped = sorted(n[len(data):] for n in names if n.startswith(data))
    expected = sorted(p.name for p in RELEASE.iterdir() if p.is_file()) if RELEASE.is_dir() else []
    assert shipped == expected
    meta = zipfile.ZipFile(wheel).read(f"edgekidney-{version}.dist-info/METADATA").decode()
    assert f"Version: {version}" in meta and "Requires-Dist: click" not in meta
