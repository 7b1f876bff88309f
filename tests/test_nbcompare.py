"""The tolerance comparison of notebook outputs used by `make test-native-kernels`."""

from __future__ import annotations

import nbformat

from nbcompare import compare_notebooks, compare_text, load_sanitizers, numbers_close


def test_numbers_within_the_stated_tolerance():
    assert numbers_close("34.4", "35.2") and numbers_close("7", "8")  # a query more; another best epoch
    assert numbers_close("13.33", "20.00")  # one query of 15
    assert not numbers_close("34.4", "50.0") and not numbers_close("2", "12") and not numbers_close("7.20", "30.00")
    assert numbers_close("1.7588", "1.7591") and not numbers_close("1.7588", "2.1")
    assert numbers_close("0.216", "0.217") and not numbers_close("0.216", "0.9")


def test_text_must_be_the_same_once_numbers_are_taken_out():
    assert compare_text("R@1 4.8%, R@5 17.6%\n", "R@1 4.0%, R@5 17.6%\n") is None
    assert "not within tolerance" in compare_text("R@1 4.8%\n", "R@1 40.0%\n")
    assert "text differs" in compare_text("teacher R@1 4.8\n", "student R@1 4.8\n")
    assert compare_text("<td>True</td><td>NaN</td>", "<td>NaN</td><td>True</td>") is None
    assert compare_text("a  1.5   2\n", "a 1.5  2\n") is None


def _nb(*outputs: str, source: str = "x") -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    for text in outputs:
        cell = nbformat.v4.new_code_cell(source)
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
        nb.cells.append(cell)
    return nb


def test_notebook_comparison_reports_each_cell_and_skips_ignored_ones(tmp_path):
    stored, same, worse = _nb("loss 1.50\n", "R@1 10.4\n"), _nb("loss 1.51\n", "R@1 11.2\n"), _nb("loss 1.50\n", "R@1 30.0\n")
    assert compare_notebooks(stored, same, []) == []
    diffs = compare_notebooks(stored, worse, [])
    assert [d.cell for d in diffs] == [1]
    ignored = _nb("R@1 10.4\n", source="# NBVAL_IGNORE_OUTPUT\nx")
    assert compare_notebooks(ignored, _nb("R@1 90.0\n", source="# NBVAL_IGNORE_OUTPUT\nx"), []) == []
    ids = lambda text: _nb(text, source="# NBCOMPARE_TEXT_ONLY\nx")  # noqa: E731
    assert compare_notebooks(ids("query 80 -> database 74\n"), ids("query 3 -> database 250\n"), []) == []
    assert [d.cell for d in compare_notebooks(ids("query 80 -> database 74 (the same image)\n"),
                                              ids("query 3 -> database 250 (another image)\n"), [])] == [0]
    cfg = tmp_path / "s.cfg"
    cfg.write_text("[paths]\nregex: /tmp/\\S+\nreplace: <path>\n")
    rules = load_sanitizers(cfg)
    assert compare_notebooks(_nb("at /tmp/a1\n"), _nb("at /tmp/b2\n"), rules) == []
