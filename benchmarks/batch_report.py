"""The results table of a ``fastdm-batch`` run, from the run's own files (its ``summary.json`` and
``results.jsonl``), never typed in by hand.

    fastdm-batch examples/shapes_jobs.jsonl --out runs --workers 2 --checkpoint-every 2
    python -m benchmarks.batch_report runs --name shapes-jobs [--note "..."]

Writes ``results/batch-<name>-<machine>.{json,md}``: per job its status, attempts, worker deaths,
resumed step, steps, model evaluations, seconds and output or error; the run's wall time, edits per
hour and workers; the machine as the run recorded it in its summary (also in the file name), whichever
machine writes the report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import write_results


def table(summary: dict, results: list[dict]) -> str:
    rows = ["| line | status | attempts | worker deaths | resumed from step | steps | forward evals | backward | job s | output / error |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r["line"]):
        ev = r.get("evaluations") or {}
        t = (r.get("timings") or {}).get("job_s")
        what = r.get("output", "") if r.get("status") == "done" else (r.get("error") or "")
        rows.append(f"| {r['line']} | {r.get('status', '?')} | {r.get('attempts', '')} | {r.get('deaths', '')} | "
                    f"{r.get('resumed_from_step') if r.get('resumed_from_step') is not None else '-'} | "
                    f"{r.get('steps_run', '-')} | {ev.get('forward', '-')} | {ev.get('backward', '-')} | "
                    f"{f'{t:.1f}' if t else '-'} | {what} |")
    s = summary["this_run"]
    rows += ["", f"This run: done {s['done']}, failed {s['failed']}, retried {s['retried']}, skipped {s['skipped']}; wall "
                 f"{s['wall_s']} s with {s['workers']} worker(s); {s['edits_per_hour']} edits/hour. All jobs: "
                 f"{summary['done']} done, {summary['failed']} failed of {summary['jobs']}."]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the --out folder of the fastdm-batch run")
    ap.add_argument("--name", required=True, help="name part of the result files: batch-NAME-<machine>")
    ap.add_argument("--command", default=None, help="the fastdm-batch command that was run (printed in the table)")
    ap.add_argument("--note", default="", help="what else happened during the run (a worker killed, other load)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    summary = json.loads((out / "summary.json").read_text())
    latest: dict[int, dict] = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a torn last line
        latest[int(r["line"])] = r
    results = list(latest.values())
    # the machine the batch recorded for itself (its summary), not the one this report runs on
    machine = summary.get("machine_name") or "machine-not-recorded"
    meta = {"machine": machine, "machine_description": summary.get("machine") or "not recorded by the run",
            "command": args.command, "note": args.note,
            "summary": summary["this_run"]}
    md = "\n".join([f"# fastdm-batch: {args.name} ({machine})", "",
                    f"Machine: {meta['machine_description']}." + (f" Command: `{args.command}`." if args.command else ""),
                    *([args.note] if args.note else []), "", table(summary, results), "",
                    f"Written by `python -m benchmarks.batch_report {args.out} --name {args.name}` from the run's "
                    "summary.json and results.jsonl."]) + "\n"
    write_results(f"batch-{args.name}-{machine}", {"meta": meta, "results": results}, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
