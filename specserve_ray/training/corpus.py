"""What the pair is trained and evaluated on, packed into one deterministic file.

Sources: the standard library's Python source (tests excluded; `email`, `http`, `xml` held
out, the same files the committed pair's held-out loss 4.84 was measured on) plus, with
`packages=True`, the Python source of a pinned list of packages the project's own install
brings. A package enters only if its installed dist-info declares a permissive licence;
`HELD_OUT_PACKAGES` are packed as held-out code that no model trains on.

The pack (`corpus.jsonl.xz`, one JSON record per file: split, source, path, text) is
built once on the machine that has the project installed and carried to a GPU machine,
whose Python and packages differ: both then train on the same bytes.
"""
from __future__ import annotations

import email.parser
import hashlib
import importlib.metadata as md
import json
import lzma
import sysconfig
from dataclasses import dataclass
from pathlib import Path

STDLIB_HELD_OUT = ("email", "http", "xml")
# Pinned training packages: import name -> distribution name, with a byte cap so that no
# single large package (transformers, torch, ray) dominates the mixture.
PINNED_PACKAGES: dict[str, tuple[str, int]] = {
    "transformers": ("transformers", 4_000_000),
    "torch": ("torch", 4_000_000),
    "ray": ("ray", 3_000_000),
    "numpy": ("numpy", 2_000_000),
    "huggingface_hub": ("huggingface_hub", 1_500_000),
    "accelerate": ("accelerate", 1_000_000),
    "pydantic": ("pydantic", 1_000_000),
    "aiohttp": ("aiohttp", 800_000),
    "fastapi": ("fastapi", 600_000),
    "starlette": ("starlette", 300_000),
    "uvicorn": ("uvicorn", 300_000),
    "anyio": ("anyio", 500_000),
    "requests": ("requests", 300_000),
    "urllib3": ("urllib3", 500_000),
    "jinja2": ("Jinja2", 500_000),
    "packaging": ("packaging", 500_000),
    "fsspec": ("fsspec", 700_000),
    "yaml": ("PyYAML", 300_000),
    "jsonschema": ("jsonschema", 200_000),
    "grpc": ("grpcio", 600_000),
    "google.protobuf": ("protobuf", 800_000),
    "networkx": ("networkx", 1_500_000),
    "sympy": ("sympy", 2_000_000),
    "pyparsing": ("pyparsing", 500_000),
    "markdown_it": ("markdown-it-py", 300_000),
    "httpcore": ("httpcore", 300_000),
    "h11": ("h11", 100_000),
}
# Code from these is never trained on: "agreement on code from a package no model saw".
HELD_OUT_PACKAGES: dict[str, tuple[str, int]] = {
    "rich": ("rich", 1_500_000),
    "click": ("click", 500_000),
}
PERMISSIVE = ("MIT", "BSD", "APACHE", "ISC", "PSF", "PYTHON SOFTWARE FOUNDATION", "0BSD", "ZLIB")
COPYLEFT = ("GPL", "MPL", "MOZILLA", "EUPL", "CDDL", "EPL", "AFFERO", "SSPL")
MAX_FILE_BYTES = 200_000  # larger files are generated tables (unicode data, lexer maps)
SKIP_PARTS = {"test", "tests", "testing", "idle_test", "site-packages", "__pycache__", "_vendor", "vendor",
              "thirdparty", "_private_vendor"}


def licence_strings(metadata: str) -> list[str]:
    """The licence declarations of a METADATA file: expression, License field, classifiers."""
    msg = email.parser.Parser().parsestr(metadata, headersonly=True)
    found = [v for v in msg.get_all("License-Expression") or []]
    lic = msg.get("License")
    if lic and len(lic) < 200:  # some packages paste the whole licence text here
        found.append(lic)
    found += [c for c in msg.get_all("Classifier") or [] if c.startswith("License ::")]
    return found


def is_permissive(declared: list[str]) -> bool:
    """True when something declares a permissive licence and nothing declares a copyleft one.

    Expressions like "Apache-2.0 OR BSD-3-Clause" or "MIT AND 0BSD" pass; "GPLv2",
    "MPL-2.0 AND MIT" (file-level copyleft) and packages declaring nothing fail.
    """
    upper = [d.upper() for d in declared]
    if any(c in d for d in upper for c in COPYLEFT):
        return False
    return any(p in d for d in upper for p in PERMISSIVE)


@dataclass
class PackageSource:
    name: str
    dist: str
    version: str
    licences: list[str]
    root: Path


def find_package(import_name: str, dist: str) -> PackageSource | None:
    """The installed package's source folder and its dist-info licence, None if absent."""
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        return None
    root = Path(d.locate_file(import_name.replace(".", "/")))
    if not root.is_dir():
        return None
    return PackageSource(import_name, dist, d.version, licence_strings(d.read_text("METADATA") or ""), root)


def package_files(src: PackageSource, cap_bytes: int) -> list[Path]:
    """Up to `cap_bytes` of the package's source, files picked in a fixed hash order (so a cap
    samples the whole package, not its alphabetically first folders)."""
    files = [p for p in src.root.rglob("*.py")
             if not SKIP_PARTS.intersection(p.relative_to(src.root).parts)
             and not p.name.startswith("test_") and p.stat().st_size <= MAX_FILE_BYTES]
    files.sort(key=lambda p: hashlib.sha1(p.relative_to(src.root).as_posix().encode()).hexdigest())
    picked, total = [], 0
    for p in files:
        size = p.stat().st_size
        if total + size > cap_bytes:
            continue
        picked.append(p)
        total += size
    return sorted(picked)


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """Standard-library train and held-out files, in a fixed order (the committed pair's split)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "idle_test", "site-packages", "__pycache__") for p in rel):
            continue
        if rel[0].startswith("lib2to3") or rel[0] == "turtledemo":
            continue
        (held if rel[0] in STDLIB_HELD_OUT else train).append(path)
    return train, held


def _records(split: str, source: str, root: Path, paths: list[Path]):
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield {"split": split, "source": source, "path": p.relative_to(root).as_posix(), "text": text}


def build_pack(out: Path, packages: bool = True, pinned: dict | None = None,
               held_out: dict | None = None) -> dict:
    """Write the corpus pack; returns its manifest (sources, versions, licences, bytes).

    Splits: `train`, `held_stdlib` (the held-out stdlib files), `held_pkg` (held-out
    packages). A pinned package whose licence is not permissive is skipped and listed.
    """
    pinned = PINNED_PACKAGES if pinned is None else pinned
    held_out = HELD_OUT_PACKAGES if held_out is None else held_out
    stdlib_root = Path(sysconfig.get_paths()["stdlib"])
    train, held = stdlib_files()
    parts = [("train", "stdlib", stdlib_root, train), ("held_stdlib", "stdlib", stdlib_root, held)]
    manifest = {"stdlib": sysconfig.get_python_version(), "packages": {}, "rejected": {}}
    if packages:
        for split, table in (("train", pinned), ("held_pkg", held_out)):
            for name, (dist, cap) in table.items():
                src = find_package(name, dist)
                if src is None:
                    manifest["rejected"][name] = "not installed"
                    continue
                if not is_permissive(src.licences):
                    manifest["rejected"][name] = f"licence not permissive: {src.licences}"
                    continue
                files = package_files(src, cap)
                parts.append((split, name, src.root, files))
                manifest["packages"][name] = {"dist": dist, "version": src.version, "split": split,
                                              "licence": src.licences[0] if src.licences else "",
                                              "files": len(files)}
    out.parent.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    with lzma.open(out, "wt", encoding="utf-8", preset=9) as f:
        for split, source, root, paths in parts:
            for rec in _records(split, source, root, paths):
                f.write(json.dumps(rec) + "\n")
                sizes[split] = sizes.get(split, 0) + len(rec["text"])
    manifest["chars"] = sizes
    manifest["pack_bytes"] = out.stat().st_size
    return manifest


def read_pack(path: Path) -> dict[str, list[tuple[str, str]]]:
    """split -> [(source, text)] in pack order."""
    out: dict[str, list[tuple[str, str]]] = {}
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            out.setdefault(rec["split"], []).append((rec["source"], rec["text"]))
    return out
