"""Execute notebooks top to bottom, each in a fresh kernel, and record their wall times.

    python benchmarks/run_notebooks.py --out DIR [--budget SECONDS] [--cell-timeout SECONDS] NOTEBOOK...

Each notebook runs through nbclient in an IPython kernel of this very Python
(``sys.executable``) with the current environment, so the ``SCICEVPR_*`` variables select the
configuration, and with the notebook's own folder as working directory, as under Jupyter. The
notebooks are not modified: the executed copies go to DIR, beside ``timings.md`` and
``timings.json`` (status, wall seconds and the slowest cells of each). A notebook that fails or
runs out of time is written up to the failing cell, and the next one still runs; with
``--budget``, notebooks that would start after the budget is spent are skipped, and a cell is
never given more than what is left of it.

Exit status 0 when every notebook ran to the end, 1 otherwise. Needs nbclient and ipykernel
(``pip install -e .[dev]``); pytest's nbval checks stored outputs instead (``make test``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

KERNEL_NAME = "scicevpr-run-python3"


def _kernelspec_dir() -> Path:
    """A kernelspec that starts this Python, found first through JUPYTER_PATH, so that no
    kernel installed elsewhere on the machine is picked instead."""
    root = Path(tempfile.mkdtemp(prefix="scicevpr-kernels-"))
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python {sys.version_info.major}.{sys.version_info.minor} (this interpreter)",
        "language": "python",
    }))
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("JUPYTER_PATH")])])
    return root


def _iso(value) -> datetime.datetime | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def cell_seconds(nb) -> list[tuple[int, float, str]]:
    """(code cell number from 1, seconds, first line) of each executed cell, from nbclient's
    timing metadata."""
    out = []
    number = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        number += 1
        ex = cell.get("metadata", {}).get("execution", {})
        start, end = _iso(ex.get("iopub.execute_input")), _iso(ex.get("shell.execute_reply"))
        if start and end:
            first = next((l for l in cell.source.splitlines() if l.strip() and not l.startswith("#")), "")
            out.append((number, (end - start).total_seconds(), first[:70]))
    return out


def run_notebook(path: Path, out_dir: Path, deadline: float, cell_timeout: int) -> dict:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)

    def timeout_for(cell) -> int:
        return max(5, min(cell_timeout, int(deadline - time.monotonic())))

    client = NotebookClient(
        nb, kernel_name=KERNEL_NAME, timeout=cell_timeout, timeout_func=timeout_for, record_timing=True,
        resources={"metadata": {"path": str(path.parent.resolve())}}, startup_timeout=120,
    )
    t0 = time.perf_counter()
    status = "ok"
    try:
        client.execute()
    except CellTimeoutError as e:
        status = f"timeout: {str(e).splitlines()[0][:200]}"
    except CellExecutionError as e:
        status = f"error: {e.ename}: {str(e.evalue)[:200]}"
    except DeadKernelError as e:
        status = f"kernel died: {e}"
    except Exception as e:  # noqa: BLE001 - recorded, and the next notebook still runs
        status = f"failed: {type(e).__name__}: {str(e)[:200]}"
    seconds = time.perf_counter() - t0
    nbformat.write(nb, out_dir / path.name)
    cells = cell_seconds(nb)
    slowest = sorted(cells, key=lambda c: -c[1])[:3]
    return {"notebook": path.name, "status": status, "seconds": round(seconds, 1),
            "cells_run": len(cells), "cells": sum(c.cell_type == "code" for c in nb.cells),
            "slowest": [{"cell": n, "seconds": round(s, 1), "code": src} for n, s, src in slowest]}


def write_timings(rows: list[dict], out_dir: Path, header: str) -> str:
    lines = [header, "", "| notebook | status | wall s | code cells run | slowest cells (s) |", "|---|---|---:|---:|---|"]
    for r in rows:
        slow = "; ".join(f"#{c['cell']} {c['seconds']:.1f} `{c['code']}`" for c in r.get("slowest", []))
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['notebook']} | {r['status']} | {seconds} | {r.get('cells_run', 0)}/{r.get('cells', '-')} | {slow} |")
    total = sum(r["seconds"] or 0 for r in rows)
    lines += ["", f"total {total:.1f} s"]
    text = "\n".join(lines) + "\n"
    (out_dir / "timings.md").write_text(text)
    (out_dir / "timings.json").write_text(json.dumps({"header": header, "notebooks": rows}, indent=2) + "\n")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path, help="folder for the executed copies and the timings")
    p.add_argument("--budget", type=float, default=None, help="seconds for all notebooks together")
    p.add_argument("--cell-timeout", type=int, default=1800, help="seconds one cell may take")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    _kernelspec_dir()
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
