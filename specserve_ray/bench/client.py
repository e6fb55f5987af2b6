"""The load generator's own process: niced below the server, its CPU use measured.

On a 2-core machine a client at nice 0 wins every contended cycle from Ray's workers (nice
15), which slows the server it measures (../shared/ENVIRONMENT.md). So the HTTP client runs
in one spawned child process at nice 19 (`os.nice`), and every call reports the child's
own CPU seconds (`resource.getrusage(RUSAGE_SELF)`) beside the wall time, so a report can
show the client stayed light. The child lives for the whole benchmark (spawned once).
"""
from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ProcessPoolExecutor

CLIENT_NICE = 19
# The project runs Ray's workers (router, draft, target: the server) at nice 0, as the
# Makefile's RAY_worker_niceness does; Ray's own default (15) suits drivers, not servers.
PROJECT_WORKER_NICE = 0


def server_worker_nice(env: dict | None = None) -> int:
    """The niceness of the workers of an app this benchmark starts: RAY_worker_niceness
    (which control.start_app defaults to the project's 0 before starting Ray)."""
    env = os.environ if env is None else env
    try:
        return int(env.get("RAY_worker_niceness", PROJECT_WORKER_NICE))
    except ValueError:
        return PROJECT_WORKER_NICE


def _cpu_seconds() -> float:
    try:
        import resource

        u = resource.getrusage(resource.RUSAGE_SELF)
        return u.ru_utime + u.ru_stime
    except ImportError:      # not POSIX: process-wide CPU time from the stdlib
        return time.process_time()


def _init(nice: int) -> None:
    # os.nice adds to the current niceness; bring the child to `nice` exactly (it can only go up).
    current = os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0
    if hasattr(os, "nice") and nice > current:
        os.nice(nice - current)


def _call(kind: str, kwargs: dict, desc: str | None) -> dict:
    """Runs in the child: one open- or closed-loop run, with its CPU accounting."""
    from specserve_ray.bench import loadgen

    progress = None
    if desc:
        from tqdm import tqdm

        progress = tqdm(total=len(kwargs["prompts"]), desc=desc, unit="req", leave=False,
                        position=1)
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    try:
        if kind == "open":
            records, duration = asyncio.run(loadgen.run_open_loop(progress=progress, **kwargs))
        elif kind == "closed":
            records, duration = asyncio.run(loadgen.run_closed_loop(**kwargs))
        elif kind == "get":
            return {"json": asyncio.run(loadgen.get_json(**kwargs))}
        else:
            raise ValueError(kind)
    finally:
        if progress is not None:
            progress.close()
    cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
    return {"records": records, "duration": duration,
            "client": {"cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
                       "cpu_share_of_one_core": round(cpu / wall, 4) if wall > 0 else None,
                       "nice": _niceness()}}


def _niceness() -> int | None:
    return os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else None


class ClientProcess:
    """One child process that sends the benchmark's requests; use as a context manager."""

    def __init__(self, nice: int = CLIENT_NICE):
        import multiprocessing as mp

        self.nice = nice
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                                         initializer=_init, initargs=(nice,))
        self.cpu_s = 0.0
        self.wall_s = 0.0

    def _run(self, kind: str, kwargs: dict, desc: str | None = None) -> dict:
        out = self._pool.submit(_call, kind, kwargs, desc).result()
        if "client" in out:
            self.cpu_s += out["client"]["cpu_s"]
            self.wall_s += out["client"]["wall_s"]
        return out

    def open_loop(self, desc: str | None = None, **kwargs) -> dict:
        """loadgen.run_open_loop(**kwargs) in the child: {records, duration, client}."""
        return self._run("open", kwargs, desc)

    def closed_loop(self, **kwargs) -> dict:
        return self._run("closed", kwargs)

    def get_json(self, url: str, path: str) -> dict:
        return self._run("get", {"url": url, "path": path})["json"]

    def summary(self) -> dict:
        """The client's CPU use over every call so far (for the report)."""
        return {"process": "separate (spawned)", "nice": self.nice,
                "cpu_s": round(self.cpu_s, 2), "wall_s": round(self.wall_s, 2),
                "cpu_share_of_one_core": round(self.cpu_s / self.wall_s, 4)
                if self.wall_s else None}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
