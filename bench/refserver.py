"""The Python floor: a bare aiohttp + uvloop handler answering /click with a 302.

    python -m bench.refserver PORT

No parsing beyond the query string, no I/O: whatever the gateway's click
costs above this is ascribe's own work.
"""

from __future__ import annotations

import sys
import uuid

import uvloop
from aiohttp import web

LANDING = "https://shop.example/landing"


async def click(request: web.Request) -> web.Response:
    click_id = uuid.uuid4().hex
    coupon = request.query.get("coupon")
    location = f"{LANDING}?click_id={click_id}" + (f"&coupon={coupon}" if coupon else "")
    return web.Response(status=302, headers={"Location": location, "X-Ascribe-Click-Id": click_id})


def main() -> None:
    app = web.Application()
    app.router.add_get("/click", click)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
