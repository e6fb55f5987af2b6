"""The shipped deployment files, loaded for the offline manifest tests.

Serve configs: deployments/*.yaml and the `serveConfigV2` string of every RayService in
k8s/. Kubernetes objects: every document of every k8s/*.yaml. Nothing here needs Ray.
"""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIGS = sorted((ROOT / "deployments").glob("*.yaml"))
K8S_FILES = sorted((ROOT / "k8s").glob("*.yaml"))
RAYSERVICES = sorted((ROOT / "k8s").glob("rayservice-*.yaml"))
INGRESS = "SpecRouter"

# Images the manifests run: <project version>-<variant>, built by docker/Dockerfile.<variant>.
IMAGE_REPOSITORY = "specserve-ray"
VARIANT_OF = {"rayservice-cpu.yaml": "cpu", "rayservice-gpu.yaml": "cuda"}
# The deployments/ config each RayService's serveConfigV2 mirrors.
SERVE_CONFIG_OF = {"rayservice-cpu.yaml": "default.yaml",
                   "rayservice-gpu.yaml": "gpu-llama.yaml"}


def ids(paths) -> list[str]:
    return [p.name for p in paths]


def load_docs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert all(isinstance(d, dict) for d in docs), f"{path.name}: a document is not a mapping"
    return docs


def load(path: Path) -> dict:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    return docs[0]


def project_version() -> str:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def expected_image(manifest_name: str) -> str:
    return f"{IMAGE_REPOSITORY}:{project_version()}-{VARIANT_OF[manifest_name]}"


def shipped_serve_configs() -> list[tuple[str, dict]]:
    """(name, Serve config dict) of every config this repository ships."""
    out = [(p.name, load(p)) for p in SERVE_CONFIGS]
    for p in RAYSERVICES:
        out.append((f"{p.name}: serveConfigV2",
                    yaml.safe_load(load(p)["spec"]["serveConfigV2"])))
    return out


def groups(manifest: dict) -> list[tuple[str, dict]]:
    cluster = manifest["spec"]["rayClusterConfig"]
    return [("head", cluster["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster.get("workerGroupSpecs") or []]


def pod_specs(manifest: dict) -> list[tuple[str, dict]]:
    return [(name, g["template"]["spec"]) for name, g in groups(manifest)]


def containers(manifest: dict) -> list[tuple[str, dict, dict | None]]:
    """(where, container, its pod spec or None) of every container the RayService
    defines: each group's containers and init containers, and the autoscaler sidecar
    (autoscalerOptions, which KubeRay adds to the head pod) when autoscaling is on."""
    out = []
    for name, spec in pod_specs(manifest):
        for kind in ("containers", "initContainers"):
            for c in spec.get(kind) or []:
                out.append((f"{name}/{c.get('name')}", c, spec))
    cluster = manifest["spec"]["rayClusterConfig"]
    if cluster.get("enableInTreeAutoscaling"):
        head_spec = cluster["headGroupSpec"]["template"]["spec"]
        out.append(("head/autoscaler", cluster.get("autoscalerOptions") or {}, head_spec))
    return out


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}
