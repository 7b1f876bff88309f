"""Executing notebooks top to bottom, each in a fresh kernel of this Python: what ``scicevpr
demo`` runs (and stores in place) and what ``benchmarks/run_notebooks.py`` times.

Each notebook runs through nbclient with the current environment (so the ``SCICEVPR_*``
variables select the configuration) and with the notebook's own folder as working directory,
as under Jupyter. Its executed copy is tidied so that a re-run of an unchanged notebook leaves
an unchanged file: no widget state with random ids, one output per run of a stream's text.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def tidy_outputs(nb) -> bool:
    """Make a re-run of an unchanged notebook leave the file unchanged: remove from ``nb`` (an
    nbformat notebook, changed in place) what the interactive cells store with random ids (the
    widget state in the notebook's metadata, the widget views in the outputs; their text form
    stays; the widgets come back when the cell is run in Jupyter), and merge consecutive outputs of
    one stream (how a cell's printed text is cut into outputs depends on timing, not on the text).
    Returns whether anything changed."""
    changed = nb.metadata.pop("widgets", None) is not None
    for cell in nb.cells:
        merged = []
        for out in cell.get("outputs", []):
            if WIDGET_VIEW in out.get("data", {}):
                del out["data"][WIDGET_VIEW]
                changed = True
            last = merged[-1] if merged else None
            if (out.get("output_type") == "stream" and last is not None and last.get("output_type") == "stream"
                    and last.get("name") == out.get("name")):
                last["text"] += out["text"]
                changed = True
                continue
            merged.append(out)
        if "outputs" in cell:
            cell["outputs"] = merged
    return changed


KERNEL_NAME = "scicevpr-run-python3"


def use_this_python() -> Path:
    """A kernelspec that starts this Python, found first through JUPYTER_PATH, so that no
    kernel installed elsewhere on the machine is picked instead (call once per process; the
    temporary folder is removed when the process ends)."""
    root = Path(tempfile.mkdtemp(prefix="scicevpr-kernels-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
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


@contextlib.contextmanager
def kernel_transport():
    """The kernel manager's configuration for one notebook's kernel: where Unix sockets exist, the
    kernel talks to this process over them, in a private temporary folder removed afterwards,
    rather than over local TCP ports in plain text (which ipykernel warns about at every start);
    elsewhere (Windows) over local TCP, as Jupyter does."""
    from traitlets.config import Config

    config = Config()
    if os.name != "posix":
        yield config
        return
    with tempfile.TemporaryDirectory(prefix="scicevpr-kernel-", ignore_cleanup_errors=True) as folder:
        config.KernelManager.transport = "ipc"
        config.KernelManager.ip = str(Path(folder) / "kernel")  # absolute: the kernel runs in the notebook's folder
        yield config


def run_notebook(path: Path, out: Path, deadline: float = float("inf"), cell_timeout: int = 3600,
                 record_timing: bool = True) -> dict:
    """Execute ``path`` top to bottom in a fresh kernel of this Python (:func:`use_this_python`),
    in the notebook's folder, and write the executed notebook to ``out`` (a file, or a folder for
    a file of the same name; it may be ``path`` itself), tidied (:func:`tidy_outputs`). A failing
    or timed-out notebook is written up to the failing cell. ``record_timing`` stores each cell's
    start and end in its metadata (what :func:`cell_seconds` reads; not wanted in a stored
    notebook). Returns the notebook's status (``"ok"`` or what went wrong), wall seconds and
    slowest cells."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    kernelspec = nb.metadata.get("kernelspec")

    def timeout_for(cell) -> int:
        left = deadline - time.monotonic()
        return cell_timeout if left >= cell_timeout else max(5, int(left))

    t0 = time.perf_counter()
    status = "ok"
    try:
        with kernel_transport() as config:
            client = NotebookClient(
                nb, kernel_name=KERNEL_NAME, timeout=cell_timeout, timeout_func=timeout_for,
                record_timing=record_timing, resources={"metadata": {"path": str(path.parent.resolve())}},
                startup_timeout=120, config=config,
            )
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
    if kernelspec is not None:
        nb.metadata["kernelspec"] = kernelspec  # the notebook's own, not the temporary one that ran it
    tidy_outputs(nb)
    nbformat.write(nb, out / path.name if out.is_dir() else out)
    slowest = sorted(cell_seconds(nb), key=lambda c: -c[1])[:3]
    code = [c for c in nb.cells if c.cell_type == "code"]
    return {"notebook": path.name, "status": status, "seconds": round(seconds, 1),
            "cells_run": sum(c.get("execution_count") is not None for c in code), "cells": len(code),
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


