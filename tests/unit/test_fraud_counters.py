"""The counters' script is assembled from one Lua file per counter class, found beside the module."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.fraud import counters


def test_the_lua_files_are_found_beside_the_module_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # an installed service runs from any folder
    assert "OPS.dedup = function" in counters.script()
    assert Path(counters.__file__).parent / "lua" == counters.LUA_DIR


def test_each_counter_has_its_own_lua_file_and_each_file_a_counter() -> None:
    names = {counter.name for counter in counters.COUNTERS}
    files = {path.stem for path in counters.LUA_DIR.glob("*.lua")}
    assert files == names | {"common", "run"}
    for name in names:
        defined = re.findall(r"^OPS\.(\w+) = function", (counters.LUA_DIR / f"{name}.lua").read_text(), re.M)
        assert defined == [name], f"lua/{name}.lua defines {defined}"


def test_the_script_holds_every_file_once_and_dispatches_last() -> None:
    script = counters.script()
    assert script.startswith((counters.LUA_DIR / "common.lua").read_text())
    assert script.endswith((counters.LUA_DIR / "run.lua").read_text())
    assert sorted(re.findall(r"^OPS\.(\w+) =", script, re.M)) == sorted(c.name for c in counters.COUNTERS)


def test_a_batch_groups_operations_by_bucket_in_order() -> None:
    batch = counters.Batch([f"{{b{n:02d}}}:" for n in range(16)])
    dedup = counters.Dedup(ttl_ms=1)
    handles = [dedup.add(batch, f"xc:a:{i}", "owner") for i in range(40)]
    assert [h.at for h in handles] == list(range(40))
    assert batch.calls(single=True) == [(batch.buckets[0], list(range(40)))]
    per_bucket = batch.calls(single=False)
    assert sorted(i for _, indexes in per_bucket for i in indexes) == list(range(40))
    for bucket, indexes in per_bucket:
        assert indexes == sorted(indexes)
        assert all(batch.ops[i][1].startswith(f"{{b{bucket:02d}}}:") for i in indexes)
    assert len(per_bucket) > 1
