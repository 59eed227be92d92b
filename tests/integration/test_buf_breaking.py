"""`make buf-breaking` for real: buf on copies of protos/, and the baseline it picks in a git history.

The buf cases skip without tools/node's buf (`make node-tools`; CI installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tools.buf_breaking import DEFAULT_ALLOWED, DEFAULT_BUF, choose_baselines, judge, load_allowed, run_buf
from tools.stack import REPO

ATTRIBUTION = Path("protos/ascribe/attribution/v1/attribution.proto")
OLD_METRICS = "map<string, double> metrics = 2;"

needs_buf = pytest.mark.skipif(not DEFAULT_BUF.exists(), reason="buf is not installed (run make node-tools)")


def workspace_with(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of buf.yaml and protos/ with ``old`` replaced by ``new`` in attribution.proto."""
    copy = tmp_path / "workspace"
    shutil.copytree(REPO / "protos", copy / "protos")
    shutil.copy(REPO / "buf.yaml", copy / "buf.yaml")
    proto = copy / ATTRIBUTION
    text = proto.read_text()
    assert old in text
    proto.write_text(text.replace(old, new, 1))
    return copy


@needs_buf
def test_renaming_an_rpc_breaks(tmp_path: Path) -> None:
    copy = workspace_with(tmp_path, "rpc GetClick(", "rpc FetchClick(")
    judgment = judge(run_buf(DEFAULT_BUF, REPO / "protos", copy), load_allowed(DEFAULT_ALLOWED.read_text()))
    assert [(finding.rule, finding.message) for finding in judgment.broken] == [
        ("RPC_NO_DELETE", 'Previously present RPC "GetClick" on service "TrackingService" was deleted.')
    ]


@needs_buf
def test_the_report_metrics_replacement_the_reporting_issue_asks_for_passes(tmp_path: Path) -> None:
    if OLD_METRICS not in (REPO / ATTRIBUTION).read_text():
        pytest.skip("ReportRow.metrics is replaced on this branch: its entries in buf.allowed-breaking.toml can go")
    copy = workspace_with(
        tmp_path, OLD_METRICS, "reserved 2;\n  ReportMetrics metrics = 3;\n}\nmessage ReportMetrics {\n  int64 clicks = 1;"
    )
    judgment = judge(run_buf(DEFAULT_BUF, REPO / "protos", copy), load_allowed(DEFAULT_ALLOWED.read_text()))
    assert judgment.broken == ()
    assert sorted(finding.rule for finding, _ in judgment.allowed) == ["FIELD_NO_DELETE", "MESSAGE_NO_DELETE"]
    assert {entry.issue for _, entry in judgment.allowed} == {14}


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false", *args],
        cwd=repo, capture_output=True, text=True, check=True,
    )
    return result.stdout.strip()


def commit(repo: Path, path: str, text: str, subject: str) -> str:
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / path).write_text(text)
    git(repo, "add", path)
    git(repo, "commit", "-q", "-m", subject)
    return git(repo, "rev-parse", "HEAD")


def test_the_baselines_are_main_where_a_branch_left_it_or_before_each_recent_proto_change_on_main(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    v1 = commit(repo, "protos/a.proto", 'syntax = "proto3";\n', "v1")
    assert choose_baselines(repo) == []  # nothing before the first protos/

    git(repo, "checkout", "-q", "-b", "feature")
    commit(repo, "protos/a.proto", 'syntax = "proto3";\nmessage A {}\n', "v2")
    git(repo, "checkout", "-q", "main")
    docs = commit(repo, "README.md", "docs\n", "docs")
    git(repo, "checkout", "-q", "feature")
    # On a branch: main where the branch left it, not main's newer commits.
    assert choose_baselines(repo) == [(v1, "where this branch left main")]

    git(repo, "checkout", "-q", "main")
    git(repo, "merge", "-q", "--no-ff", "-m", "Merge branch 'feature'", "feature")
    merge = git(repo, "rev-parse", "HEAD")
    formatted = commit(repo, "protos/a.proto", 'syntax = "proto3";\n\nmessage A {}\n', "protos: buf format")
    commit(repo, "README.md", "docs 2\n", "docs 2")
    # On main (CI's clone): before each recent first-parent change to protos/,
    # so the format commit does not hide what the merge changed.
    assert [revision for revision, _ in choose_baselines(repo)] == [merge, docs]
    assert [revision for revision, _ in choose_baselines(repo, depth=1)] == [merge]
    assert formatted[:10] in choose_baselines(repo)[0][1]
    # History the allowed list's checked_after already holds is not judged again.
    assert [revision for revision, _ in choose_baselines(repo, after=merge)] == [merge]
    assert choose_baselines(repo, after=formatted) == []

    (repo / "protos/a.proto").write_text('syntax = "proto3";\nmessage B {}\n')
    assert choose_baselines(repo) == [(git(repo, "rev-parse", "HEAD"), "HEAD: protos/ has uncommitted changes")]
