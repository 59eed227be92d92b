"""The gRPC floor: a bare grpc.aio + uvloop FraudService that answers every CheckClick with an empty Verdict.

    python -m bench.refgrpc PORT

No validation, no Redis, no rules: whatever a fraud check costs above this
is ascribe's own work; this is what any Python gRPC handler pays per call.
"""

from __future__ import annotations

import sys

import grpc
import uvloop
from ascribe.fraud.v1 import fraud_pb2 as pb
from ascribe.fraud.v1 import fraud_pb2_grpc


class EmptyFraud(fraud_pb2_grpc.FraudServiceServicer):
    async def CheckClick(self, request: pb.CheckClickRequest, context: object) -> pb.Verdict:
        return pb.Verdict()


async def serve(port: int) -> None:
    server = grpc.aio.server()
    # Only CheckClick is answered; the other RPCs stay UNIMPLEMENTED (the stub base class).
    fraud_pb2_grpc.add_FraudServiceServicer_to_server(EmptyFraud(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
