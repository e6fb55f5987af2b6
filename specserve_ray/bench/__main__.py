"""Entry point for the benchmarks (also installed as the `specserve-bench` script).

Commands: single (batch-1 step costs, in-process), sweep (alias trace: the policy sweep),
load (issue 9's load benchmark: chunk gaps and TTFT at 70% of capacity), deploy (the
deployment against the in-process engine). Every dependency comes with `pip install
.[bench]`.
"""
from __future__ import annotations

import argparse
import json
import sys

COMMAND_MODULES = ("single", "trace", "load", "deploy")   # trace registers `sweep`


def main(argv: list[str] | None = None) -> None:
    import importlib

    parser = argparse.ArgumentParser(prog="python -m specserve_ray.bench",
                                     description="SpecServe-Ray benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"specserve_ray.bench.{name}").add_parser(sub)
    args = parser.parse_args(argv)
    report = args.func(args)   # every benchmark returns its report as a dict
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
