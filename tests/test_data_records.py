"""The release's training JSON: all three record kinds parse, and every malformed record is named."""

from __future__ import annotations

import json

import pytest

from easyref.errors import EasyRefError
from easyref.training.errors import DataFormatError
from easyref.training.records import count_kinds, load_records, parse_records, record_to_json

GOOD = [
    {"image_file": ["t.jpg"], "text": ["a cat", "a small cat"], "target": "t.jpg"},
    {"image_file": ["a.jpg", "b.jpg"], "text": "a dog", "target": "t2.jpg", "extra": 1},
    {"face": [[1, 2, 30, 40, 0.5], [5, 5, 50, 50, 0.9]], "text": [], "target": "f.jpg"},
]


def test_three_record_kinds_parse_as_the_release_writes_them():
    records = parse_records(GOOD)
    assert [r.kind for r in records] == ["single", "group", "face"]
    assert records[0].captions == ("a cat", "a small cat")
    assert records[1].captions == ("a dog",)  # a plain string is one caption
    assert records[2].captions == ("",)  # no caption: the empty one
    assert records[1].image_files() == ["a.jpg", "b.jpg", "t2.jpg"]
    assert records[2].face() == (1.0, 2.0, 30.0, 40.0, 0.5)  # the first box, as the release, not the best score
    assert count_kinds(records) == {"single": 1, "group": 1, "face": 1}
    assert parse_records([record_to_json(r) for r in records]) == records


@pytest.mark.parametrize(("bad", "reason"), [
    ("not an object", "must be a JSON object"),
    ({"image_file": ["a.jpg"], "text": ["x"]}, "needs 'target'"),
    ({"image_file": ["a.jpg"], "text": ["x"], "target": 3}, "needs 'target'"),
    ({"image_file": ["a.jpg"], "target": "t.jpg"}, "needs 'text'"),
    ({"image_file": ["a.jpg"], "text": [1], "target": "t.jpg"}, "'text' must be a string or a list of strings"),
    ({"text": ["x"], "target": "t.jpg"}, "got neither"),
    ({"image_file": ["a.jpg"], "face": [[0, 0, 1, 1]], "text": ["x"], "target": "t.jpg"}, "got both"),
    ({"image_file": [], "text": ["x"], "target": "t.jpg"}, "at least one non-empty path"),
    ({"face": [], "text": ["x"], "target": "t.jpg"}, "non-empty list of boxes"),
    ({"face": [[0, 0, 1]], "text": ["x"], "target": "t.jpg"}, "face 0 must be"),
    ({"face": [[10, 0, 5, 9]], "text": ["x"], "target": "t.jpg"}, "is empty"),
])
def test_a_malformed_record_is_named_with_its_index_and_reason(bad, reason):
    with pytest.raises(DataFormatError) as info:
        parse_records([GOOD[0], bad], "data.json")
    message = str(info.value)
    assert message.startswith("data.json: record 1: ")
    assert reason in message
    assert "\n" not in message
    assert isinstance(info.value, EasyRefError)


def test_file_level_problems_are_clear(tmp_path):
    with pytest.raises(DataFormatError, match="not found"):
        load_records(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"target": "a.jpg",}]')
    with pytest.raises(DataFormatError, match=r"not valid JSON \(line 1"):
        load_records(broken)
    as_object = tmp_path / "object.json"
    as_object.write_text(json.dumps({"records": GOOD}))
    with pytest.raises(DataFormatError, match="must be a JSON list of records, got a dict"):
        load_records(as_object)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataFormatError, match="holds no records"):
        load_records(empty)
