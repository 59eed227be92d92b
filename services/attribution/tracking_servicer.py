"""TrackingService: proto <-> domain translation for clicks and conversions."""

from __future__ import annotations

import asyncpg
from ascribe.attribution.v1 import attribution_pb2_grpc


class TrackingServicer(attribution_pb2_grpc.TrackingServiceServicer):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
