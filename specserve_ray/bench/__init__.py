"""Benchmarks: `python -m specserve_ray.bench {single,...} --json PATH`."""
