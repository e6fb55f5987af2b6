"""The ideal queue behind scripts/load_bound.py (pure)."""
import numpy as np
import pytest

from specserve_ray.bench.queue_model import waits


def test_fcfs_waits_follow_lindley():
    # job 0 runs 0-2, job 1 (arrived at 1) waits 1 s, job 2 arrives after both are done
    assert waits([0.0, 1.0, 5.0], [2.0, 1.0, 1.0]).tolist() == [0.0, 1.0, 0.0]
    # a burst: each waits for all before it
    assert waits([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]).tolist() == [0.0, 1.0, 3.0]


def test_shortest_first_reorders_only_what_is_queued():
    arrivals, service = [0.0, 0.1, 0.2], [1.0, 3.0, 0.5]
    # job 0 is already running when 1 and 2 arrive; then 2 (short) goes before 1
    assert waits(arrivals, service, order=lambda j: service[j]).tolist() == \
        pytest.approx([0.0, 1.4, 0.8])
    assert waits(arrivals, service).tolist() == pytest.approx([0.0, 0.9, 3.8])


def test_random_queue_matches_the_recursion_and_rejects_bad_input():
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1.0, 200))
    service = rng.exponential(0.8, 200)
    expected = [0.0]
    for i in range(1, 200):     # Lindley: W_i = max(0, W_{i-1} + S_{i-1} - (A_i - A_{i-1}))
        expected.append(max(0.0, expected[-1] + service[i - 1] - (arrivals[i] - arrivals[i - 1])))
    assert waits(arrivals, service) == pytest.approx(expected)
    with pytest.raises(ValueError):
        waits([1.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError):
        waits([0.0], [1.0, 2.0])
