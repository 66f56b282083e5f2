"""One grammar for -s on every command: sets, +, options, repeated -s, and clear errors."""

from __future__ import annotations

import pytest

from memopt.core.errors import MemoptError
from memopt.spec.strategy_args import one_set, parse_sets, set_label

CASES = [
    ("ckpt", [[{"ckpt": {}}]]),
    ("ckpt,chunked_ce", [[{"ckpt": {}}], [{"chunked_ce": {}}]]),
    ("ckpt+chunked_ce", [[{"ckpt": {}}, {"chunked_ce": {}}]]),
    ("quant:bits=4,format=nf4,lora=8+sdpa", [[{"quant": {"bits": 4, "format": "nf4", "lora": 8}}, {"sdpa": {}}]]),
    ("ckpt:policy=every,every=2,chunked_ce", [[{"ckpt": {"policy": "every", "every": 2}}], [{"chunked_ce": {}}]]),
    ("sdpa+quant:bits=4,lora=8,ckpt", [[{"sdpa": {}}, {"quant": {"bits": 4, "lora": 8}}], [{"ckpt": {}}]]),
    (" ckpt + chunked_ce , sdpa ", [[{"ckpt": {}}, {"chunked_ce": {}}], [{"sdpa": {}}]]),
    ("quant:lora={rank: 4, targets: [layers.0.*, layers.1.*]}+ckpt",
     [[{"quant": {"lora": {"rank": 4, "targets": ["layers.0.*", "layers.1.*"]}}}, {"ckpt": {}}]]),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_sets_parse(text, expected):
    assert parse_sets(text) == expected


def test_repeated_option_gives_one_set_each_and_labels_parse_back():
    sets = parse_sets(["quant:bits=4,lora=8+sdpa", "ckpt"])
    assert sets == [[{"quant": {"bits": 4, "lora": 8}}, {"sdpa": {}}], [{"ckpt": {}}]]
    assert [parse_sets(set_label(s))[0] for s in sets] == sets


def test_one_run_commands_apply_every_strategy_named():
    assert one_set(["ckpt+chunked_ce"]) == one_set(["ckpt,chunked_ce"]) == one_set(["ckpt", "chunked_ce"])
    assert one_set(None) is None


@pytest.mark.parametrize(("text", "expected"), [
    ("+", "empty strategy name"), ("ckpt++sdpa", "empty strategy name"), ("ckpt,", "empty strategy name"),
    ("", "empty strategy name"), ("bits=4", "must follow a strategy"), ("quant:4", "should look like key=value"),
    ("quant:bits=4,bits=8", "given twice"), ("9lives", "not a strategy name"),
])
def test_bad_spellings_are_one_clear_error_naming_the_option(text, expected):
    with pytest.raises(MemoptError, match=expected) as err:
        parse_sets(text)
    assert str(err.value).startswith("--strategies")
