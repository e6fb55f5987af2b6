"""docker/Dockerfile.{cpu,cuda}, docker/requirements.txt and .dockerignore, checked
statically: no Docker engine runs here and base images cannot be pulled, so the images
are never built by the tests (README, "Kubernetes").

Checked: base images pinned to an exact version tag (optionally with a sha256 digest),
never `latest`; every pip install pinned (`==`), torch==2.13.0 from the variant's
documented wheel index; the project copied in and installed from its wheel, with a build
step that fails when the embedded pair is missing; a fixed non-root USER (the uid the
manifests run as) set before CMD/ENTRYPOINT; no compiler, pip or test tools left in the
runtime stage; the image tag the manifests name is the one the Dockerfile documents; the
build context keeps the pair and leaves out .git, virtualenvs and tests.
"""
from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from manifest_files import ROOT, VARIANT_OF, expected_image, load, pod_specs, project_version

VARIANTS = {v: ROOT / "docker" / f"Dockerfile.{v}" for v in ("cpu", "cuda")}
REQUIREMENTS = ROOT / "docker" / "requirements.txt"
TORCH_PIN = "torch==2.13.0"
TORCH_INDEX = {"cpu": re.compile(r"^https://download\.pytorch\.org/whl/cpu$"),
               "cuda": re.compile(r"^https://download\.pytorch\.org/whl/cu\d{3}$")}
PINNED_IMAGE = re.compile(r"^[\w./-]+:(?P<tag>[\w.-]*\d+\.\d+\.\d+[\w.-]*)"
                          r"(@sha256:[0-9a-f]{64})?$")
PIP_OPTS_WITH_VALUE = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url",
                       "--extra-index-url", "-f", "--find-links", "-w", "--wheel-dir",
                       "--target", "-t", "--prefix", "--root"}
DEV_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|cmake|git|vim|nano|"
                       r"sudo|ssh|pytest|grpcio-tools|ipython|jupyter)\b")
APT_ALLOWED = {"wget", "ca-certificates"}
NOT_IN_IMAGE = {"pytest", "pytest-timeout", "openai", "grpcio-tools", "matplotlib"}
PAIR_FILES = ("config.json", "model.safetensors", "tokenizer.json")


# --------------------------------------------------------------------------- parsing

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current = f"{current} {line}" if current else line
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def stages(instrs) -> list[list[tuple[str, str]]]:
    out = []
    for ins in instrs:
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def _substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def pip_commands(run: str, args: dict[str, str]) -> list[list[str]]:
    """The argument lists of every `pip install` in a RUN line (after `install`)."""
    out = []
    for command in re.split(r"&&|;", run):
        try:
            words = shlex.split(_substitute(command, args))
        except ValueError:
            continue
        for i in range(len(words) - 1):
            if words[i] == "pip" or words[i].endswith("/pip") or (
                    words[i] == "-m" and words[i + 1] == "pip"):
                j = i + 1 if words[i] != "-m" else i + 2
                if j < len(words) and words[j] == "install":
                    out.append(words[j + 1:])
                break
    return out


# --------------------------------------------------------------------------- checks

def dockerfile_problems(text: str, variant: str) -> list[str]:
    problems = []
    instrs = instructions(text)
    all_stages = stages(instrs)
    if not all_stages:
        return ["no FROM"]
    stage_names = set()
    for stage in all_stages:
        image, *rest = stage[0][1].split()
        if image not in stage_names and not PINNED_IMAGE.match(image):
            problems.append(f"FROM {image}: not pinned to an exact version tag")
        if "latest" in image.split("@")[0].rpartition(":")[2]:
            problems.append(f"FROM {image}: latest")
        if len(rest) == 2 and rest[0].upper() == "AS":
            stage_names.add(rest[1])

    final = all_stages[-1]
    args = {}
    for word, rest in instrs:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip().strip('"')

    # The user: fixed, non-root, before CMD/ENTRYPOINT, not reset to root afterwards.
    users = [(i, rest) for i, (word, rest) in enumerate(final) if word == "USER"]
    starts = [i for i, (word, _) in enumerate(final) if word in ("CMD", "ENTRYPOINT")]
    if not users:
        problems.append("runtime stage: no USER (runs as root)")
    else:
        last_i, last_user = users[-1]
        uid = last_user.split(":")[0]
        if not uid.isdigit() or int(uid) == 0:
            problems.append(f"USER {last_user}: not a fixed non-root uid")
        if starts and min(starts) < last_i:
            problems.append("CMD/ENTRYPOINT comes before USER")
    if not starts:
        problems.append("runtime stage: no CMD or ENTRYPOINT")

    # pip (every stage): everything pinned; torch from the variant's index; nothing
    # editable.
    torch_ok = False
    for word, rest in instrs:
        if word != "RUN":
            continue
        for argv in pip_commands(rest, args):
            index_urls, i = [], 0
            while i < len(argv):
                a = argv[i]
                if a in PIP_OPTS_WITH_VALUE:
                    if a in ("-i", "--index-url", "--extra-index-url"):
                        index_urls.append(argv[i + 1])
                    i += 2
                    continue
                if a in ("-e", "--editable"):
                    problems.append("editable install in the image")
                elif not a.startswith("-"):
                    if a.endswith(".whl") and a.startswith("/") and "--no-deps" in argv:
                        pass                       # the project's own wheel
                    elif not re.fullmatch(r"[A-Za-z0-9._-]+(\[[\w,-]+\])?==[\w.+!-]+", a):
                        problems.append(f"pip install {a}: not pinned with ==")
                    elif a == TORCH_PIN:
                        if index_urls and all(TORCH_INDEX[variant].match(u)
                                              for u in index_urls):
                            torch_ok = True
                        else:
                            problems.append(f"{TORCH_PIN} without the {variant} wheel "
                                            f"index (got {index_urls})")
                i += 1
    if not torch_ok:
        problems.append(f"{TORCH_PIN} is not installed from the {variant} wheel index")

    # The project: copied, built into a wheel, installed, the embedded pair verified.
    copied = " ".join(rest for word, rest in instrs if word == "COPY")
    for source in ("pyproject.toml", "specserve_ray", "kernels", "deployments",
                   "docker/requirements.txt"):
        if not re.search(rf"(^|\s){re.escape(source)}(\s|$)", copied):
            problems.append(f"COPY of {source} missing")
    runs = " ".join(rest for word, rest in final if word == "RUN")
    if not ("EMBEDDED_TARGET" in runs and "EMBEDDED_DRAFT" in runs
            and all(f in runs for f in PAIR_FILES)):
        problems.append("no build step checks that the embedded pair is installed")
    if "uninstall -y pip" not in runs:
        problems.append("pip is left in the runtime image")

    # No dev tools in the runtime stage.
    for match in re.finditer(r"apt-get install ([^&;]*)", runs):
        pkgs = {w for w in match.group(1).split() if not w.startswith("-")}
        if pkgs - APT_ALLOWED:
            problems.append(f"apt packages beyond {sorted(APT_ALLOWED)}: "
                            f"{sorted(pkgs - APT_ALLOWED)}")
    for word, rest in final:
        tool = DEV_TOOLS.search(rest) if word == "RUN" else None
        if tool:
            problems.append(f"dev tool in the runtime stage: {tool.group(0)}")

    # Identity: version label and the documented tag the manifests use.
    labels = " ".join(rest for word, rest in final if word == "LABEL")
    if f'org.opencontainers.image.version="{project_version()}"' not in labels:
        problems.append("LABEL org.opencontainers.image.version is not the project version")
    tag = f"{project_version()}-{variant}"
    if f"docker build -f docker/Dockerfile.{variant} -t specserve-ray:{tag} ." not in text:
        problems.append(f"the documented build command does not tag specserve-ray:{tag}")
    env = " ".join(rest for word, rest in final if word == "ENV")
    if "RAY_AUTH_MODE=token" not in env:
        problems.append("the image does not default to Ray token authentication")
    return problems


def requirements_problems(text: str) -> list[str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    import ray

    problems, pins = [], {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([\w.+!-]+)", line)
        if not m:
            problems.append(f"requirements: {line!r} is not pinned with ==")
            continue
        pins[canonicalize_name(m.group(1))] = m.group(2)
    if "torch" in pins:
        problems.append("requirements: torch belongs to each Dockerfile (variant index)")
    if pins.get("ray") != ray.__version__:
        problems.append(f"requirements: ray=={pins.get('ray')} is not the tested "
                        f"{ray.__version__}")
    import tomllib
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        if name == "torch":
            continue
        if name not in pins:
            problems.append(f"requirements: {dep.name} (a dependency) is not pinned")
        elif not dep.specifier.contains(pins[name], prereleases=True):
            problems.append(f"requirements: {name}=={pins[name]} violates {dep}")
    for name in NOT_IN_IMAGE & set(pins):
        problems.append(f"requirements: {name} is a test/bench tool")
    return problems


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches the path or one of its
    parent directories decides; `!` re-includes."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        regex = re.escape(pat.strip("/")).replace(r"\*\*/", "(.*/)?").replace(
            r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def dockerignore_problems(patterns: list[str], files: list[str]) -> list[str]:
    problems = []
    pair = [f for f in files if f.startswith("specserve_ray/assets/tiny-pair/")
            and f.rsplit("/", 1)[-1] in PAIR_FILES]
    if len(pair) < 2 * len(PAIR_FILES):
        problems.append(f"the embedded pair is not in the repository ({pair})")
    for f in pair + ["pyproject.toml", "README.md", "docker/requirements.txt",
                     "deployments/app.py", "kernels/specserve_kernels/__init__.py"]:
        if _ignored(f, patterns):
            problems.append(f".dockerignore leaves out {f}, which the build needs")
    for f in (".git/config", ".venv/bin/python", "tests/test_manifests.py",
              "bench_single.json"):
        if not _ignored(f, patterns):
            problems.append(f".dockerignore sends {f} into the build context")
    return problems


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()
                and ".git" not in p.parts and ".venv" not in p.parts]


def _patterns() -> list[str]:
    text = (ROOT / ".dockerignore").read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


# --------------------------------------------------------------------------- shipped

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dockerfile(variant):
    assert dockerfile_problems(VARIANTS[variant].read_text(encoding="utf-8"), variant) == []


def test_requirements_pinned():
    assert requirements_problems(REQUIREMENTS.read_text(encoding="utf-8")) == []


def test_dockerignore_keeps_the_build_inputs_only():
    assert dockerignore_problems(_patterns(), _tracked_files()) == []


@pytest.mark.parametrize("manifest", sorted(VARIANT_OF))
def test_manifests_run_the_dockerfile_image_as_its_user(manifest):
    variant = VARIANT_OF[manifest]
    instrs = instructions(VARIANTS[variant].read_text(encoding="utf-8"))
    [uid] = [rest.split(":")[0] for word, rest in stages(instrs)[-1] if word == "USER"]
    data = load(ROOT / "k8s" / manifest)
    for name, spec in pod_specs(data):
        assert spec["securityContext"]["runAsUser"] == int(uid), (manifest, name)
        for c in spec["containers"]:
            assert c["image"] == expected_image(manifest)
            assert c["securityContext"].get("runAsUser", int(uid)) == int(uid)


# --------------------------------------------------------------------------- can fail

DOCKERFILE_MUTATIONS = {
    # name: (old text, new text, words of the problem)
    "latest base": ("FROM python:3.11.7-slim-bookworm AS build",
                    "FROM python:latest AS build", "not pinned"),
    "floating base": ("FROM python:3.11.7-slim-bookworm\n", "FROM python:3.11-slim\n",
                      "not pinned"),
    "bad digest": ("FROM python:3.11.7-slim-bookworm\n",
                   "FROM python:3.11.7-slim-bookworm@sha256:abc\n", "not pinned"),
    "root user": ("USER 1000:1000", "USER root", "not a fixed non-root uid"),
    "no user": ("USER 1000:1000\n", "", "no USER"),
    "cmd before user": ('USER 1000:1000\n', 'CMD ["bash"]\nUSER 1000:1000\n',
                        "CMD/ENTRYPOINT comes before USER"),
    "unpinned torch": ("torch==2.13.0 -r", "torch -r", "not pinned with =="),
    "torch range": ("torch==2.13.0 -r", "torch>=2.13 -r", "not pinned with =="),
    "no torch index": ('--extra-index-url "${TORCH_INDEX_URL}"', "", "wheel index"),
    "editable": ("--no-deps /tmp/wheels/", "--no-deps -e /tmp/wheels/", "editable"),
    "unpinned build tool": ("install --no-cache-dir setuptools==84.2.1",
                            "install --no-cache-dir setuptools", "setuptools: not pinned"),
    "unpinned extra": ("-r /tmp/requirements.txt", "-r /tmp/requirements.txt uvloop",
                       "uvloop: not pinned"),
    "no project copy": ("COPY deployments ./deployments\n", "", "COPY of deployments"),
    "no pair check": ("c.EMBEDDED_DRAFT", "c.EMBEDDED_TARGET", "embedded pair"),
    "pip kept": (" && python -m pip uninstall -y pip \\\n", " \\\n", "pip is left"),
    "compiler": ("--no-install-recommends wget", "--no-install-recommends wget gcc",
                 "apt packages beyond"),
    "git": ("--no-install-recommends wget", "--no-install-recommends wget git",
            "dev tool"),
    "version label": ('image.version="0.1.0"', 'image.version="0.0.1"', "LABEL"),
    "auth default": ("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled", "token authentication"),
}


@pytest.mark.parametrize("mutation", sorted(DOCKERFILE_MUTATIONS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dockerfile_checks_can_fail(variant, mutation):
    old, new, words = DOCKERFILE_MUTATIONS[mutation]
    text = VARIANTS[variant].read_text(encoding="utf-8")
    assert text.count(old) >= 1, f"mutation {mutation!r} does not apply"
    problems = dockerfile_problems(text.replace(old, new, 1), variant)
    assert any(words in p for p in problems), (mutation, problems)


def test_dockerfile_torch_index_is_the_variants():
    cpu = VARIANTS["cpu"].read_text(encoding="utf-8")
    cuda_index = "https://download.pytorch.org/whl/cu130"
    problems = dockerfile_problems(cpu.replace("https://download.pytorch.org/whl/cpu",
                                               cuda_index), "cpu")
    assert any("wheel index" in p for p in problems), problems


REQUIREMENTS_MUTATIONS = {
    "range": (lambda t: t.replace("transformers==", "transformers>="), "not pinned"),
    "torch": (lambda t: t + "torch==2.13.0\n", "torch belongs"),
    "ray drift": (lambda t: re.sub(r"^ray==.*$", "ray==2.59.0", t, flags=re.M),
                  "not the tested"),
    "missing dep": (lambda t: re.sub(r"^safetensors==.*\n", "", t, flags=re.M),
                    "safetensors (a dependency) is not pinned"),
    "violates range": (lambda t: re.sub(r"^pydantic==.*$", "pydantic==1.10.0", t,
                                        flags=re.M), "violates"),
    "test tool": (lambda t: t + "pytest==8.0.0\n", "test/bench tool"),
}


@pytest.mark.parametrize("mutation", sorted(REQUIREMENTS_MUTATIONS))
def test_requirements_checks_can_fail(mutation):
    mutate, words = REQUIREMENTS_MUTATIONS[mutation]
    problems = requirements_problems(mutate(REQUIREMENTS.read_text(encoding="utf-8")))
    assert any(words in p for p in problems), (mutation, problems)


@pytest.mark.parametrize("mutation,words", [
    (lambda ps: ps + ["specserve_ray/assets"], "leaves out specserve_ray/assets/tiny-pair"),
    (lambda ps: [p for p in ps if p != "!kernels"], "leaves out kernels"),
    (lambda ps: ps + ["!tests"], "sends tests/"),
    (lambda ps: [p for p in ps if p != "*"], "sends .git/config"),
])
def test_dockerignore_checks_can_fail(mutation, words):
    problems = dockerignore_problems(mutation(_patterns()), _tracked_files())
    assert any(words in p for p in problems), problems
