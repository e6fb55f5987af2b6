"""Entry point for the benchmarks (also installed as the `specserve-bench` script)."""
from __future__ import annotations

import argparse
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
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
