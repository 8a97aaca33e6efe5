"""What a user's ``pip install`` puts in site-packages: the project's own package name only.

The callbacks live in the repository's top-level ``callbacks/`` folder (the project layout) and must install as
``bbuqc_lightning.callbacks``: a top-level ``callbacks`` package would collide with any other package of that
name. Built from a copy of the sources, so the checkout gets no ``build/`` folder.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "pyproject.toml", "README.md", "bbuqc_lightning", "callbacks", "conf")


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("bbuqc_lightning-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_wheel_installs_only_the_project_package(wheel_names: list[str]) -> None:
    top_level = {name.split("/", 1)[0] for name in wheel_names}
    assert top_level == {"bbuqc_lightning", "bbuqc_lightning-0.1.0.dist-info"}


def test_callbacks_install_under_the_project_name(wheel_names: list[str]) -> None:
    expected = {f"bbuqc_lightning/callbacks/{p.name}" for p in (REPO / "callbacks").glob("*.py")}
    assert expected and expected <= set(wheel_names)
    assert "bbuqc_lightning/conf/train.yaml" in wheel_names


def test_code_imports_the_callbacks_by_the_project_name() -> None:
    """``from callbacks...`` works from a checkout only; anything shipped must use the installed name."""
    offenders = [
        f"{path.relative_to(REPO)}:{no}"
        for folder in ("bbuqc_lightning", "callbacks", "tools", "bench", "tests", "conf")
        for path in sorted((REPO / folder).rglob("*.py" if folder != "conf" else "*.yaml"))
        if "bbuqc_lightning/callbacks" not in path.as_posix()
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if line.lstrip().startswith(("from callbacks", "import callbacks", "_target_: callbacks."))
    ]
    assert offenders == []
