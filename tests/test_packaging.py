"""The wheel and the sdist, built as a release would be, then installed and used elsewhere.

The source tree is copied (so the build writes nothing into the clone), built with
``python -m build``, and checked: the licence is in both, the version is the one
``ucxrpc.__version__`` holds, and the sdist carries what its tests need (conftest.py,
the helpers, examples, docs, benchmarks). The wheel is then installed with its
dependencies into a fresh virtual environment, and ``ucxrpc demo`` and ``ucxrpc info``
run from a directory outside the clone. The tests of the unpacked sdist are collected,
and its wire-format tests run, against the sdist's own copy of the package.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

import ucxrpc

ROOT = Path(__file__).resolve().parent.parent
VERSION = ucxrpc.__version__
#: Not part of a source release: environments, caches, build output, generated sites.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    ".import_linter_cache",
    "build",
    "dist",
    "site",
    "bench-results",
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _clean_env() -> dict[str, str]:
    """The environment without anything pointing Python at the clone."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _run(args: list[str], cwd: Path, timeout: float = 600) -> str:
    proc = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_clean_env()
    )
    assert proc.returncode == 0, f"{args}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(wheel, sdist, the build's output), built from a copy of the source tree."""
    work = tmp_path_factory.mktemp("build")
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE, symlinks=True)
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(work / "dist"), str(source)],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
        env=_clean_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (work / "dist").glob("*.whl")
    (sdist,) = (work / "dist").glob("*.tar.gz")
    return wheel, sdist, proc.stdout + proc.stderr


def test_the_build_is_clean_and_versioned_from_the_package(built: tuple[Path, Path, str]) -> None:
    wheel, sdist, log = built
    assert wheel.name == f"ucxrpc-{VERSION}-py3-none-any.whl"
    assert sdist.name == f"ucxrpc-{VERSION}.tar.gz"
    # The SPDX licence needs no deprecated table (setuptools warned four times per build).
    assert "SetuptoolsDeprecationWarning" not in log, log
    assert "License classifiers are deprecated" not in log, log
    assert "project.license` as a TOML table is deprecated" not in log, log


def test_the_wheel_carries_the_licence(built: tuple[Path, Path, str]) -> None:
    wheel, _, _ = built
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("BSD 3-Clause License") and "the ucxrpc authors" in licence
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        info = f"ucxrpc-{VERSION}.dist-info"
        assert f"{info}/licenses/LICENSE" in names, names
        assert whl.read(f"{info}/licenses/LICENSE").decode() == licence
        metadata = whl.read(f"{info}/METADATA").decode()
        assert "ucxrpc/py.typed" in names
        assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/"))]
    assert re.search(r"^License-Expression: BSD-3-Clause$", metadata, re.M), metadata
    assert re.search(r"^License-File: LICENSE$", metadata, re.M), metadata
    assert re.search(rf"^Version: {re.escape(VERSION)}$", metadata, re.M), metadata


def test_the_sdist_carries_what_its_tests_and_docs_need(built: tuple[Path, Path, str]) -> None:
    _, sdist, _ = built
    top = f"ucxrpc-{VERSION}"
    with tarfile.open(sdist) as tar:
        names = {n.removeprefix(top + "/") for n in tar.getnames()}
        licence = tar.extractfile(f"{top}/LICENSE")
        assert licence is not None and licence.read().decode() == (ROOT / "LICENSE").read_text()
    for needed in (
        "LICENSE",
        "pyproject.toml",
        "mkdocs.yml",
        "tests/conftest.py",
        "tests/helpers/serve.py",
        "tests/helpers/rawpeer.py",
        "tests/helpers/lifecycle.py",
        "examples/ping_echo.py",
        "examples/typed_service.py",
        "docs/index.md",
        "docs/services.md",
        "benchmarks/echo.py",
    ):
        assert needed in names, needed
    for path in (ROOT / "tests" / "helpers").glob("*.py"):
        assert f"tests/helpers/{path.name}" in names, path.name
    assert not [n for n in names if "__pycache__" in n or n.startswith((".venv", "site/"))]


def test_the_sdist_tests_run_from_the_unpacked_sdist(
    built: tuple[Path, Path, str], tmp_path: Path
) -> None:
    _, sdist, _ = built
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    unpacked = tmp_path / f"ucxrpc-{VERSION}"
    pytest_args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    collected = _run([*pytest_args, "--collect-only"], unpacked)
    assert re.search(r"^\d+ tests collected", collected, re.M), collected
    # The sdist's own package, not the clone's: the current directory comes first.
    where = _run([sys.executable, "-c", "import ucxrpc; print(ucxrpc.__file__)"], unpacked)
    assert Path(where.strip()).is_relative_to(unpacked), where
    ran = _run([*pytest_args, "tests/test_wire.py"], unpacked)
    assert re.search(r"\d+ passed", ran) and "failed" not in ran, ran


def test_the_wheel_installs_and_runs_outside_the_clone(
    built: tuple[Path, Path, str], tmp_path: Path
) -> None:
    wheel, _, _ = built
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # With its dependencies (from the local wheels and the pip cache when they are there).
    _run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], tmp_path, timeout=800)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(python), "-c", "import ucxrpc; print(ucxrpc.__file__)"], elsewhere)
    assert Path(where.strip()).is_relative_to(env_dir), where  # the wheel, not the clone

    cli = str(env_dir / "bin" / "ucxrpc")
    info = _run([cli, "info"], elsewhere, timeout=120)
    assert re.search(rf"│ ucxrpc\s+│ {re.escape(VERSION)}\s+│", info), info
    assert re.search(r"│ UCX\s+│ \d+\.\d+", info), info
    demo = _run([cli, "demo"], elsewhere, timeout=120)
    assert re.search(r"round trip over \d+ pings: min [\d.]+ µs", demo), demo
    assert re.search(r"burst: (\d+)/\1 concurrent calls answered in", demo), demo
    assert "DeadlineExceeded" in demo, demo
