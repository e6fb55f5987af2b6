"""One way to stand up the real Serve app for a test module, on loopback ports."""
from __future__ import annotations

import os

from helpers import free_port

GRPC_SERVICER = "deployments.proto.specserve_pb2_grpc.add_SpecServeServicer_to_server"


def serve_app(args: dict, name: str, grpc: bool = True):
    """Start Ray, Serve (HTTP, and gRPC unless `grpc` is False) and `build_app(args)` as
    app `name`; yield {"handle", "http", "grpc", "logs"}; shut everything down after.
    Use as `yield from serve_app(...)` inside a module-scoped fixture."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from deployments.app import build_app

    http_port, grpc_port = free_port(), free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    grpc_options = ({"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]}
                    if grpc else None)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=grpc_options)
    handle = serve.run(build_app(args), name=name, route_prefix="/")
    yield {"handle": handle, "http": f"http://127.0.0.1:{http_port}",
           "grpc": f"127.0.0.1:{grpc_port}",
           "logs": ray._private.worker.global_worker.node.get_logs_dir_path()}
    serve.shutdown()
    ray.shutdown()
