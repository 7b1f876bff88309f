"""Execute notebooks top to bottom, each in a fresh kernel, and record their wall times.

    python benchmarks/run_notebooks.py --out DIR [--budget SECONDS] [--cell-timeout SECONDS] NOTEBOOK...

The runner is :mod:`scicevpr.lab.runner` (the one ``scicevpr demo`` uses). The notebooks are not
modified: the executed copies go to DIR, beside ``timings.md`` and ``timings.json`` (status, wall
seconds and the slowest cells of each). A notebook that fails or runs out of time is written up
to the failing cell, and the next one still runs; with ``--budget``, notebooks that would start
after the budget is spent are skipped, and a cell is never given more than what is left of it.

Exit status 0 when every notebook ran to the end, 1 otherwise. Needs nbclient and ipykernel
(``pip install -e .[dev]``); pytest's nbval checks stored outputs instead (``make test``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

from scicevpr.lab.runner import run_notebook, use_this_python, write_timings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path, help="folder for the executed copies and the timings")
    p.add_argument("--budget", type=float, default=None, help="seconds for all notebooks together")
    p.add_argument("--cell-timeout", type=int, default=1800, help="seconds one cell may take")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    use_this_python()
    start = time.monotonic()
    deadline = start + args.budget if args.budget else float("inf")
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("SCICEVPR_") and not k.startswith("SCICEVPR_RUN_")}
    header = f"Notebooks run {datetime.datetime.now().isoformat(timespec='seconds')}, Python {sys.version.split()[0]}, " + (
        ", ".join(f"{k}={v}" for k, v in env.items()) or "no SCICEVPR_* variable set")
    rows = []
    for path in args.notebooks:
        left = deadline - time.monotonic()
        if left < 20:
            rows.append({"notebook": path.name, "status": "skipped: time budget spent", "seconds": None})
        else:
            print(f"[{time.monotonic() - start:6.1f} s] {path.name} ...", flush=True)
            rows.append(run_notebook(path, args.out, deadline, args.cell_timeout))
            print(f"[{time.monotonic() - start:6.1f} s] {path.name}: {rows[-1]['status']} ({rows[-1]['seconds']} s)", flush=True)
        write_timings(rows, args.out, header)  # after each notebook: a kill loses nothing written
    print(write_timings(rows, args.out, header))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
