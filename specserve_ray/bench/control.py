"""Starting the app under test and switching its speculation policy between runs.

Three ways to switch, all ending in the router's `reconfigure(user_config)` (no restart):
- `HandleSwitcher`: an app this process started (or one reachable with `ray.init(address)`):
  a DeploymentHandle call `reconfigure.remote({...})`. Reaches one replica, so the sweep
  starts its own app with one replica.
- `RestSwitcher`: any cluster with a Ray dashboard (KubeRay: port-forward 8265): GET the
  declarative Serve config (`/api/serve/applications/`), change the router's user_config,
  PUT it back; Serve then reconfigures every replica in place. Needs an app deployed
  declaratively (`serve deploy`, `serve run config.yaml`, a RayService).
- none: `--url` alone can only measure the policy that is live.
Every switch is confirmed by polling `GET /v1/stats` until it reports the new policy.
"""
from __future__ import annotations

import asyncio
import copy
import importlib
import os
import socket
import time

import httpx

from specserve_ray.bench.loadgen import get_json

APP_NAME = "specserve"
ROUTER = "SpecRouter"


DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "deployments",
                              "default.yaml")


def app_from_config(config_path: str = DEFAULT_CONFIG) -> tuple[str, dict]:
    """(import_path, args) of the first application of a Serve config file.

    The library names no application package: it builds whatever the config's
    `import_path` says, exactly as `serve run CONFIG` would.
    """
    import yaml

    with open(config_path) as f:
        app = yaml.safe_load(f)["applications"][0]
    return app["import_path"], copy.deepcopy(app.get("args") or {})


def build_from_import_path(import_path: str, args: dict):
    """Call the application builder named `module:attr` with `args` (Serve's convention)."""
    module, _, attr = import_path.partition(":")
    if not module or not attr:
        raise ValueError(f"import_path must be 'module:attribute', got {import_path!r}")
    return getattr(importlib.import_module(module), attr)(args)


def start_app(engine_overrides: dict | None = None, transport: str | None = None,
              config_path: str = DEFAULT_CONFIG) -> tuple[str, callable]:
    """Start Ray and the config's app on a free local port; returns (url, stop).

    `engine_overrides` ({section: {key: value}}) are merged into the config's engine
    sections (e.g. {"target": {"dtype": "bfloat16"}}).
    """
    from specserve_ray.bench.client import PROJECT_WORKER_NICE

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The app as `make serve` runs it: Ray's workers are the server, at nice 0 (Ray's own
    # default of 15 would hand their cycles to any nice-0 process); the client stays at 19.
    os.environ.setdefault("RAY_worker_niceness", str(PROJECT_WORKER_NICE))
    import ray
    from ray import serve

    import_path, args = app_from_config(config_path)
    if transport is not None:
        args["transport"] = transport
    engine = args.setdefault("engine", {})
    for section, values in (engine_overrides or {}).items():
        engine[section] = {**(engine.get(section) or {}), **values}
    # More slots than the config's Serve cap allows (build_app refuses that): raise the cap.
    need = ((engine.get("limits") or {}).get("max_num_seqs", 16)
            + args.get("max_queued_requests", 64))
    if args.get("max_ongoing_requests", 128) < need:
        args["max_ongoing_requests"] = need
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_from_import_path(import_path, args), name=APP_NAME, route_prefix="/")
    except BaseException:
        serve.shutdown()
        ray.shutdown()
        raise

    def stop():
        serve.shutdown()
        ray.shutdown()

    return f"http://127.0.0.1:{port}", stop


def start_sweep_app(regime_dtype: str, max_k: int, synthetic_acceptance_rate: float | None,
                    max_num_seqs: int | None = None, extra: dict | None = None,
                    drafter: str = "model"):
    """The default app with the target in `regime_dtype`. Returns (url, handle, stop)."""
    from ray import serve

    spec = {"num_speculative_tokens": max_k, "drafter": drafter}
    if synthetic_acceptance_rate is not None:
        spec["synthetic_acceptance_rate"] = synthetic_acceptance_rate
    overrides = {"target": {"dtype": regime_dtype}, "speculation": spec}
    if max_num_seqs is not None:
        overrides["limits"] = {"max_num_seqs": max_num_seqs}
    for section, values in (extra or {}).items():
        overrides[section] = {**overrides.get(section, {}), **values}
    url, stop = start_app(overrides, transport="actor")
    return url, serve.get_app_handle(APP_NAME), stop


def _free_port() -> int:
    """A free loopback port in 20000-31999: outside Ray's worker ports (10002-19999) and
    the ephemeral range its services bind from, so Ray cannot take it before Serve binds."""
    import random

    for _ in range(1000):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-31999")


async def wait_for_policy(url: str, policy: str, timeout_s: float) -> dict:
    """Poll /v1/stats until it reports `policy`; returns that snapshot."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = await get_json(url, "/v1/stats")
            if str(last.get("policy", "")).lower() == policy.lower():
                return last
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the server still reports policy {last and last.get('policy')!r}, "
                       f"not {policy!r}, after {timeout_s:.0f} s")


class HandleSwitcher:
    def __init__(self, handle):
        self.handle = handle

    async def switch(self, policy: str, max_k: int) -> None:
        await self.apply({"policy": policy, "num_speculative_tokens": max_k})

    async def apply(self, user_config: dict) -> None:
        # Sync handle calls may not run inside an event loop: do it in a thread.
        await asyncio.to_thread(
            lambda: self.handle.reconfigure.remote(user_config).result(timeout_s=600))


class RestSwitcher:
    def __init__(self, dashboard_url: str, app_name: str = APP_NAME):
        self.dashboard = dashboard_url.rstrip("/")
        self.app_name = app_name

    def _config(self, details: dict, updates: dict) -> dict:
        """The full declarative config with the router's user_config changed."""
        apps = details.get("applications", {})
        if self.app_name not in apps:
            raise RuntimeError(f"no Serve application {self.app_name!r} at {self.dashboard} "
                               f"(found {sorted(apps)})")
        configs = []
        for name, app in apps.items():
            cfg = app.get("deployed_app_config")
            if cfg is None:
                raise RuntimeError(f"application {name!r} was deployed imperatively "
                                   "(serve.run from Python); the REST API can only update "
                                   "declaratively deployed apps (serve deploy / RayService)")
            configs.append(copy.deepcopy(cfg))
        mine = next(c for c in configs if c["name"] == self.app_name)
        deps = mine.setdefault("deployments", [])
        router = next((d for d in deps if d.get("name") == ROUTER), None)
        if router is None:
            router = {"name": ROUTER}
            deps.append(router)
        router["user_config"] = {**(router.get("user_config") or {}), **updates}
        out = {"applications": configs}
        for key in ("proxy_location", "http_options", "grpc_options"):
            if details.get(key) is not None:
                out[key] = details[key]
        return out

    async def switch(self, policy: str, max_k: int) -> None:
        await self.apply({"policy": policy, "num_speculative_tokens": max_k})

    async def apply(self, user_config: dict) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            r = await client.get(self.dashboard + "/api/serve/applications/")
            r.raise_for_status()
            r = await client.put(self.dashboard + "/api/serve/applications/",
                                 json=self._config(r.json(), user_config))
            if r.status_code != 200:
                raise RuntimeError(f"Serve REST API refused the config: {r.status_code} "
                                   f"{r.text[:300]}")
