import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
# Tiny test models run fastest single-threaded; it also keeps parallel Ray actors from
# oversubscribing the two cores.
torch.set_num_threads(int(os.environ.get("SPECSERVE_TEST_THREADS", "1")))
# Fitted cost models go to a scratch cache, never the user's ~/.cache (Ray workers
# started by the tests inherit this too).
if "SPECSERVE_CACHE_DIR" not in os.environ:
    import atexit
    import shutil

    os.environ["SPECSERVE_CACHE_DIR"] = tempfile.mkdtemp(prefix="specserve-cache-")
    atexit.register(shutil.rmtree, os.environ["SPECSERVE_CACHE_DIR"], ignore_errors=True)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    """A tiny random Llama target and a perturbed copy as its draft (agrees often, not
    always). Modules that need another family or noise define their own `pair`."""
    from helpers import perturbed, tiny_model

    target = tiny_model("llama", seed=0)
    return target, perturbed(target, noise=0.15)


@pytest.fixture
def local_pair(tmp_path, monkeypatch):
    """(target, draft) directories `ModelConfig` accepts: the embedded tiny pair, or, while
    it is not built yet (`make train-pair`), stand-ins holding a config.json that also
    replace the EngineConfig defaults (the offline manifest tests: only the files are under
    test there)."""
    import specserve_ray.config as sconfig

    pair = (sconfig.EMBEDDED_TARGET, sconfig.EMBEDDED_DRAFT)
    if all((Path(p) / "config.json").is_file() for p in pair):
        return pair
    standins = []
    for role in ("target", "draft"):
        d = tmp_path / f"standin-{role}"
        d.mkdir()
        (d / "config.json").write_text("{}")
        standins.append(str(d))
    monkeypatch.setattr(sconfig, "EMBEDDED_TARGET", standins[0])
    monkeypatch.setattr(sconfig, "EMBEDDED_DRAFT", standins[1])
    return tuple(standins)


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left_behind():
    """A module whose app fixture failed half-way (e.g. Serve could not bind) must not
    leave its Ray instance to the next module: shut down whatever is still up."""
    yield
    if "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized():
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # noqa: BLE001 - best effort; ray.shutdown below is what counts
            pass
        ray.shutdown()
