"""mkdocs hooks, so each text lives in one place: the home page is the README (its links made
relative to the site), and the page ``results/tables.md`` gets every benchmark's own markdown
table from ``bench/results/<bench>/*.md`` appended at build time, so the site shows exactly what
the benches wrote."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
REPO_FILE = re.compile(r"\[([^\]]+)\]\((?!docs/|https?:)([^)]+)\)")  # a link to a file outside docs/


def home_page() -> str:
    """The README as the site's home: links into ``docs/`` made site-relative, links to other
    files of the repository kept as their paths in code."""
    text = (ROOT / "README.md").read_text()
    text = REPO_FILE.sub(lambda m: _as_path(m.group(1), m.group(2)), text)
    return text.replace("](docs/", "](")


def _as_path(label: str, target: str) -> str:
    return label if label.strip("`") == target else f"{label} (`{target}`)"


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "index.md":
        return home_page()
    if page.file.src_uri != "results/tables.md":
        return markdown
    parts = [markdown]
    for table in sorted(RESULTS.glob("*/*.md")):
        text = re.sub(r"^(#{1,5}) ", r"#\1 ", table.read_text(), flags=re.M)  # one level down
        text = re.sub(r"^## .*\n", "", text, count=1)  # its title: the section heading below names it
        parts.append(f"## `{table.relative_to(RESULTS)}`\n\n{text.strip()}\n")
    return "\n\n".join(parts)
