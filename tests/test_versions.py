"""The versioned-artifact registry shared by codebooks and tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

from videobert import versions

META = "meta.json"


def write_version(root: Path, version: str, **fields) -> None:
    (root / version).mkdir(parents=True)
    (root / version / META).write_text(json.dumps({"version": version, **fields}))


def test_newest_matching_version_by_created_at_then_version(tmp_path):
    root = tmp_path / "artifacts"
    # "bbb" sorts after "aaa" but was created earlier: created_at must decide.
    write_version(root, "bbb", created_at="2024-01-01T00:00:00+00:00", k=12)
    write_version(root, "aaa", created_at="2024-06-01T00:00:00+00:00", k=8)
    (root / "incomplete").mkdir()  # no metadata written yet: not a version
    metas = versions.list_versions(str(root), META)
    assert sorted((meta["version"], meta["uri"]) for meta in metas) == [
        ("aaa", str(root / "aaa")),
        ("bbb", str(root / "bbb")),
    ]
    assert versions.newest(metas)["version"] == "aaa"
    assert versions.newest(metas, k=None)["version"] == "aaa"  # None matches any
    assert versions.newest(metas, k=12)["version"] == "bbb"
    assert versions.newest(metas, k=4) is None
    assert versions.newest(metas, k=12, missing_field="x") is None
    # Same created_at: the greater version wins, so the choice never depends on listing order.
    tied = [{"version": "b", "created_at": "t"}, {"version": "c", "created_at": "t"}, {"version": "a"}]
    assert versions.newest(tied)["version"] == "c"
    assert versions.newest(reversed(tied))["version"] == "c"


def test_no_versions(tmp_path):
    assert versions.list_versions(str(tmp_path / "missing"), META) == []
    assert versions.newest([]) is None
