"""One version, kept in fastdm/version.py: the package, the installed metadata and every command's --version."""

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import fastdm
from fastdm.version import __version__

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("fastdm-edit", "fastdm-batch", "fastdm-app", "fastdm-bench", "fastdm-comfy")


def test_the_version_lives_in_one_place():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastdm.version.__version__"}
    assert fastdm.__version__ == __version__ == importlib.metadata.version("fastdm")
    assert f"## {__version__}" in (ROOT / "CHANGELOG.md").read_text()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_prints_it(command):
    script = Path(sys.executable).parent / command
    p = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == f"{command} {__version__}", (p.stdout, p.stderr)
