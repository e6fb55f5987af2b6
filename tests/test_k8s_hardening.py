"""Security of the shipped Kubernetes objects, checked offline (no cluster here).

Every RayService (k8s/rayservice-*.yaml):
* each pod and container runs non-root with no privilege escalation, all capabilities
  dropped, the RuntimeDefault seccomp profile and a read-only root filesystem (with a
  writable emptyDir at /tmp, where Ray keeps its session directory);
* Ray token authentication is on (`authOptions.mode: token`, RAY_AUTH_MODE=token and
  RAY_AUTH_TOKEN from the same Secret on every Ray container), the API key comes from a
  Secret, and no credential is written into a manifest;
* images are pinned to the tag docker/Dockerfile.<variant> builds (never `latest`);
  every container has resource requests and limits;
* no fault-injection environment switch is on.
Every Service and Ingress in k8s/: nothing is exposed beyond the cluster except HTTP and
gRPC through a TLS-terminating Ingress; the dashboard, GCS and Ray client ports never are.

Each check is a function returning problems; `test_*_can_fail` break a copy of the
shipped objects in each way and assert that the check reports it.
"""
from __future__ import annotations

import copy

import pytest

from manifest_files import (K8S_FILES, RAYSERVICES, containers, env_of, expected_image,
                            groups, ids, load, load_docs, pod_specs)

RAY_AUTH_SECRET_KEY = "auth_token"      # the key KubeRay's operator reads the token from
CREDENTIAL_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")
INTERNAL_PORTS = {6379: "GCS", 8265: "dashboard", 10001: "Ray client", 52365: "agent",
                  8080: "metrics"}
EXPOSED_TYPES = {"LoadBalancer", "NodePort"}


# --------------------------------------------------------------------------- checks

def security_problems(manifest: dict) -> list[str]:
    problems = []
    for name, spec in pod_specs(manifest):
        pod = spec.get("securityContext") or {}
        if pod.get("runAsNonRoot") is not True:
            problems.append(f"pod {name}: runAsNonRoot is not true")
        if not isinstance(pod.get("runAsUser"), int) or pod["runAsUser"] <= 0:
            problems.append(f"pod {name}: runAsUser is not a fixed non-root uid")
        if (pod.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"pod {name}: seccompProfile is not RuntimeDefault")
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            problems.append(f"pod {name}: shares a host namespace")
    for where, c, spec in containers(manifest):
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if sc.get("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser", 1) == 0:
            problems.append(f"{where}: runs as root")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{where}: capabilities do not drop ALL")
        if caps.get("add"):
            problems.append(f"{where}: adds capabilities {caps['add']}")
        if (sc.get("seccompProfile") or {}).get("type") not in (None, "RuntimeDefault"):
            problems.append(f"{where}: seccompProfile is not RuntimeDefault")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: root filesystem is writable")
        elif not _writable_tmp(c, spec):
            problems.append(f"{where}: read-only root but no emptyDir at /tmp "
                            "(Ray writes /tmp/ray)")
    return problems


def _writable_tmp(container: dict, spec: dict) -> bool:
    empty_dirs = {v["name"] for v in spec.get("volumes") or [] if "emptyDir" in v}
    return any(m.get("mountPath") == "/tmp" and m.get("name") in empty_dirs
               and not m.get("readOnly") for m in container.get("volumeMounts") or [])


def resource_problems(manifest: dict) -> list[str]:
    problems = []
    for where, c, _spec in containers(manifest):
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(res.get(kind) or {})
            if missing:
                problems.append(f"{where}: no {kind} for {sorted(missing)}")
    return problems


def image_problems(manifest: dict, expected: str) -> list[str]:
    problems = []
    for where, c, _spec in containers(manifest):
        image = c.get("image")
        if image is None and where.endswith("/autoscaler"):
            continue                            # KubeRay runs it on the head's image
        repo_tag = (image or "").split("@")[0]
        _, _, tag = repo_tag.rpartition(":")
        if not tag or "/" in tag or tag == "latest" or "latest" in tag.split("-"):
            problems.append(f"{where}: image {image!r} is not pinned to a version tag")
        elif repo_tag.rsplit("/", 1)[-1] != expected:
            problems.append(f"{where}: image {image!r} is not {expected!r}, the tag "
                            "the Dockerfile builds")
    return problems


def _secret_ref(entry: dict | None) -> dict | None:
    return ((entry or {}).get("valueFrom") or {}).get("secretKeyRef")


def auth_problems(manifest: dict) -> list[str]:
    problems = []
    auth = manifest["spec"]["rayClusterConfig"].get("authOptions") or {}
    secret = auth.get("secretName")
    if auth.get("mode") != "token":
        problems.append("authOptions.mode is not token: Ray runs without authentication")
    if not secret:
        problems.append("authOptions.secretName is not set: the token would be generated "
                        "by the operator, not taken from the Secret the containers name")
    for where, c, _spec in containers(manifest):
        env = env_of(c)
        mode = (env.get("RAY_AUTH_MODE") or {}).get("value")
        if mode != "token":
            problems.append(f"{where}: RAY_AUTH_MODE is {mode!r}, not token")
        ref = _secret_ref(env.get("RAY_AUTH_TOKEN"))
        if ref is None:
            problems.append(f"{where}: RAY_AUTH_TOKEN does not come from a Secret")
        elif (ref.get("name"), ref.get("key")) != (secret, RAY_AUTH_SECRET_KEY):
            problems.append(f"{where}: RAY_AUTH_TOKEN comes from {ref}, not Secret "
                            f"{secret!r} key {RAY_AUTH_SECRET_KEY!r}")
        if where.endswith("/autoscaler"):
            continue                            # runs no replica: needs no API key
        if _secret_ref(env.get("SPECSERVE_API_KEY")) is None:
            problems.append(f"{where}: SPECSERVE_API_KEY does not come from a Secret")
    return problems


def inlined_secret_problems(docs: list[dict]) -> list[str]:
    """Credentials written into the manifests: literal env values of credential-named
    variables, and Secret objects that carry data."""
    problems = []
    for doc in docs:
        if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
            problems.append(f"Secret {doc['metadata'].get('name')!r} carries data")
        if doc.get("kind") != "RayService":
            continue
        for where, c, _spec in containers(doc):
            for name, entry in env_of(c).items():
                if any(w in name.upper() for w in CREDENTIAL_WORDS) and "value" in entry:
                    problems.append(f"{where}: {name} is written inline")
    return problems


def fault_env_problems(manifest: dict) -> list[str]:
    return [f"{where}: {name}={entry.get('value')!r} switches fault injection on"
            for where, c, _spec in containers(manifest)
            for name, entry in env_of(c).items()
            if "FAULT" in name.upper() and str(entry.get("value", "")).strip().lower()
            not in ("", "0", "false", "off", "no", "none", "disabled")]


def exposure_problems(docs: list[dict]) -> list[str]:
    """Anything reachable from outside the cluster other than HTTP/gRPC over TLS."""
    problems = []
    for doc in docs:
        kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
        if kind == "RayService":
            spec = doc["spec"]
            head = spec["rayClusterConfig"]["headGroupSpec"]
            if head.get("serviceType", "ClusterIP") != "ClusterIP":
                problems.append(f"{name}: head Service type {head['serviceType']} "
                                "exposes the GCS and the dashboard")
            head_svc = ((head.get("headService") or {}).get("spec") or {})
            if head_svc.get("type") in EXPOSED_TYPES:
                problems.append(f"{name}: headService type {head_svc['type']}")
            if head.get("enableIngress"):
                problems.append(f"{name}: enableIngress exposes the dashboard")
            serve_type = ((spec.get("serveService") or {}).get("spec") or {}).get("type")
            if serve_type in EXPOSED_TYPES:
                problems.append(f"{name}: serveService type {serve_type} (plain HTTP)")
            for gname, group in groups(doc):
                for c in group["template"]["spec"].get("containers") or []:
                    for port in c.get("ports") or []:
                        if port.get("hostPort"):
                            problems.append(f"{name}/{gname}: hostPort {port['hostPort']}")
        elif kind == "Service":
            stype = (doc.get("spec") or {}).get("type", "ClusterIP")
            if stype != "ClusterIP":
                problems.append(f"Service {name}: type {stype} (use the TLS Ingress)")
            for port in (doc.get("spec") or {}).get("ports") or []:
                hit = ({port.get("targetPort"), port.get("port")} & set(INTERNAL_PORTS))
                if hit:
                    problems.append(f"Service {name}: routes the "
                                    f"{INTERNAL_PORTS[min(hit)]} port")
        elif kind == "Ingress":
            spec = doc.get("spec") or {}
            tls = spec.get("tls") or []
            tls_hosts = {h for t in tls if t.get("secretName") for h in t.get("hosts") or []}
            for rule in spec.get("rules") or []:
                if rule.get("host") not in tls_hosts:
                    problems.append(f"Ingress {name}: host {rule.get('host')!r} without TLS "
                                    "(a tls entry with a secretName)")
                for path in (rule.get("http") or {}).get("paths") or []:
                    backend = (path.get("backend") or {}).get("service") or {}
                    port = backend.get("port") or {}
                    if port.get("number") in INTERNAL_PORTS or port.get("name") in (
                            "dashboard", "gcs-server", "client", "metrics"):
                        problems.append(f"Ingress {name}: routes to {port}")
                    if not _routes_to_serve_port(docs, backend):
                        problems.append(f"Ingress {name}: backend {backend} is not the "
                                        "serve HTTP/gRPC port of a Service here")
    return problems


def _routes_to_serve_port(docs: list[dict], backend: dict) -> bool:
    port = backend.get("port") or {}
    for doc in docs:
        if doc.get("kind") == "Service" and doc["metadata"]["name"] == backend.get("name"):
            for p in doc["spec"].get("ports") or []:
                if port.get("name") in (None, p.get("name")) and port.get("number") in (
                        None, p.get("port")):
                    return p.get("targetPort", p.get("port")) in (8000, 9000)
    return False


# --------------------------------------------------------------------------- shipped

ALL_DOCS = [d for p in K8S_FILES for d in load_docs(p)]


@pytest.mark.parametrize("path", RAYSERVICES, ids=ids(RAYSERVICES))
def test_rayservice_hardened(path):
    manifest = load(path)
    assert security_problems(manifest) == []
    assert resource_problems(manifest) == []
    assert image_problems(manifest, expected_image(path.name)) == []
    assert auth_problems(manifest) == []
    assert inlined_secret_problems([manifest]) == []
    assert fault_env_problems(manifest) == []
    # Every Ray container is covered (head, each worker group, the autoscaler if on).
    names = {where.split("/")[0] for where, _c, _s in containers(manifest)}
    assert names == {name for name, _g in groups(manifest)}


def test_nothing_exposed_beyond_the_cluster():
    kinds = {d["kind"] for d in ALL_DOCS}
    assert {"RayService", "Service", "Ingress"} <= kinds, kinds
    assert exposure_problems(ALL_DOCS) == []
    assert inlined_secret_problems(ALL_DOCS) == []


def test_ingress_terminates_tls_for_http_and_grpc():
    ingresses = [d for d in ALL_DOCS if d["kind"] == "Ingress"]
    ports = {p["backend"]["service"]["port"]["name"] for i in ingresses
             for r in i["spec"]["rules"] for p in r["http"]["paths"]}
    assert ports == {"http", "grpc"}
    grpc = [i for i in ingresses if any(
        p["backend"]["service"]["port"]["name"] == "grpc"
        for r in i["spec"]["rules"] for p in r["http"]["paths"])]
    assert all(i["metadata"]["annotations"].get(
        "nginx.ingress.kubernetes.io/backend-protocol") == "GRPC" for i in grpc)


# --------------------------------------------------------------------------- can fail

def _head_container(m):
    return m["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _worker_container(m):
    group = m["spec"]["rayClusterConfig"]["workerGroupSpecs"][-1]
    return group["template"]["spec"]["containers"][0]


def _head_pod(m):
    return m["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]


def _set_env(container, name, entry):
    container["env"] = [e for e in container.get("env") or [] if e["name"] != name]
    if entry is not None:
        container["env"].append({"name": name, **entry})


RAYSERVICE_MUTATIONS = {
    "root user": (lambda m: _head_pod(m)["securityContext"].update(runAsUser=0),
                  security_problems, "runAsUser is not a fixed non-root uid"),
    "pod may run as root": (lambda m: _head_pod(m)["securityContext"].pop("runAsNonRoot"),
                            security_problems, "runAsNonRoot is not true"),
    "no seccomp": (lambda m: _head_pod(m)["securityContext"].pop("seccompProfile"),
                   security_problems, "seccompProfile"),
    "escalation": (lambda m: _worker_container(m)["securityContext"].update(
        allowPrivilegeEscalation=True), security_problems, "allowPrivilegeEscalation"),
    "no securityContext": (lambda m: _worker_container(m).pop("securityContext"),
                           security_problems, "allowPrivilegeEscalation"),
    "capabilities kept": (lambda m: _head_container(m)["securityContext"].pop(
        "capabilities"), security_problems, "do not drop ALL"),
    "capability added": (lambda m: _head_container(m)["securityContext"]["capabilities"]
                         .update(add=["NET_ADMIN"]), security_problems, "adds capabilities"),
    "writable root": (lambda m: _head_container(m)["securityContext"].update(
        readOnlyRootFilesystem=False), security_problems, "root filesystem is writable"),
    "read-only /tmp": (lambda m: _worker_container(m).update(volumeMounts=[
        v for v in _worker_container(m)["volumeMounts"] if v["mountPath"] != "/tmp"]),
        security_problems, "no emptyDir at /tmp"),
    "no limits": (lambda m: _worker_container(m)["resources"].pop("limits"),
                  resource_problems, "no limits"),
    "no memory request": (lambda m: _head_container(m)["resources"]["requests"].pop(
        "memory"), resource_problems, "no requests for ['memory']"),
    "auth disabled": (lambda m: m["spec"]["rayClusterConfig"]["authOptions"].update(
        mode="disabled"), auth_problems, "authOptions.mode is not token"),
    "no auth options": (lambda m: m["spec"]["rayClusterConfig"].pop("authOptions"),
                        auth_problems, "authOptions.mode is not token"),
    "container auth off": (lambda m: _set_env(_worker_container(m), "RAY_AUTH_MODE",
                                              {"value": "disabled"}),
                           auth_problems, "RAY_AUTH_MODE is 'disabled'"),
    "token inline": (lambda m: _set_env(_head_container(m), "RAY_AUTH_TOKEN",
                                        {"value": "not-a-real-token"}),
                     auth_problems, "RAY_AUTH_TOKEN does not come from a Secret"),
    "token from another secret": (lambda m: _set_env(_head_container(m), "RAY_AUTH_TOKEN", {
        "valueFrom": {"secretKeyRef": {"name": "other", "key": "auth_token"}}}),
        auth_problems, "not Secret"),
    "api key missing": (lambda m: _set_env(_worker_container(m), "SPECSERVE_API_KEY", None),
                        auth_problems, "SPECSERVE_API_KEY does not come from a Secret"),
    "api key inline": (lambda m: _set_env(_head_container(m), "SPECSERVE_API_KEY",
                                          {"value": "sk-not-real"}),
                       lambda m: inlined_secret_problems([m]), "written inline"),
    "fault env on": (lambda m: _set_env(_head_container(m), "SPECSERVE_FAULTS",
                                        {"value": "draft:die@3"}),
                     fault_env_problems, "switches fault injection on"),
    "head service LoadBalancer": (lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"]
                                  .update(serviceType="LoadBalancer"),
                                  lambda m: exposure_problems([m]), "exposes the GCS"),
    "head service NodePort": (lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"]
                              .update(headService={"spec": {"type": "NodePort"}}),
                              lambda m: exposure_problems([m]), "headService type NodePort"),
    "dashboard ingress": (lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"]
                          .update(enableIngress=True),
                          lambda m: exposure_problems([m]), "enableIngress"),
    "serve service NodePort": (lambda m: m["spec"].update(
        serveService={"spec": {"type": "NodePort"}}),
        lambda m: exposure_problems([m]), "serveService type NodePort"),
}


def _latest(m):
    _head_container(m)["image"] = "specserve-ray:latest"


def _other_tag(m):
    _worker_container(m)["image"] = "specserve-ray:0.0.9-cpu"


RAYSERVICE_MUTATIONS["latest image"] = (_latest, None, "not pinned")
RAYSERVICE_MUTATIONS["image tag drift"] = (_other_tag, None, "the tag the Dockerfile builds")


@pytest.mark.parametrize("mutation", sorted(RAYSERVICE_MUTATIONS))
@pytest.mark.parametrize("path", RAYSERVICES, ids=ids(RAYSERVICES))
def test_rayservice_checks_can_fail(path, mutation):
    mutate, check, words = RAYSERVICE_MUTATIONS[mutation]
    if check is None:
        def check(m):
            return image_problems(m, expected_image(path.name))
    broken = copy.deepcopy(load(path))
    mutate(broken)
    problems = check(broken)
    assert any(words in p for p in problems), (mutation, problems)


def _find(docs, kind):
    return next(d for d in docs if d["kind"] == kind)


EXPOSURE_MUTATIONS = {
    "service LoadBalancer": (lambda ds: _find(ds, "Service")["spec"].update(
        type="LoadBalancer"), "type LoadBalancer"),
    "service routes dashboard": (lambda ds: _find(ds, "Service")["spec"]["ports"].append(
        {"name": "dashboard", "port": 8265, "targetPort": 8265}), "routes the dashboard"),
    "ingress without tls": (lambda ds: _find(ds, "Ingress")["spec"].pop("tls"),
                            "without TLS"),
    "ingress to dashboard": (lambda ds: _find(ds, "Ingress")["spec"]["rules"][0]["http"][
        "paths"][0]["backend"]["service"].update(port={"number": 8265}),
        "routes to"),
    "inline Secret": (lambda ds: ds.append({"kind": "Secret", "metadata": {"name": "s"},
                                            "stringData": {"auth_token": "x"}}),
                      "carries data"),
}


@pytest.mark.parametrize("mutation", sorted(EXPOSURE_MUTATIONS))
def test_exposure_checks_can_fail(mutation):
    mutate, words = EXPOSURE_MUTATIONS[mutation]
    docs = copy.deepcopy(ALL_DOCS)
    mutate(docs)
    problems = exposure_problems(docs) + inlined_secret_problems(docs)
    assert any(words in p for p in problems), (mutation, problems)
