"""A whole real scan through the command line's own path (reader, planner, tiles, writer), timed per stage.

  python benchmarks/whole_scan.py --label after --out benchmarks/results/whole_scan.json \
      [--input ../shared/data/thick/pyradiomics-lung1_chest_5mm.nii.gz] [-- EXTRA CLI ARGS]

Runs `python -m evaluation.interpolate --input SCAN` in a fresh process (its own peak memory), keeps its
stage lines and when its first line came, and adds one run under `--label` to the results file (earlier labels are kept, so the file
holds the before and after of every speed change): per-stage seconds from the command's cases.json, the
first stage line's time, peak RSS (GNU time's maximum resident set), the CPU and the precision.
`--existing DIR` records a run already made (DIR/cases.json, DIR/stdout.log, DIR/time.log) instead.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from thinslice.atomic import write_json
from thinslice.precision import choose, cpu_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = ROOT.parent / "shared" / "data" / "thick" / "pyradiomics-lung1_chest_5mm.nii.gz"
STAGE = re.compile(r"^\[\s*([\d.]+) s, peak\s+([\d.]+) GB\] (.*)$")


def stage_lines(log: str) -> list[dict]:
    """The command's stage lines, each with its start and how long it took (until the next line; the last one,
    writing the output, has none)."""
    lines = [{"at_s": float(m[1]), "what": m[3]} for line in log.replace("\r", "\n").splitlines()
             if (m := STAGE.match(line))]
    for a, b in zip(lines, lines[1:]):
        a["seconds"] = round(b["at_s"] - a["at_s"], 1)
    return lines


def max_rss_gib(time_log: str) -> float | None:
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_log)
    return round(int(m[1]) / 2**20, 2) if m else None


def run_cli(scan: Path, out: Path, extra: list[str]) -> tuple[float, float | None]:
    """(wall seconds, seconds from the process's start to its first line of output)."""
    cmd = [sys.executable, "-m", "evaluation.interpolate", "--input", str(scan), "--output", str(out), *extra]
    timer = ["/usr/bin/time", "-v", "-o", str(out / "time.log")] if Path("/usr/bin/time").exists() else []
    out.mkdir(parents=True, exist_ok=True)
    t0, first = time.perf_counter(), None
    with open(out / "stdout.log", "w") as log:
        proc = subprocess.Popen(timer + cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True)
        for line in proc.stdout:
            first = first if first is not None else time.perf_counter() - t0
            log.write(line)
        rc = proc.wait()
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {out / 'stdout.log'}")
    return time.perf_counter() - t0, first


def record(out: Path, wall: float | None, first: float | None, scan: Path, extra: list[str]) -> dict:
    (case,) = json.loads((out / "cases.json").read_text())
    log = (out / "stdout.log").read_text()
    lines = stage_lines(log)
    time_log = out / "time.log"
    return {"input": scan.name, "input_shape": case["input_shape"], "output_shape": case["output_shape"],
            "cli_args": extra, "seconds": case["seconds"], "wall_s": None if wall is None else round(wall, 1),
            "first_line_s": None if first is None else round(first, 1),
            "peak_rss_gib": max_rss_gib(time_log.read_text()) if time_log.exists() else case.get("peak_rss_gb"),
            "output_voxels_per_s": round(float(torch.tensor(case["output_shape"]).prod()) / case["seconds"]["case"]),
            "tiles": case.get("tiles"), "stages": lines}


def git_commit() -> str | None:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    p.add_argument("--label", required=True, help="name of this run in the results file (e.g. before, after)")
    p.add_argument("--out", type=Path, required=True, help="results JSON (runs under other labels are kept)")
    p.add_argument("--existing", type=Path, help="record this finished output folder instead of running")
    p.add_argument("--commit", help="the code's commit (default: git HEAD)")
    a = p.parse_args(argv)
    if not a.input.exists():
        p.error(f"{a.input} not found (the whole-scan benchmark reads real CT from ../shared/data)")
    if a.existing:
        row = record(a.existing, None, None, a.input, extra)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            wall, first = run_cli(a.input, Path(tmp) / "out", extra)
            row = record(Path(tmp) / "out", wall, first, a.input, extra)
    row.update({"cpu": cpu_model(), "precision": str(choose("cpu")), "threads": torch.get_num_threads(),
                "torch": torch.__version__, "commit": a.commit or git_commit(), "date": time.strftime("%Y-%m-%d")})
    results = json.loads(a.out.read_text()) if a.out.exists() else {
        "source": "python benchmarks/whole_scan.py --label LABEL --out " + str(a.out) + " [-- CLI ARGS]",
        "what": "one whole real scan through `python -m evaluation.interpolate --input SCAN` (defaults, shipped "
                "weights): per-stage seconds from its cases.json, first line of output (from the process's start), peak RSS", "runs": {}}
    results["runs"][a.label] = row
    write_json(a.out, results)
    s = row["seconds"]
    print(f"{a.label}: {row['input']} {row['input_shape']} -> {row['output_shape']} in {s['case']:.0f} s "
          f"({row['output_voxels_per_s']:,} voxels/s), first line {row['first_line_s']} s, peak {row['peak_rss_gib']} GiB; "
          + ", ".join(f"{k} {v:.0f} s" for k, v in s.items() if k not in ("case", "total")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
