"""Policy files: the default validates, bad ones are refused with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from rules.errors import PolicyError
from rules.policy import load_policy, parse_policy

REPO = Path(__file__).resolve().parents[2]


def test_default_policy_file_is_valid_and_packaged() -> None:
    """The documented default policy loads, from the package and from its path alike."""
    packaged = load_policy()
    from_path = load_policy(REPO / "rules" / "policies" / "default.yaml")
    assert packaged == from_path
    assert packaged.content_hash == from_path.content_hash


def test_hash_ignores_formatting_but_not_content() -> None:
    """The policy hash follows content, not YAML layout."""
    base = "name: p\nversion: 1\nmargin_floors:\n  - {absolute: 0.1, percent: 0.2}\n"
    reformatted = "version: 1\nname: p\nmargin_floors: [{percent: 0.2, absolute: 0.1}]\n"
    changed = base.replace("0.2", "0.25")
    assert (
        parse_policy(base, source="a").content_hash
        == parse_policy(reformatted, source="b").content_hash
    )
    assert (
        parse_policy(base, source="a").content_hash
        != parse_policy(changed, source="c").content_hash
    )


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("name: p\nversion: 1\nmargin_floors: [{percent: 1.5}]\n", "margin_floors.0.percent"),
        ("name: p\nversion: 1\nmargin_floors: [{channel: web}]\n", "margin_floors.0.channel"),
        ("name: p\nversion: 1\nmargin_floors: [{channel: pos}]\n", "default entry"),
        ("name: p\nversion: 1\nmargin_floors: [{}, {}]\n", "two entries"),
        ("name: p\nversion: 1\nmargin_floors: [{}]\nsurprise: 1\n", "surprise"),
        ("name: p\nversion: [1\n", "not valid YAML"),
        ("- just a list\n", "YAML mapping"),
    ],
)
def test_invalid_policy_names_the_problem(text: str, named: str) -> None:
    """An invalid policy is refused with the source and the offending field in the message."""
    with pytest.raises(PolicyError, match=r"policy\.yaml") as caught:
        parse_policy(text, source="policy.yaml")
    assert named in str(caught.value)


def test_unreadable_policy_file(tmp_path: Path) -> None:
    """A missing policy file is a PolicyError naming the path."""
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")
