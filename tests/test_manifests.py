"""The shipped deployment manifests are valid, offline, without Ray running.

* deployments/*.yaml: Ray Serve configs. Each validates with Ray's own
  `ServeDeploySchema`, and its application `args` with `specserve_ray.config.AppConfig`.
* k8s/rayservice-*.yaml: KubeRay RayServices. Each validates with the RayService CRD's
  OpenAPI v3 schema (`$SPECSERVE_SHARED/kuberay/ray.io_rayservices.yaml`, skipped when
  absent), and its `serveConfigV2` string as a Serve config, like the files above.
* The other objects in k8s/ (Service, Ingress): Kubernetes' own schema, strict
  (`kubernetes-validate`, a test extra; skipped with a reason when missing).
* Serve settings of every shipped config (overload, timeouts, drain, fault switches):
  test_serve_settings.py.

Security of the Kubernetes objects (securityContext, token auth, secrets, exposure,
images) is checked in test_k8s_hardening.py, the Dockerfiles in test_dockerfile.py.

Two gaps of those validators are closed here, because both silently accept typos:
Ray's pydantic schemas ignore unknown keys (and keep `autoscaling_config` as a plain
dict), and the CRD schema has no `additionalProperties: false` (the API server prunes
unknown fields instead of rejecting them). `unknown_serve_keys` (serve_config_checks.py)
and `_unknown_k8s_fields` report such keys.

Model paths of GPU configs (e.g. /models/Llama-3.1-8B-Instruct) do not exist here and
`ModelConfig` checks that a path holds a model; `validate_args` swaps them for a local
model directory after checking that they are absolute local paths, not Hub ids.
Nothing imports `deployments.app`.
"""
from __future__ import annotations

import copy
import importlib
import json
import os
from pathlib import Path

import pytest
import yaml

import specserve_ray.config as sconfig
from manifest_files import (INGRESS, RAYSERVICES, ROOT, SERVE_CONFIG_OF, SERVE_CONFIGS,
                            groups, ids, load)
from serve_config_checks import unknown_serve_keys, validate_args

K8S_MANIFESTS = RAYSERVICES
IMPORT_PATH = "deployments.app:build_app"
GRPC_SERVICER = "deployments.proto.specserve_pb2_grpc.add_SpecServeServicer_to_server"
SHARED_ENV = "SPECSERVE_SHARED"
CRD_RELPATH = Path("kuberay") / "ray.io_rayservices.yaml"


_load = load
_ids = ids


def test_manifests_exist():
    names = {p.name for p in SERVE_CONFIGS} | {p.name for p in K8S_MANIFESTS}
    assert {"default.yaml", "gpu-llama.yaml", "rayservice-cpu.yaml",
            "rayservice-gpu.yaml"} <= names


# --------------------------------------------------------------------------- Serve configs
def _check_serve_config(data: dict, local_pair, where: str):
    """Validate a Serve config dict; return [(app dict, AppConfig, external paths)]."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(data)
    unknown = unknown_serve_keys(ServeDeploySchema, data, where)
    assert not unknown, f"keys Ray Serve would silently ignore: {unknown}"

    assert schema.grpc_options.grpc_servicer_functions == [GRPC_SERVICER], where
    module, _, func = GRPC_SERVICER.rpartition(".")
    assert callable(getattr(importlib.import_module(module), func)), GRPC_SERVICER
    assert schema.http_options.port == 8000 and schema.grpc_options.port == 9000, where

    assert schema.applications, f"{where}: no applications"
    out = []
    for app_schema, app in zip(schema.applications, data["applications"]):
        at = f"{where}: app {app_schema.name!r}"
        assert app_schema.import_path == IMPORT_PATH, at
        cfg, external = validate_args(app.get("args") or {}, local_pair, at)

        overrides = {d["name"]: d for d in app.get("deployments") or []}
        assert set(overrides) <= {INGRESS}, f"{at}: unknown deployments {set(overrides)}"
        router = overrides.get(INGRESS)
        if router is not None:
            auto = router.get("autoscaling_config")
            if auto is not None:
                auto_cfg = AutoscalingConfig.model_validate(auto)
                assert router.get("num_replicas") in (None, "auto"), at
                assert auto_cfg.min_replicas <= auto_cfg.max_replicas, at
                if "max_ongoing_requests" in router:
                    assert auto_cfg.target_ongoing_requests <= router["max_ongoing_requests"], at
            if "max_ongoing_requests" in router:
                assert router["max_ongoing_requests"] == cfg.max_ongoing_requests, (
                    f"{at}: SpecRouter.max_ongoing_requests and args.max_ongoing_requests "
                    "disagree")
            user = router.get("user_config") or {}
            if "num_speculative_tokens" in user:
                assert 0 <= user["num_speculative_tokens"] <= 16, at
            if "policy" in user:
                sconfig.SpeculationConfig(policy=user["policy"])  # raises if unknown
            if "max_num_seqs" in user:
                assert 1 <= user["max_num_seqs"] <= cfg.engine.limits.max_num_seqs, (
                    f"{at}: user_config.max_num_seqs exceeds engine.limits.max_num_seqs")
        out.append((app, cfg, external))
    return out


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=_ids(SERVE_CONFIGS))
def test_serve_config_validates(path, local_pair):
    apps = _check_serve_config(_load(path), local_pair, path.name)
    for _app, cfg, external in apps:
        for model in (cfg.engine.target, cfg.engine.draft):
            if model is not None and model.device != "cpu":
                # GPU models are never in the repo: they must be named explicitly.
                assert external, f"{path.name}: GPU model without an explicit local path"


def test_default_config_is_the_cpu_demo(local_pair):
    data = _load(ROOT / "deployments" / "default.yaml")
    assert data["http_options"]["host"] == "127.0.0.1"
    assert data["http_options"]["port"] == 8000
    [(app, cfg, external)] = _check_serve_config(data, local_pair, "default.yaml")
    assert app["name"] == "specserve" and app["route_prefix"] == "/"
    assert external == {}, "the CPU demo uses the embedded pair"
    assert cfg.engine.target.path == local_pair[0] and cfg.engine.draft.path == local_pair[1]
    for model in (cfg.engine.target, cfg.engine.draft):
        assert (model.dtype, model.device) == ("float32", "cpu")
    assert cfg.engine.speculation.num_speculative_tokens == 4
    assert (cfg.engine.limits.max_num_seqs, cfg.engine.limits.max_model_len) == (16, 1024)
    assert cfg.transport == "actor"   # measured faster than compiled_graph on 2 CPU cores
    assert (cfg.router_resources, cfg.draft_resources, cfg.target_resources) == (
        {"CPU": 0.2}, {"CPU": 0.4}, {"CPU": 0.8})
    [router] = app["deployments"]
    assert router["name"] == INGRESS and router["num_replicas"] == 1
    assert router["max_ongoing_requests"] == 128
    assert router["user_config"] == {"num_speculative_tokens": 4, "max_num_seqs": 16}


def test_gpu_llama_config(local_pair):
    data = _load(ROOT / "deployments" / "gpu-llama.yaml")
    assert data["http_options"]["host"] == "0.0.0.0"
    [(app, cfg, external)] = _check_serve_config(data, local_pair, "gpu-llama.yaml")
    assert external == {"target": "/models/Llama-3.1-8B-Instruct",
                        "draft": "/models/Llama-3.2-1B-Instruct"}
    for model in (cfg.engine.target, cfg.engine.draft):
        assert (model.dtype, model.device) == ("bfloat16", "cuda")
    assert cfg.draft_resources == {"CPU": 1, "GPU": 1}
    assert cfg.target_resources == {"CPU": 2, "GPU": 1}
    assert cfg.router_resources == {"CPU": 1}
    assert cfg.placement_strategy == "PACK"
    [router] = app["deployments"]
    assert router["name"] == INGRESS
    assert router["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}


# --------------------------------------------------------------------------- KubeRay

@pytest.fixture(scope="module")
def rayservice_crd():
    """{version name: (version entry, jsonschema validator)} of the RayService CRD."""
    shared = os.environ.get(SHARED_ENV)
    if not shared:
        pytest.skip(f"{SHARED_ENV} is unset: the KubeRay RayService CRD is expected at "
                    f"${SHARED_ENV}/{CRD_RELPATH}")
    crd_path = Path(shared) / CRD_RELPATH
    if not crd_path.is_file():
        pytest.skip(f"no KubeRay RayService CRD at {crd_path} "
                    f"(${SHARED_ENV}/{CRD_RELPATH})")
    from jsonschema import Draft7Validator

    with open(crd_path, encoding="utf-8") as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["names"]["kind"] == "RayService"
    versions = {}
    for entry in crd["spec"]["versions"]:
        schema = entry["schema"]["openAPIV3Schema"]
        Draft7Validator.check_schema(schema)
        versions[entry["name"]] = (entry, Draft7Validator(schema))
    return {"group": crd["spec"]["group"], "versions": versions}


def _unknown_k8s_fields(instance, schema, where: str = "") -> list[str]:
    """Fields a structural CRD schema does not declare (the API server prunes them)."""
    bad = []
    if isinstance(instance, dict) and isinstance(schema, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        keeps_unknown = schema.get("x-kubernetes-preserve-unknown-fields") or extra is True
        for key, value in instance.items():
            at = f"{where}/{key}"
            if props is not None and key in props:
                bad += _unknown_k8s_fields(value, props[key], at)
            elif isinstance(extra, dict):
                bad += _unknown_k8s_fields(value, extra, at)
            elif props is not None and not keeps_unknown:
                bad.append(at)
    elif isinstance(instance, list) and isinstance(schema, dict) \
            and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            bad += _unknown_k8s_fields(item, schema["items"], f"{where}/{i}")
    return bad


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


_groups = groups


def _custom_resources(group: dict) -> dict:
    """rayStartParams.resources, read as both its consumers read it: KubeRay's operator
    (trims quotes/backticks/spaces, then JSON) and Ray's autoscaler (drops the first and
    last character and all backslashes, then JSON; integer values only)."""
    raw = (group.get("rayStartParams") or {}).get("resources")
    if raw is None:
        return {}
    try:
        by_operator = json.loads(raw.strip("'\"` "))
        by_autoscaler = json.loads(raw[1:-1].replace("\\", ""))
    except json.JSONDecodeError as e:
        pytest.fail(f"rayStartParams.resources {raw!r} cannot be parsed by both KubeRay's "
                    f"operator and Ray's autoscaler ({e}); write it as single-quoted JSON, "
                    "e.g. '{\"my_resource\": 1}'")
    assert by_operator == by_autoscaler, raw
    assert all(isinstance(v, int) for v in by_autoscaler.values()), (
        f"Ray's autoscaler requires integer custom resources: {raw}")
    return by_operator


def _rayservice_apps(path: Path, local_pair):
    manifest = _load(path)
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    return manifest, serve_config, _check_serve_config(
        serve_config, local_pair, f"{path.name}: serveConfigV2")


@pytest.mark.parametrize("path", K8S_MANIFESTS, ids=_ids(K8S_MANIFESTS))
def test_rayservice_matches_crd(path, rayservice_crd):
    manifest = _load(path)
    group, _, version = manifest.get("apiVersion", "").partition("/")
    assert group == rayservice_crd["group"] and manifest.get("kind") == "RayService"
    assert version in rayservice_crd["versions"], (
        f"{path.name}: apiVersion {manifest.get('apiVersion')} is not in the CRD "
        f"(versions: {sorted(rayservice_crd['versions'])})")
    entry, validator = rayservice_crd["versions"][version]
    assert entry.get("served") and not entry.get("deprecated"), version

    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:20])
    unknown = _unknown_k8s_fields(manifest, entry["schema"]["openAPIV3Schema"])
    assert not unknown, f"{path.name}: fields the CRD does not define (pruned): {unknown}"
    assert manifest["metadata"].get("name")


@pytest.mark.parametrize("path", K8S_MANIFESTS, ids=_ids(K8S_MANIFESTS))
def test_rayservice_cluster(path):
    import ray

    manifest = _load(path)
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__, (
        "rayVersion must match the Ray the project is tested with")
    head = cluster["headGroupSpec"]
    ports = {p["containerPort"] for p in _containers(head)[0].get("ports", [])}
    assert {6379, 8265, 8000, 9000} <= ports
    # Ray token authentication is on (details in test_k8s_hardening.py).
    assert cluster.get("authOptions", {}).get("mode") == "token", path.name
    for name, group in _groups(manifest):
        for container in _containers(group):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE") == "token", f"{path.name}: {name}"
            assert container.get("image"), f"{path.name}: {name}"
        params = group.get("rayStartParams") or {}
        assert all(isinstance(v, str) for v in params.values()), (
            f"{path.name}: {name}: rayStartParams values must be strings")
        _custom_resources(group)
        if group.get("resources") and ({"num-cpus", "num-gpus", "memory", "resources"}
                                       & set(params)):
            pytest.fail(f"{path.name}: {name}: KubeRay rejects resources set both in "
                        "rayStartParams and in the group's `resources`")
        if name != "head":
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


@pytest.mark.parametrize("path", K8S_MANIFESTS, ids=_ids(K8S_MANIFESTS))
def test_rayservice_serve_config(path, local_pair):
    _manifest, serve_config, apps = _rayservice_apps(path, local_pair)
    assert serve_config["http_options"]["host"] == "0.0.0.0", (
        "in a pod the proxies must listen on all interfaces")
    assert [app["import_path"] for app, _, _ in apps] == [IMPORT_PATH] * len(apps)


def test_cpu_rayservice_is_default_yaml(local_pair):
    _manifest, serve_config, _ = _rayservice_apps(ROOT / "k8s" / "rayservice-cpu.yaml",
                                                  local_pair)
    default = _load(ROOT / "deployments" / "default.yaml")
    default["http_options"]["host"] = "0.0.0.0"
    assert serve_config == default, "serveConfigV2 drifted from deployments/default.yaml"


def test_gpu_rayservice_layout(local_pair):
    path = ROOT / "k8s" / "rayservice-gpu.yaml"
    manifest, serve_config, [(app, cfg, external)] = _rayservice_apps(path, local_pair)
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster.get("enableInTreeAutoscaling") is True

    groups = dict(_groups(manifest))
    head_limits = _containers(groups["head"])[0]["resources"].get("limits", {})
    assert not any(k.endswith("gpu") for k in head_limits), "the head is CPU-only"
    advertised = {}
    for name in ("draft-gpu", "target-gpu"):
        assert name in groups, f"worker group {name!r} missing"
        [container] = _containers(groups[name])
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1, name
        advertised[name] = set(_custom_resources(groups[name]))
        assert advertised[name], f"{name} advertises no custom resource"
    assert not advertised["draft-gpu"] & advertised["target-gpu"]

    # Each worker's bundle names a custom resource only its own group advertises.
    for resources, own, other in ((cfg.draft_resources, "draft-gpu", "target-gpu"),
                                  (cfg.target_resources, "target-gpu", "draft-gpu")):
        assert resources.get("GPU") == 1
        custom = set(resources) - {"CPU", "GPU", "memory"}
        assert custom and custom <= advertised[own] and not custom & advertised[other]
        assert all(0 < resources[k] <= 1 for k in custom)
    assert not set(cfg.router_resources) - {"CPU", "memory"}, "the router stays on CPU"
    assert cfg.placement_strategy == "PACK"

    assert external == {"target": "/models/Llama-3.1-8B-Instruct",
                        "draft": "/models/Llama-3.2-1B-Instruct"}
    router = {d["name"]: d for d in app["deployments"]}[INGRESS]
    assert router.get("autoscaling_config"), "SpecRouter must autoscale"
    assert router["autoscaling_config"]["max_replicas"] <= min(
        groups[g]["maxReplicas"] for g in ("draft-gpu", "target-gpu")), (
        "every replica needs one pod of each GPU group")

    # Same models and engine as deployments/gpu-llama.yaml.
    single = _load(ROOT / "deployments" / "gpu-llama.yaml")["applications"][0]
    assert app["args"]["engine"] == single["args"]["engine"]
    assert app["args"]["model_name"] == single["args"]["model_name"]


def test_gpu_rayservice_is_gpu_llama_yaml():
    """serveConfigV2 of the GPU RayService = deployments/gpu-llama.yaml, except the
    custom resources that pin draft and target to their worker groups."""
    manifest = _load(ROOT / "k8s" / "rayservice-gpu.yaml")
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    for app in serve_config["applications"]:
        for key in ("draft_resources", "target_resources"):
            app["args"][key] = {k: v for k, v in app["args"][key].items()
                                if k in ("CPU", "GPU", "memory")}
    assert serve_config == _load(ROOT / "deployments" / "gpu-llama.yaml"), (
        "serveConfigV2 drifted from deployments/gpu-llama.yaml")


def test_every_rayservice_mirrors_a_serve_config():
    assert {p.name for p in K8S_MANIFESTS} == set(SERVE_CONFIG_OF)


# --------------------------------------------------------------------------- core objects

CORE_DOCS = [(f"{p.name}: {d['kind']} {d['metadata']['name']}", d)
             for p in sorted((ROOT / "k8s").glob("*.yaml"))
             for d in yaml.safe_load_all(p.read_text(encoding="utf-8"))
             if d and d.get("kind") != "RayService"]


def _core_schema_errors(doc: dict) -> str | None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (test extra) is not installed: "
        "the Service and Ingress objects in k8s/ are not checked against Kubernetes' schema")
    try:
        kv.validate(doc, kv.latest_version(), strict=True)   # strict: unknown fields fail
    except kv.ValidationError as exc:
        return str(exc).splitlines()[0]
    return None


@pytest.mark.parametrize("name,doc", CORE_DOCS, ids=[n for n, _ in CORE_DOCS])
def test_core_objects_match_kubernetes_schema(name, doc):
    assert _core_schema_errors(doc) is None


def test_core_object_check_can_fail():
    name, doc = next((n, d) for n, d in CORE_DOCS if d["kind"] == "Service")
    broken = copy.deepcopy(doc)
    broken["spec"]["ports"][0]["tagretPort"] = 8000
    assert "tagretPort" in (_core_schema_errors(broken) or ""), name
