"""Start-up time of the command line and of the package, each in fresh processes, side by side.

    python benchmarks/startup.py [--runs 10] [--note "shared with a background benchmark"]

Six commands take turns, in an order rotated every round so that load from other jobs hits them alike; each runs
once untimed first, to warm the file cache and write the bytecode:

- `python`: the bare interpreter (`python -c pass`), the least any command costs;
- `floor`: `import torch; from transformers import PreTrainedModel`, the least a transformers model package imports;
- `import qg_tokenizer`: the package, which registers its models with the Auto classes (target: within 10% of the
  floor, judged by the median over rounds of the paired ratio, which cancels load that changes between rounds);
- `--help` and `argument error` (`compress` of a missing file): the console script, whose front (`qg_tokenizer_cli`)
  parses and checks the arguments before importing torch (target: a median under `--max-cli-seconds`);
- `qg_tokenizer.cli`: the commands module, which every call imported before parsing until the front took over, so
  this is what `--help` cost before;
- `floor, then package`: the floor, then `import qg_tokenizer`, timed apart inside one process: what the package
  adds to the floor, free of the load changes between processes (the second judge of the 10% target).

Each command also runs once under `python -X importtime` to record which of the heavy modules it imports. Prints
best and median seconds and the ratios to the floor; writes benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tokenize import interleaved_seconds  # noqa: E402

CONSOLE_SCRIPT = Path(sys.executable).with_name("qg-tokenizer")
WATCHED = ("torch", "transformers", "qg_tokenizer", "datasets", "diffusers", "matplotlib", "accelerate", "numpy", "PIL")
MAX_RATIO_TO_FLOOR = 1.10
CLI_ROWS = ("--help", "argument error")
SPLIT = ("import time; start = time.perf_counter(); import torch; from transformers import PreTrainedModel; "
         "floor = time.perf_counter(); import qg_tokenizer; print(floor - start, time.perf_counter() - floor)")


def commands() -> dict[str, tuple[list[str], int]]:
    """Name -> (argv, expected exit status)."""
    python = [sys.executable, "-c"]
    missing = ["compress", "missing.png", "--model", "some-org/some-model", "-o", "out.qgt"]
    return {
        "python": (python + ["pass"], 0),
        "floor": (python + ["import torch; from transformers import PreTrainedModel"], 0),
        "import qg_tokenizer": (python + ["import qg_tokenizer"], 0),
        "--help": ([str(CONSOLE_SCRIPT), "--help"], 0),
        "argument error": ([str(CONSOLE_SCRIPT), *missing], 1),
        "qg_tokenizer.cli": (python + ["import qg_tokenizer.cli"], 0),
        "floor, then package": (python + [SPLIT], 0),
    }


def run(argv: list[str], status: int, cwd: str) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=600)
    if result.returncode != status:
        raise RuntimeError(f"{argv} exited {result.returncode}, expected {status}: {result.stderr[-2000:]}")
    return result


def imported_modules(argv: list[str], status: int, cwd: str) -> set[str]:
    """The top-level modules `argv` (a Python command or script) imports, from `python -X importtime`."""
    if argv[0] != sys.executable:  # a console script: run its file with this interpreter
        argv = [sys.executable, *argv]
    stderr = run([argv[0], "-X", "importtime", *argv[1:]], status, cwd).stderr
    lines = [line.split("|")[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")]
    return {name.split(".")[0] for name in lines[1:]}  # the first line is the header


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each command")
    parser.add_argument("--max-cli-seconds", type=float, default=0.5, help="target median of --help and errors")
    parser.add_argument("--note", default="", help="how the machine was used meanwhile, recorded in the JSON")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "startup.json")
    args = parser.parse_args()
    if not CONSOLE_SCRIPT.exists():
        raise SystemExit(f"{CONSOLE_SCRIPT} does not exist: run `pip install -e .`")

    table = commands()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as cwd:  # the argument error's missing file and output are relative to it
        imports = {name: sorted(imported_modules(*command, cwd) & set(WATCHED)) for name, command in table.items()}
        for command in table.values():  # warm-up
            run(*command, cwd)
        splits = []  # (floor, package) seconds inside the `floor, then package` processes

        def timed(name: str):
            def once(_):
                stdout = run(*table[name], cwd).stdout
                if name == "floor, then package":
                    splits.append([float(x) for x in stdout.split()])

            return once

        seconds = interleaved_seconds({name: timed(name) for name in table}, args.runs, 1)
    seconds = {name: s[0] for name, s in seconds.items()}  # [runs]
    splits = np.array(splits)
    floor = float(np.median(seconds["floor"]))
    rows = {
        name: {
            "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(table[name][0])),
            "seconds": [round(float(t), 4) for t in s],
            "best_s": float(s.min()),
            "median_s": float(np.median(s)),
            "ratio_to_floor": float(np.median(s)) / floor,
            "paired_ratio_to_floor": float(np.median(s / seconds["floor"])),
            "imports": imports[name],
        }
        for name, s in seconds.items()
    }
    rows["floor, then package"] |= {
        "in_process_floor_median_s": float(np.median(splits[:, 0])),
        "in_process_package_median_s": float(np.median(splits[:, 1])),
        "in_process_package_fraction_of_floor": float(np.median(splits[:, 1] / splits[:, 0])),
    }
    extra = rows["floor, then package"]["in_process_package_fraction_of_floor"]
    cli_median = max(rows[name]["median_s"] for name in CLI_ROWS)
    results = {
        "command": "python benchmarks/startup.py " + " ".join(sys.argv[1:]),
        "runs": args.runs,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            **{package: importlib.metadata.version(package) for package in ("torch", "transformers")},
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "note": args.note,
        },
        "rows": rows,
        "targets": {"import_max_paired_ratio_to_floor": MAX_RATIO_TO_FLOOR, "cli_max_median_s": args.max_cli_seconds},
        "targets_met": {
            "import_paired": rows["import qg_tokenizer"]["paired_ratio_to_floor"] <= MAX_RATIO_TO_FLOOR,
            "import_in_process": 1 + extra <= MAX_RATIO_TO_FLOOR,
            "cli": cli_median <= args.max_cli_seconds,
            "cli_imports_no_torch": not any(
                {"torch", "transformers", "qg_tokenizer"} & set(rows[name]["imports"]) for name in CLI_ROWS
            ),
        },
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")

    print(f"{'command':<22} {'best s':>8} {'median s':>9} {'x floor':>8} {'paired':>7}  heavy imports")
    for name, row in rows.items():
        heavy = ", ".join(m for m in row["imports"] if m not in ("numpy", "PIL")) or "-"
        print(f"{name:<22} {row['best_s']:8.3f} {row['median_s']:9.3f} {row['ratio_to_floor']:8.3f} "
              f"{row['paired_ratio_to_floor']:7.3f}  {heavy}")  # fmt: skip
    print(f"in one process: floor {rows['floor, then package']['in_process_floor_median_s']:.3f} s, then the package "
          f"+{rows['floor, then package']['in_process_package_median_s']:.3f} s (+{extra:.1%}, median)")  # fmt: skip
    print(f"targets met: {results['targets_met']}; wrote {args.output}")


if __name__ == "__main__":
    main()
