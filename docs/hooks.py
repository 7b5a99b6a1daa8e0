"""mkdocs hook: the page ``results/tables.md`` gets every benchmark's own markdown table from
``bench/results/<bench>/*.md`` appended at build time, so the site shows exactly what the benches wrote."""

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != "results/tables.md":
        return markdown
    parts = [markdown]
    for table in sorted(RESULTS.glob("*/*.md")):
        text = re.sub(r"^(#{1,5}) ", r"#\1 ", table.read_text(), flags=re.M)  # one level down
        text = re.sub(r"^## .*\n", "", text, count=1)  # its title: the section heading below names it
        parts.append(f"## `{table.relative_to(RESULTS)}`\n\n{text.strip()}\n")
    return "\n\n".join(parts)
