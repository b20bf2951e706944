"""docs/architecture.md is the document code comments cite; every citation must resolve."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_rule_cited_in_code_exists_and_nothing_cites_a_file_outside_the_repository():
    doc = (REPO / "docs" / "architecture.md").read_text()
    rules = {int(n) for n in re.findall(r"^(\d+)\. \*\*", doc, flags=re.M)}
    assert rules == set(range(1, 11))
    cited = []
    for path in list((REPO / "edgekidney").rglob("*.py")) + list((REPO / "tests").glob("*.py")) + [REPO / "README.md"]:
        text = path.read_text()
        if path.name != "test_architecture.py":
            assert "DESIGN" + ".md" not in text, f"{path} cites a design file that is not in the repository"
        cited += [(path.name, int(n)) for n in re.findall(r"docs/architecture\.md,? rules? (\d+)", text)]
    assert len(cited) >= 5
    assert all(n in rules for _, n in cited), cited
