"""Checks schemathesis runs against the gateway beyond its own (loaded through SCHEMATHESIS_HOOKS).

- no_server_error: no 5xx, except 503 where the description documents it
  (a backend that is down; the stack under test is up, so none is expected,
  but a 503 is the documented answer, not a bug).
- errors_name_the_field: every 4xx is the description's JSON error, and an
  invalid argument names the HTTP parameter at fault.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis


@schemathesis.check
def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    status = int(response.status_code)
    if status < 500:
        return None
    documented = status == 503 and "503" in case.operation.definition.raw.get("responses", {})
    if not documented:
        raise AssertionError(f"{case.operation.label} answered {status}: {response.text[:500]}")
    return None


@schemathesis.check
def errors_name_the_field(ctx: Any, response: Any, case: Any) -> bool | None:
    status = int(response.status_code)
    if not 400 <= status < 500:
        return None
    try:
        body = json.loads(response.content)
        error = body["error"]
        code, field = error["code"], error["field"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"{status} is not the JSON error: {response.text[:500]!r}") from None
    if code == "invalid_argument" and not field:
        raise AssertionError(f"{status} invalid_argument names no field: {error}")
    return None

