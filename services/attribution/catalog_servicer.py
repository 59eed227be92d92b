"""CatalogService: proto <-> domain translation for campaigns, affiliates, coupons."""

from __future__ import annotations

import asyncpg
from ascribe.attribution.v1 import attribution_pb2_grpc


class CatalogServicer(attribution_pb2_grpc.CatalogServiceServicer):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
