"""The documentation agrees with the code."""

import re
import subprocess
from pathlib import Path

from fedsynth.config.reference import render, unused_help

ROOT = Path(__file__).parents[1]


def test_the_configuration_reference_is_what_the_code_generates():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == render(), "regenerate: python -m fedsynth.config.reference docs/configuration.md"
    assert unused_help() == []


def test_papers_are_named_by_their_authors_never_by_a_file_number():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    texts = [p for p in tracked if p.endswith((".py", ".md", ".toml", ".vy", ".yml"))]
    pattern = re.compile(r"\bseeds?[ /_]0\d\d\b", re.IGNORECASE)
    found = [p for p in texts if pattern.search((ROOT / p).read_text(errors="replace"))]
    assert found == []


def test_the_readme_is_short_with_the_two_commands_first():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 200
    assert readme[3].startswith("make demo") and readme[4].startswith("make test")
    assert [line for line in readme if len(line) > 300] == []


def test_the_readmes_links_lead_to_files_that_exist():
    for readme in (ROOT / "README.md", ROOT / "bench" / "README.md"):
        targets = re.findall(r"\]\(([^)#]+)\)", readme.read_text())
        missing = [t for t in targets if not (readme.parent / t).exists()]
        assert targets and missing == [], (readme, missing)


def test_the_sites_home_page_is_the_readme_with_links_made_site_relative():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    home = hooks.home_page()
    readme = (ROOT / "README.md").read_text()
    assert home.splitlines()[:5] == readme.splitlines()[:5]
    assert "](docs/" in readme and "](docs/" not in home and "(security.md)" in home
    assert "[`bench/README.md`](bench/README.md)" in readme
    assert "; `bench/README.md` lists" in home  # outside the site: its path, no link
