"""Result files name the machine their runs recorded, and nothing fills in a machine a run did not record."""

import json
from pathlib import Path

import pytest

from fastdm.machine import cpu_stem, machine_name, runs_machines

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


@pytest.mark.parametrize("model,cores,want", [
    ("AMD EPYC", 2, "cpu-amd-epyc-2core-x86_64"),
    ("Intel(R) Xeon(R) Processor @ 2.50GHz", 2, "cpu-intel-xeon-2-50ghz-2core-x86_64"),
    ("AMD Ryzen 9 7950X 16-Core Processor", 32, "cpu-amd-ryzen-9-7950x-32core-x86_64"),
    ("Intel(R) Core(TM) i9-13900K", 32, "cpu-intel-core-i9-13900k-32core-x86_64"),
    ("", 4, "cpu-unknown-4core-x86_64"),
])
def test_cpu_stem_names_the_model(model, cores, want):
    assert cpu_stem(model, cores, "x86_64") == want


def test_two_cpus_with_equal_cores_get_two_names():
    assert cpu_stem("AMD EPYC", 2, "x86_64") != cpu_stem("Intel(R) Xeon(R) Processor @ 2.50GHz", 2, "x86_64")
    assert machine_name().startswith("cpu-") and "core-" in machine_name()


def test_runs_machines_counts_and_never_invents():
    a = {"machine": "cpu-a-2core-x86_64", "machine_description": "A, 2 cores"}
    b = {"machine": "cpu-b-2core-x86_64", "machine_description": "B, 2 cores"}
    assert runs_machines([a, a]) == (["cpu-a-2core-x86_64"], "A, 2 cores")
    stems, said = runs_machines([a, b, b, {}])
    assert stems == ["cpu-a-2core-x86_64", "cpu-b-2core-x86_64"]
    assert said == "2 runs on B, 2 cores; 1 runs on A, 2 cores; 1 runs on a machine the run did not record"
    assert runs_machines([{}]) == ([], "a machine the run did not record")


def _stem_machine(name: str) -> str | None:
    """The machine part of a committed result's name (``cpu-...-<n>core-<arch>``), if it has one."""
    parts = name.split(".runs.jsonl")[0].split(".json")[0].split("-")
    for i, p in enumerate(parts):
        if p == "cpu":
            for j in range(i + 1, len(parts)):
                if parts[j].endswith("core"):
                    return "-".join(parts[i: j + 2])
    return None


def test_committed_run_caches_hold_only_the_machine_of_their_name():
    caches = sorted(RESULTS.glob("*.runs.jsonl"))
    assert caches, "no committed run caches"
    for f in caches:
        machine = _stem_machine(f.name)
        assert machine, f"{f.name}: no machine in the name"
        recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        stems = {r.get("machine") for r in recs}
        if "-mixed-" in machine:
            assert len(stems) > 1, f"{f.name} is named mixed but its runs recorded one machine: {stems}"
        else:
            assert stems == {machine}, f"{f.name}: runs recorded {stems}"


def test_committed_tables_name_their_machine():
    for f in sorted(RESULTS.glob("*.json")):
        meta = json.loads(f.read_text()).get("meta")
        if not isinstance(meta, dict) or "machine" not in meta:
            continue
        name = meta.get("name") or meta["machine"]
        assert name in f.name, f"{f.name}: meta names {name}"
        if meta["machine"].startswith("cpu-") and "-mixed-" not in meta["machine"]:
            model = meta.get("machine_description", "")
            assert model and "did not record" not in model, f"{f.name}: no machine description for {meta['machine']}"
