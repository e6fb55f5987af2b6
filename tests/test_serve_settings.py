"""The Serve settings of every shipped config (`_serve_settings_problems`): Serve never
holds requests back before the app's own queue is full (max_ongoing_requests >= slots +
queue), its own queue is bounded and answers with Retry-After, request timeouts and a
graceful drain are set, and no fault-injection switch is on. Each check is shown to fail
on a broken copy of every shipped config. Offline: nothing here starts Ray."""
from __future__ import annotations

import copy
import re

import pytest

from manifest_files import INGRESS, shipped_serve_configs
from serve_config_checks import unknown_serve_keys, validate_args

FAULT_KEY = re.compile(r"fault", re.IGNORECASE)
OFF_WORDS = {"", "0", "false", "off", "no", "none", "disabled"}


def _is_off(value) -> bool:
    """Whether a fault-injection switch's value leaves injection off."""
    if value is None or value is False or value == 0:
        return True
    if isinstance(value, str):
        return value.strip().lower() in OFF_WORDS
    if isinstance(value, dict):
        if "enabled" in value:
            return _is_off(value["enabled"])
        return all(_is_off(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return len(value) == 0
    return False


def _fault_switches_on(data, where: str = "") -> list[str]:
    """Paths of keys named like fault injection (`fault_injection`, `faults`, ...) whose
    value turns it on, anywhere in `data`."""
    found = []
    if isinstance(data, dict):
        for key, value in data.items():
            at = f"{where}.{key}" if where else str(key)
            if FAULT_KEY.search(str(key)) and not _is_off(value):
                found.append(at)
            else:
                found += _fault_switches_on(value, at)
    elif isinstance(data, list):
        for i, item in enumerate(data):
            found += _fault_switches_on(item, f"{where}[{i}]")
    return found


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _serve_settings_problems(data: dict, local_pair, where: str) -> list[str]:
    """What a shipped Serve config gets wrong about overload, timeouts, drain and fault
    injection; [] when nothing. Limits are read as the app reads them: args through
    AppConfig, then the deployment's user_config (live max_num_seqs up to the cache
    slots, max_queued_requests) and Serve's per-deployment overrides."""
    problems = []
    http, grpc = data.get("http_options") or {}, data.get("grpc_options") or {}
    if not _positive(http.get("request_timeout_s")):
        problems.append(f"{where}: http_options.request_timeout_s is not set (> 0)")
    if grpc.get("grpc_servicer_functions") and not _positive(grpc.get("request_timeout_s")):
        problems.append(f"{where}: grpc_options.request_timeout_s is not set (> 0)")
    for at in _fault_switches_on(data):
        problems.append(f"{where}: fault injection switched on at {at}")

    for app in data.get("applications") or []:
        at = f"{where}: app {app.get('name')!r}"
        try:
            cfg, _ = validate_args(app.get("args") or {}, local_pair, at)
        except ValueError as exc:       # pydantic's ValidationError included
            problems.append(f"{at}: args rejected by AppConfig: {exc}")
            continue
        router = {d["name"]: d for d in app.get("deployments") or []}.get(INGRESS) or {}
        user = router.get("user_config") or {}
        slots = cfg.engine.limits.max_num_seqs         # live max_num_seqs may rise to it
        live_slots = user.get("max_num_seqs", slots)
        queue = user.get("max_queued_requests", cfg.max_queued_requests)
        ongoing = router.get("max_ongoing_requests", cfg.max_ongoing_requests)
        if ongoing < max(slots, live_slots) + queue:
            problems.append(
                f"{at}: max_ongoing_requests {ongoing} < max_num_seqs {slots} + "
                f"max_queued_requests {queue}: Serve would queue requests the app has "
                "room for")
        serve_queue = router.get("max_queued_requests", -1)
        if not (isinstance(serve_queue, int) and serve_queue >= 0):
            problems.append(f"{at}: SpecRouter.max_queued_requests (Serve's own queue) "
                            "is unbounded")
        backpressure = router.get("backpressure_config") or {}
        if not _positive(backpressure.get("retry_after_s")):
            problems.append(f"{at}: SpecRouter.backpressure_config.retry_after_s is not "
                            "set: Serve's refusals would carry no Retry-After")
        for field in ("graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s"):
            if not _positive(router.get(field)):
                problems.append(f"{at}: SpecRouter.{field} is not set (> 0)")
        if _positive(router.get("graceful_shutdown_wait_loop_s")) and _positive(
                router.get("graceful_shutdown_timeout_s")) and router[
                "graceful_shutdown_wait_loop_s"] >= router["graceful_shutdown_timeout_s"]:
            problems.append(f"{at}: graceful_shutdown_wait_loop_s >= "
                            "graceful_shutdown_timeout_s")
    return problems


SHIPPED = shipped_serve_configs()


@pytest.mark.parametrize("name,data", SHIPPED, ids=[n for n, _ in SHIPPED])
def test_shipped_serve_settings(name, data, local_pair):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(data)   # every field used exists in Ray
    assert not unknown_serve_keys(ServeDeploySchema, data, name)
    assert _serve_settings_problems(data, local_pair, name) == []
    # The values Ray parsed are the ones the checks read.
    assert schema.http_options.request_timeout_s == data["http_options"]["request_timeout_s"]
    [router] = [d for d in schema.applications[0].deployments if d.name == INGRESS]
    assert router.backpressure_config.retry_after_s > 0
    assert router.graceful_shutdown_timeout_s > 0


def _set(path: str, value):
    """A mutation that sets a dotted path (list indexes as numbers) in a Serve config."""
    def mutate(data):
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[last] = value
    return mutate


def _delete(path: str):
    def mutate(data):
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[last]
    return mutate


ROUTER = "applications.0.deployments.0"
SETTINGS_MUTATIONS = {
    # name: (mutation, words the problem must contain)
    "ongoing below slots + queue": (_set(f"{ROUTER}.max_ongoing_requests", 32),
                                    "max_ongoing_requests 32 <"),
    "queue raised live": (_set(f"{ROUTER}.user_config.max_queued_requests", 4096),
                          "max_queued_requests 4096"),
    "no http timeout": (_delete("http_options.request_timeout_s"),
                        "http_options.request_timeout_s"),
    "no grpc timeout": (_delete("grpc_options.request_timeout_s"),
                        "grpc_options.request_timeout_s"),
    "no graceful timeout": (_delete(f"{ROUTER}.graceful_shutdown_timeout_s"),
                            "graceful_shutdown_timeout_s is not set"),
    "no graceful loop": (_delete(f"{ROUTER}.graceful_shutdown_wait_loop_s"),
                         "graceful_shutdown_wait_loop_s is not set"),
    "serve queue unbounded": (_set(f"{ROUTER}.max_queued_requests", -1), "unbounded"),
    "no retry-after": (_delete(f"{ROUTER}.backpressure_config"), "Retry-After"),
    "fault injection on": (_set("applications.0.args.fault_injection",
                                {"enabled": True, "worker": "draft", "step": 3}),
                           "fault injection switched on"),
    "faults in user_config": (_set(f"{ROUTER}.user_config.faults", "draft:stall@5"),
                              "fault injection switched on"),
}


@pytest.mark.parametrize("mutation", sorted(SETTINGS_MUTATIONS))
@pytest.mark.parametrize("name,data", SHIPPED, ids=[n for n, _ in SHIPPED])
def test_serve_settings_checks_can_fail(name, data, mutation, local_pair):
    """Each check above catches its fault in a copy of every shipped config."""
    mutate, words = SETTINGS_MUTATIONS[mutation]
    broken = copy.deepcopy(data)
    mutate(broken)
    problems = _serve_settings_problems(broken, local_pair, name)
    assert any(words in p for p in problems), (mutation, problems)


def test_fault_switch_off_values_pass():
    assert _fault_switches_on({"args": {"fault_injection": None, "faults": [],
                                        "x": {"fault": {"enabled": False}}}}) == []
    assert _fault_switches_on({"a": [{"FAULTS": "on"}]}) == ["a[0].FAULTS"]
