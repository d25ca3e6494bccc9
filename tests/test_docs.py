"""The README and docs/ as a reader meets them: every relative link resolves, every generated table is
current.

A link is checked as GitHub renders it: relative to the page that holds it, its `#fragment` against
the target page's heading anchors. Generated tables are the text between `<!-- begin NAME -->` and
`<!-- end NAME -->`; `benchmarks/update_readme.py` must reproduce each one from its JSON result.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SPEC = importlib.util.spec_from_file_location("update_readme", ROOT / "benchmarks" / "update_readme.py")
update_readme = sys.modules.setdefault(SPEC.name, importlib.util.module_from_spec(SPEC))
SPEC.loader.exec_module(update_readme)

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of PAGE: lower case, punctuation dropped, spaces as hyphens,
    a repeated heading suffixed -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", page.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def broken_links(page: Path) -> list[str]:
    """The relative links of PAGE (outside code blocks) whose file or heading anchor does not exist."""
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...: not ours to check
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading #{fragment} in {resolved.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Where it is\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#where-it-is) [ok](docs/a.md#twice-1) [web](https://example.com/x)\n"
                    "[gone](docs/b.md) ![gone](img/c.png) [no heading](docs/a.md#nowhere)\n"
                    "```\n[in code](not/checked.md)\n```\n")
    assert [b.split(":")[0] for b in broken_links(page)] == ["docs/b.md", "img/c.png", "docs/a.md#nowhere"]


def test_readme_links_every_docs_page():
    """A page of docs/ that the README does not link is a page no reader finds."""
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall((ROOT / "README.md").read_text())}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_generated_tables_are_current(page):
    """Each marked table is exactly what update_readme renders from its JSON result (never retyped)."""
    text = page.read_text()
    begins = re.findall(r"^<!-- begin (\S+) -->$", text, flags=re.M)
    assert begins == re.findall(r"^<!-- end (\S+) -->$", text, flags=re.M)
    assert update_readme.regenerate(text) == text


def test_update_readme_regenerates_a_table_in_any_page_and_refuses_a_hand_typed_one():
    stale = "intro\n<!-- begin eval_test -->\n| K | NLL |\n| 1 | 9.9 |\n<!-- end eval_test -->\nafter\n"
    fresh = update_readme.regenerate(stale)
    assert "| 1 | 9.9 |" not in fresh and "| 8 | " in fresh and fresh.endswith("<!-- end eval_test -->\nafter\n")
    with pytest.raises(SystemExit, match="no_such_result"):
        update_readme.regenerate("<!-- begin no_such_result -->\n| x |\n<!-- end no_such_result -->\n")
    with pytest.raises(SystemExit, match="eval_test.nothing"):
        update_readme.regenerate("<!-- begin eval_test.nothing -->\nx\n<!-- end eval_test.nothing -->\n")


def test_the_vllm_cost_summary_is_the_json_s_k8_ratios():
    doc = update_readme.json.loads((update_readme.RESULTS / "vllm_cost.json").read_text().strip().splitlines()[-1])
    text = update_readme.regenerate("<!-- begin vllm_cost.summary -->\nstale\n<!-- end vllm_cost.summary -->\n")
    for batch, target in doc["targets"].items():
        assert f"{target['cpu_ratio']:.2f}x at batch {batch.removeprefix('B=')}" in text
    doc["rows"][1]["kv_bytes"] = [1]  # a K whose KV bytes differ from plain's must not read "the same"
    assert "NOT the same" in update_readme.vllm_cost_summary(doc)


def test_the_equivalent_size_tables_are_the_report_s_figures():
    """The family's table and the RoE table come from the indented report JSON, cell for cell."""
    doc = update_readme.json.loads((update_readme.RESULTS / "equivalent_size.json").read_text())
    family = update_readme.regenerate("<!-- begin equivalent_size -->\nstale\n<!-- end equivalent_size -->\n")
    roe = update_readme.regenerate("<!-- begin equivalent_size.roe -->\nstale\n<!-- end equivalent_size.roe -->\n")
    assert "stale" not in family and "stale" not in roe
    for member in doc["family"]:
        assert f"| {member['member']} | {member['params'] / 1e6:.2f} M |" in family
        assert f"| {member['nll_test']:.4f} +- {member['se_test']:.4f} |" in family
    for point in (p for p in doc["roe"] if p["K"] > 1):
        on_curve = point["unseen"]["params"]
        assert (f"| {point['K']} | {point['test']['delta_vs_K1']:+.5f} +- {point['test']['delta_se']:.5f} |" in roe
                and f"| {on_curve['ratio_on_curve']:.4f}x ({on_curve['ratio_on_curve_ci95'][0]:.4f}-" in roe)
    assert f"{doc['paper']['ratio_to_1x']}x at K = {doc['paper']['K']}" in roe
