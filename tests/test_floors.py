"""The declared dependency floors are versions the tests ran on: each floor in pyproject.toml is the version of
CI's pinned set (.ci/constraints.txt, the set the whole suite runs on), and the newest set is at or above them."""

import re
import tomllib
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pins(name: str) -> dict[str, Version]:
    out = {}
    for line in (ROOT / ".ci" / name).read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            pkg, ver = line.split("==")
            out[pkg.strip().lower()] = Version(ver.strip().split("+")[0])
    return out


def _floors() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for r in project["optional-dependencies"]["wan"]]
    out = {}
    for r in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", r.split(";")[0].strip())
        assert m, f"{r!r}: every dependency declares a floor (>=)"
        out[m.group(1).lower()] = Version(m.group(2))
    return out


def test_every_floor_is_a_version_the_whole_suite_ran_on():
    pinned = _pins("constraints.txt")
    for pkg, floor in _floors().items():
        assert pkg in pinned, f"{pkg} is not in the pinned set"
        assert floor.release == pinned[pkg].release[:len(floor.release)], f"{pkg}>={floor}: the pinned set runs {pinned[pkg]}"


def test_the_newest_set_is_not_below_the_floors():
    newest = _pins("constraints-newest.txt")
    for pkg, floor in _floors().items():
        if pkg in newest:
            assert newest[pkg] >= floor, f"{pkg}: newest set {newest[pkg]} < floor {floor}"
