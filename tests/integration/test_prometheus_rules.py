"""promtool checks the Prometheus configuration and runs the alert rules' unit tests (alerts_test.yml).

promtool comes with Debian's ``prometheus`` package (CI installs it); without
it these tests skip, saying so. `make prometheus-rules` runs the same.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RULES_DIR = REPO / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed: apt-get install prometheus (Debian's package)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120)


def test_config_and_rules_are_valid() -> None:
    checked = promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_a_broken_expectation_fails(tmp_path: Path) -> None:
    """The harness can fail: the same tests against a rule whose threshold moved do not pass."""
    rules = (RULES_DIR / "alerts.yml").read_text()
    moved = rules.replace("ascribe_db_pool_waiting_acquires > 0", "ascribe_db_pool_waiting_acquires > 100")
    assert moved != rules
    (tmp_path / "alerts.yml").write_text(moved)
    (tmp_path / "alerts_test.yml").write_text((RULES_DIR / "alerts_test.yml").read_text())
    assert PROMTOOL is not None
    tested = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert tested.returncode != 0
    assert "AscribeDbPoolSaturated" in tested.stdout + tested.stderr
