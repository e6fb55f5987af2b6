"""Entry point for the benchmarks (also installed as the `specserve-bench` script)."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> None:
    from specserve_ray.bench import single

    parser = argparse.ArgumentParser(prog="python -m specserve_ray.bench",
                                     description="SpecServe-Ray benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    single.add_parser(sub)
    for name in ("deploy", "trace"):
        try:
            module = __import__(f"specserve_ray.bench.{name}", fromlist=["add_parser"])
        except ImportError:
            continue
        module.add_parser(sub)
    args = parser.parse_args(argv)
    report = args.func(args)   # every benchmark returns its report as a dict
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
