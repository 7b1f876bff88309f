"""Execute notebooks and compare their outputs with the stored ones *within a stated tolerance*.

nbval compares outputs exactly, which is right when the arithmetic is the same (the ``make``
targets pin the CPU kernels, see ``scicevpr/precision.py``). With the CPU's own kernels, last-bit
differences grow through training into a different best epoch or a query more or less found, so
``make test-native-kernels`` checks the training notebooks with this script instead:

* the text of every output (stdout, ``text/plain``, ``text/html``) must be the same once every
  number is taken out, after the rules of ``notebooks/sanitize.cfg``;
* each number must be close to the stored one: ``|new - stored| <= RTOL * |stored| + atol``,
  with ``RTOL`` = 0.1 and ``atol = COARSE_ATOL`` (7.0) for numbers printed with at most two
  decimals (recalls in percent: one query of a 15-query condition is 6.7 points, of the
  125-query test split 0.8; epochs; counts), ``FINE_ATOL`` (0.05) for the others (losses with
  four decimals, cosines and fractions with three);
* runs of spaces count as one (pandas pads columns to the widest number);
* the marks ``True`` / ``False`` / ``NaN`` / ``None`` in tables may change places (the best
  epoch's mark follows the best epoch);
* cells marked ``# NBCOMPARE_TEXT_ONLY`` print identifiers, such as the index of the query whose
  best match flips, that other kernels legitimately change (another query flips first): their
  text is compared with every number taken out, their numbers are not (nbval, with the pinned
  kernels, still compares them exactly);
* cells marked ``# NBVAL_IGNORE_OUTPUT`` and images are not compared (as under nbval).

    python tests/nbcompare.py notebooks/04_distillation_training.ipynb notebooks/05_benchmark_evaluation.ipynb

Exit status 0 when every notebook holds, 1 otherwise (each difference is printed).
"""

from __future__ import annotations

import argparse
import configparser
import re
import sys
from dataclasses import dataclass
from pathlib import Path

NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
FLAG = re.compile(r"\b(?:True|False|NaN|nan|None)\b")  # table marks such as the best epoch's
RTOL = 0.1
COARSE_ATOL = 7.0
FINE_ATOL = 0.05
TEXT_MIMES = ("text/plain", "text/html")
TEXT_ONLY = "NBCOMPARE_TEXT_ONLY"


@dataclass
class Difference:
    cell: int
    what: str

    def __str__(self) -> str:
        return f"cell {self.cell}: {self.what}"


def load_sanitizers(path: Path | None) -> list[tuple[re.Pattern, str]]:
    """The regex / replacement pairs of an nbval sanitize file."""
    if path is None or not path.is_file():
        return []
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    return [(re.compile(parser[s]["regex"]), parser[s]["replace"]) for s in parser.sections()]


def sanitize(text: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


def _decimals(token: str) -> int:
    mantissa = token.lower().split("e")[0]
    return len(mantissa.split(".")[1]) if "." in mantissa else 0


def numbers_close(stored: str, new: str) -> bool:
    a, b = float(stored), float(new)
    atol = COARSE_ATOL if max(_decimals(stored), _decimals(new)) <= 2 else FINE_ATOL
    return abs(b - a) <= RTOL * abs(a) + atol


def compare_text(stored: str, new: str, numbers: bool = True) -> str | None:
    """None when ``new`` holds against ``stored``, else a description of the first difference.
    ``numbers=False``: only the text with the numbers taken out is compared."""
    def shape(text: str) -> str:
        return re.sub(r"[ \t]+", " ", NUMBER.sub("#", FLAG.sub("?", text)))

    if shape(stored) != shape(new):
        s, n = shape(stored).splitlines(), shape(new).splitlines()
        for i, (x, y) in enumerate(zip(s, n)):
            if x != y:
                return f"text differs at line {i + 1}: {x.strip()!r} != {y.strip()!r}"
        return f"{len(s)} lines stored, {len(n)} now"
    if not numbers:
        return None
    for x, y in zip(NUMBER.findall(stored), NUMBER.findall(new)):
        if not numbers_close(x, y):
            return f"{y} is not within tolerance of the stored {x}"
    return None


def _texts(outputs: list[dict]) -> list[tuple[str, str]]:
    out = []
    for o in outputs:
        if o.get("output_type") == "stream" and o.get("name") == "stdout":
            out.append(("stdout", "".join(o["text"]) if isinstance(o["text"], list) else o["text"]))
        elif o.get("output_type") in ("execute_result", "display_data"):
            data = o.get("data", {})
            for mime in TEXT_MIMES:
                if mime in data:
                    text = data[mime]
                    out.append((mime, "".join(text) if isinstance(text, list) else text))
                    break
    # consecutive stdout chunks are one stream
    merged: list[tuple[str, str]] = []
    for kind, text in out:
        if merged and kind == "stdout" and merged[-1][0] == "stdout":
            merged[-1] = ("stdout", merged[-1][1] + text)
        else:
            merged.append((kind, text))
    return merged


def compare_notebooks(stored_nb, new_nb, rules) -> list[Difference]:
    diffs = []
    stored_cells = [c for c in stored_nb.cells if c.cell_type == "code"]
    new_cells = [c for c in new_nb.cells if c.cell_type == "code"]
    for i, (s, n) in enumerate(zip(stored_cells, new_cells)):
        if "NBVAL_IGNORE_OUTPUT" in s.source:
            continue
        st = [(k, sanitize(t, rules)) for k, t in _texts(s.get("outputs", []))]
        nt = [(k, sanitize(t, rules)) for k, t in _texts(n.get("outputs", []))]
        if [k for k, _ in st] != [k for k, _ in nt]:
            diffs.append(Difference(i, f"outputs {[k for k, _ in st]} stored, {[k for k, _ in nt]} now"))
            continue
        for (kind, a), (_, b) in zip(st, nt):
            problem = compare_text(a, b, numbers=TEXT_ONLY not in s.source)
            if problem:
                diffs.append(Difference(i, f"{kind}: {problem}"))
    return diffs


def execute(path: Path, timeout: int):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--sanitize-with", type=Path, default=Path("notebooks/sanitize.cfg"))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    import nbformat

    rules = load_sanitizers(args.sanitize_with)
    failed = 0
    for path in args.notebooks:
        stored = nbformat.read(path, as_version=4)
        diffs = compare_notebooks(stored, execute(path, args.timeout), rules)
        print(f"{path}: {'holds within tolerance' if not diffs else f'{len(diffs)} difference(s)'}")
        for d in diffs:
            print(f"  {d}")
        failed += bool(diffs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
