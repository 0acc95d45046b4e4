"""The docs cite real tests and real flags: every test named in docs/bad_input.md exists."""

import re

from conftest import ROOT


def test_every_test_named_in_bad_input_md_exists():
    doc = (ROOT / "docs" / "bad_input.md").read_text()
    cited = set(re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)`", doc))  # `test_x` or `test_file.py::test_x`
    assert len({name for _, name in cited}) > 50
    assert re.findall(r"`test_\w*\.\.\.", doc) == []  # a name written in full, not cut short
    source = {p.name: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    everywhere = "\n".join(source.values())
    assert [(f, n) for f, n in sorted(cited) if f"def {n}(" not in (source.get(f, "") if f else everywhere)] == []
