"""The allowed-breaking list and how findings are judged against it (tools/buf_breaking.py)."""

from __future__ import annotations

import json

import pytest

from tools.buf_breaking import (
    DEFAULT_ALLOWED,
    Finding,
    ToolError,
    checked_after,
    judge,
    load_allowed,
    parse_findings,
)

EXPORT = Finding(
    rule="RPC_SAME_RESPONSE_TYPE",
    path="protos/ascribe/attribution/v1/attribution.proto",
    line=291,
    message='RPC "ExportCodes" on service "CatalogService" changed response type from '
    '"ascribe.attribution.v1.Coupon" to "ascribe.attribution.v1.ExportCodesChunk".',
)


def test_every_allowed_change_names_its_issue_and_why() -> None:
    allowed = load_allowed(DEFAULT_ALLOWED.read_text())
    assert allowed
    for entry in allowed:
        assert entry.issue > 0 and len(entry.why) > 20
        assert entry.path.startswith("protos/") and entry.path.endswith(".proto")
        assert "\n" not in entry.message and entry.message == entry.message.strip()


def test_an_allowed_change_passes_and_anything_else_breaks() -> None:
    allowed = load_allowed(DEFAULT_ALLOWED.read_text())
    renamed = Finding(
        rule="FIELD_SAME_NAME", path=EXPORT.path, line=120,
        message='Field "1" on message "Coupon" changed name from "code" to "coupon_code".',
    )
    judgment = judge([EXPORT, renamed], allowed)
    assert judgment.broken == (renamed,)
    assert [finding for finding, _ in judgment.allowed] == [EXPORT]
    assert judgment.allowed[0][1].issue == 15
    assert EXPORT.message not in [entry.message for entry in judgment.unseen]


def test_an_allowed_message_in_another_file_or_rule_still_breaks() -> None:
    allowed = load_allowed(DEFAULT_ALLOWED.read_text())
    elsewhere = Finding(EXPORT.rule, "protos/ascribe/fraud/v1/fraud.proto", EXPORT.line, EXPORT.message)
    other_rule = Finding("RPC_SAME_CLIENT_STREAMING", EXPORT.path, EXPORT.line, EXPORT.message)
    assert judge([elsewhere, other_rule], allowed).broken == (elsewhere, other_rule)


def test_an_entry_without_its_issue_or_why_is_refused() -> None:
    text = '[[allowed]]\nrule = "FIELD_NO_DELETE"\npath = "protos/a.proto"\nmessage = "x"\nissue = 14\n'
    with pytest.raises(ToolError, match="missing why"):
        load_allowed(text)


def test_buf_json_findings_are_read_line_by_line() -> None:
    line = json.dumps({
        "path": EXPORT.path, "start_line": 291, "start_column": 55, "end_line": 291, "end_column": 71,
        "type": EXPORT.rule, "message": EXPORT.message,
    })
    assert parse_findings(f"{line}\n\n{line}\n") == [EXPORT, EXPORT]


def test_checked_after_names_one_commit() -> None:
    commit = checked_after(DEFAULT_ALLOWED.read_text())
    assert commit is not None and len(commit) == 40 and int(commit, 16) >= 0
    assert checked_after('[[allowed]]\nrule = "X"\n') is None
