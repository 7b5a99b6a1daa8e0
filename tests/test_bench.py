"""Every bench script imports (fedsynth's names it uses still exist) and parses its arguments."""

import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_bench_script_imports_and_parses_its_arguments(script, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_the_bench_index_lists_every_script():
    index = (BENCH / "README.md").read_text()
    assert [p.name for p in SCRIPTS if f"`{p.name}`" not in index] == []


def test_every_result_sits_in_its_benchs_folder_where_the_bench_writes_it(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from _common import RESULTS, result_file

    files = sorted(p for p in RESULTS.rglob("*") if p.is_file())
    assert files and all(p.parent.parent == RESULTS for p in files), "a result outside a bench folder"
    assert {p.parent.name for p in files} <= {p.stem for p in SCRIPTS}
    assert [p for p in files if result_file(p.stem, p.suffix) != p] == []
    with pytest.raises(ValueError, match="names no bench script"):
        result_file("unknown-bench", ".json")
