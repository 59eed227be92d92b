"""make buf-breaking: `buf breaking` on protos/ against main's protos, with the changes issues ask for allowed.

Which protos are "main's":
- on a branch: main where this branch left it (the merge base), so commits
  that landed on main since are not taken for deletions by this branch;
- on main (CI runs on a clone of main): the protos before each of the last
  five commits on main's first-parent line that changed protos/ (a merged
  branch is one such commit), so a later commit (a `make buf-format`, say)
  cannot hide an earlier break, back to the `checked_after` commit of the
  allowed list at most; HEAD's when protos/ has uncommitted changes;
- `--against REV` (make buf-breaking BUF_AGAINST=REV) names any git revision.

A finding passes only when buf.allowed-breaking.toml lists it (rule, file and
message, word for word), with the issue that asks for it and why. The exit
status is 1 when anything else breaks, 2 when buf or git cannot run.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROTOS = "protos"
DEFAULT_BUF = REPO / "tools" / "node" / "node_modules" / ".bin" / "buf"
DEFAULT_ALLOWED = REPO / "buf.allowed-breaking.toml"
MAIN_REFS = ("main", "origin/main")
# On main, each of the last few changes to protos/ is checked, not only the
# newest: a merge followed by `make buf-format` (or any proto commit) must not
# hide what the merge changed.
DEFAULT_DEPTH = 5


class ToolError(RuntimeError):
    """buf or git failed, or the allowed list is malformed."""


@dataclass(frozen=True)
class Finding:
    rule: str
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message} [{self.rule}]"


@dataclass(frozen=True)
class Allowed:
    rule: str
    path: str
    message: str
    issue: int
    why: str

    def matches(self, finding: Finding) -> bool:
        return (self.rule, self.path, self.message) == (finding.rule, finding.path, _words(finding.message))


@dataclass(frozen=True)
class Judgment:
    broken: tuple[Finding, ...]
    allowed: tuple[tuple[Finding, Allowed], ...]
    unseen: tuple[Allowed, ...]


def _words(text: str) -> str:
    # The list wraps long messages over lines; compare them word for word.
    return " ".join(text.split())


def load_allowed(text: str) -> list[Allowed]:
    try:
        entries = tomllib.loads(text).get("allowed", [])
    except tomllib.TOMLDecodeError as error:
        raise ToolError(f"the allowed list: {error}") from error
    if not isinstance(entries, list):
        raise ToolError("allowed: must be an array of tables ([[allowed]])")
    allowed = []
    for number, entry in enumerate(entries, 1):
        missing = [key for key in ("rule", "path", "message", "issue", "why") if not entry.get(key)]
        if missing:
            raise ToolError(f"allowed entry {number}: missing {', '.join(missing)} (every entry names its issue and why)")
        allowed.append(Allowed(
            rule=str(entry["rule"]), path=str(entry["path"]), message=_words(str(entry["message"])),
            issue=int(entry["issue"]), why=_words(str(entry["why"])),
        ))
    return allowed


def parse_findings(output: str) -> list[Finding]:
    """buf's `--error-format json`: one JSON object a line."""
    findings = []
    for line in output.splitlines():
        if line.strip():
            raw: dict[str, Any] = json.loads(line)
            findings.append(Finding(
                rule=str(raw.get("type", "")), path=str(raw.get("path", "")),
                line=int(raw.get("start_line", 0)), message=str(raw.get("message", "")),
            ))
    return findings


def judge(findings: Iterable[Finding], allowed: Sequence[Allowed]) -> Judgment:
    broken: list[Finding] = []
    passed: list[tuple[Finding, Allowed]] = []
    for finding in findings:
        entry = next((entry for entry in allowed if entry.matches(finding)), None)
        if entry is None:
            broken.append(finding)
        else:
            passed.append((finding, entry))
    seen = {id(entry) for _, entry in passed}
    return Judgment(tuple(broken), tuple(passed), tuple(entry for entry in allowed if id(entry) not in seen))


def git(repo: Path, *args: str, check: bool = True) -> str:
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise ToolError(f"git {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip() if result.returncode == 0 else ""


def checked_after(text: str) -> str | None:
    """The allowed list's `checked_after`: main's commit before which history is not judged again."""
    try:
        value = tomllib.loads(text).get("checked_after")
    except tomllib.TOMLDecodeError as error:
        raise ToolError(f"the allowed list: {error}") from error
    return str(value) if value else None


def choose_baselines(
    repo: Path = REPO, depth: int = DEFAULT_DEPTH, after: str | None = None
) -> list[tuple[str, str]]:
    """(revision, why that one) for each baseline of main's protos; empty when there is none.

    On main, a change to protos/ that ``after`` already contains is not judged
    again (nor any older one).
    """
    head = git(repo, "rev-parse", "HEAD")
    branch = git(repo, "rev-parse", "--abbrev-ref", "HEAD")
    main = next(
        (ref for ref in MAIN_REFS if git(repo, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}", check=False)),
        None,
    )
    if main is not None and branch != "main" and git(repo, "rev-parse", f"{main}^{{commit}}") != head:
        return [(git(repo, "merge-base", "HEAD", main), f"where this branch left {main}")]
    if git(repo, "status", "--porcelain", "--", PROTOS):
        return [(head, "HEAD: protos/ has uncommitted changes")]
    baselines = []
    for changed in git(repo, "rev-list", "--first-parent", "-n", str(depth), "HEAD", "--", PROTOS).split():
        if after and _is_ancestor(repo, changed, after):
            break
        parent = git(repo, "rev-parse", "--verify", "-q", f"{changed}^1", check=False)
        if parent:
            subject = git(repo, "log", "-1", "--format=%s", changed)
            baselines.append((parent, f"before {changed[:10]}: {subject[:60]}"))
    return baselines


def _is_ancestor(repo: Path, commit: str, of: str) -> bool:
    # 1: not an ancestor; anything else (``of`` unknown to a clone): judge it.
    result = subprocess.run(
        ["git", "merge-base", "--is-ancestor", commit, of], cwd=repo, capture_output=True, check=False
    )
    return result.returncode == 0


def export_protos(revision: str, into: Path, repo: Path = REPO) -> Path | None:
    """protos/ as of ``revision`` under ``into``; None when it had none."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision, PROTOS], cwd=repo, capture_output=True, check=False
    )
    if archive.returncode != 0:
        return None
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into / PROTOS


def run_buf(buf: Path, against: Path, workspace: Path = REPO) -> list[Finding]:
    """buf's findings on ``workspace`` (its buf.yaml and protos/) against the protos in ``against``."""
    result = subprocess.run(
        [str(buf), "breaking", "--against", str(against), "--error-format", "json"],
        cwd=workspace, capture_output=True, text=True, check=False,
    )
    # 100: buf found breaking changes; anything else but 0 is buf failing.
    if result.returncode not in (0, 100):
        raise ToolError(f"buf breaking exited {result.returncode}: {result.stderr.strip() or result.stdout.strip()}")
    return parse_findings(result.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--buf", type=Path, default=DEFAULT_BUF, help="the buf executable (make node-tools)")
    parser.add_argument("--against", default="", help="a git revision whose protos/ is the baseline")
    parser.add_argument(
        "--depth", type=int, default=DEFAULT_DEPTH, help="on main: how many recent changes to protos/ to check"
    )
    parser.add_argument("--allowed", type=Path, default=DEFAULT_ALLOWED, help="the allowed breaking changes")
    args = parser.parse_args(argv)
    findings: list[Finding] = []
    try:
        text = args.allowed.read_text()
        allowed = load_allowed(text)
        if args.against:
            baselines = [(git(REPO, "rev-parse", args.against), "--against")]
        else:
            baselines = choose_baselines(depth=args.depth, after=checked_after(text))
        if not baselines:
            print("buf breaking: OK: protos/ has not changed since checked_after, or has no history here")
            return 0
        for revision, why in baselines:
            with tempfile.TemporaryDirectory(prefix="ascribe-buf-") as folder:
                against = export_protos(revision, Path(folder))
                if against is None:
                    print(f"buf breaking: {revision[:10]} has no protos/ ({why})")
                    continue
                found = run_buf(args.buf, against)
            print(f"buf breaking: protos/ against {revision[:10]} ({why}): {len(found)} finding(s)")
            findings.extend(finding for finding in found if finding not in findings)
    except (ToolError, OSError, json.JSONDecodeError) as error:
        print(f"buf breaking: cannot run: {error}", file=sys.stderr)
        return 2
    judgment = judge(findings, allowed)
    for finding, entry in judgment.allowed:
        print(f"  allowed (issue {entry.issue}): {finding}")
    for entry in judgment.unseen:
        print(f"  not seen (not made yet, or older than these baselines): {entry.message} [{entry.rule}]")
    for finding in judgment.broken:
        print(f"  BREAKING: {finding}", file=sys.stderr)
    if judgment.broken:
        print(
            f"buf breaking: {len(judgment.broken)} breaking change(s) no issue asks for; a generated client "
            f"would break. Undo them, or list one an issue asks for in {DEFAULT_ALLOWED.name} with why.",
            file=sys.stderr,
        )
        return 1
    print(f"buf breaking: OK ({len(judgment.allowed)} allowed change(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
