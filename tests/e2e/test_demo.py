"""`make demo`'s printed commands work today, against the real services.

The demo runs as a process against a stack of real processes; its shell
steps (curl, the wait past the click-to-conversion window, the postback, the
refund) run in bash as a reader would paste them. Its grpcurl calls are made
with grpcurl when it is on PATH, else with the same JSON through the
generated stubs (json_format is what grpcurl's JSON mapping follows), so the
coupon window printed today is what is tested.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc
from google.protobuf import json_format

from tools.stack import REPO, Stack

pytestmark = pytest.mark.slow

# A short click-to-conversion window so the printed `sleep` is short; the demo reads the same settings.
CTIT = {"ASCRIBE_FRAUD_CTIT_REJECT_SECONDS": "1", "ASCRIBE_FRAUD_CTIT_RISK_SECONDS": "2"}
GRPCURL = re.compile(r"^grpcurl -plaintext -d '(?P<body>.*)' \\\n\s+(?P<addr>\S+) (?P<service>\S+)/(?P<method>\w+)$",
                     re.MULTILINE)


def call_like_grpcurl(addr: str, service: str, method: str, body: str) -> dict[str, Any]:
    name = service.rpartition(".")[2]
    descriptor = pb.DESCRIPTOR.services_by_name[name].methods_by_name[method]
    request = json_format.Parse(body, getattr(pb, descriptor.input_type.name)())
    with grpc.insecure_channel(addr) as channel:
        stub = getattr(attribution_pb2_grpc, f"{name}Stub")(channel)
        reply = getattr(stub, method)(request, timeout=10)
    return json_format.MessageToDict(reply, preserving_proto_field_name=True)  # as grpcurl prints


def test_demo_commands_work_today(database_url: str, redis_server_url: str, redis_prefix: str, tmp_path: Path) -> None:
    stack = Stack(
        database_url=database_url, redis_url=redis_server_url, log_dir=tmp_path,
        env={**CTIT, "ASCRIBE_FRAUD_KEY_PREFIX": redis_prefix, "ASCRIBE_FRAUD_DEADLINE_MS": "1000"},
    )
    with stack:
        stack.start()
        env = {
            **stack.environment("gateway"), **CTIT,
            "PATH": os.environ.get("PATH", ""),
        }
        demo = subprocess.run(
            [sys.executable, "-m", "tools.demo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
            check=True,
        )
        printed = demo.stdout
        today = datetime.now(UTC).date()
        assert f"valid {today} to {today + timedelta(days=89)} (UTC)" in printed
        assert "sleep 3\n" in printed  # past the 2 s review window, said why
        assert "fraud_ctit_too_short" in printed

        shell_steps = printed[printed.index("# 1."):printed.index("# 5.")]
        ran = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", shell_steps], capture_output=True, text=True,
                             timeout=60)
        assert ran.returncode == 0, ran.stderr
        lines = ran.stdout.splitlines()
        assert lines[0].startswith("click_id: ") and len(lines[0]) > len("click_id: ") + 16
        conversion, refund = json.loads(lines[1]), json.loads(lines[2])
        assert (conversion["status"], conversion["source"], conversion["affiliate_id"]) == ("pending", "click", "aff-a")
        assert conversion["reasons"] == [] and conversion["payout"] == "4.99"
        assert conversion["coupon_remaining"] == 149
        assert refund["status"] == "reversed" and refund["coupon_remaining"] == 150

        calls = list(GRPCURL.finditer(printed))
        assert [call["method"] for call in calls] == ["CreateCoupon", "GetCoupon", "GetConversion", "ListConversions"]
        if shutil.which("grpcurl"):
            answers = [
                json.loads(subprocess.run(
                    ["grpcurl", "-plaintext", "-d", call["body"], call["addr"], f"{call['service']}/{call['method']}"],
                    capture_output=True, text=True, timeout=30, check=True,
                ).stdout)
                for call in calls
            ]
        else:
            answers = [call_like_grpcurl(call["addr"], call["service"], call["method"], call["body"]) for call in calls]
        created, summer, stored, _ = answers
        assert created["valid_from"] == f"{today}T00:00:00Z"  # a window around today, not a past one
        assert created["valid_until"] == f"{today + timedelta(days=90)}T00:00:00Z"
        assert summer["remaining"] == "150"  # the refund gave the use back
        assert stored["status"] == "CONVERSION_STATUS_REVERSED"
