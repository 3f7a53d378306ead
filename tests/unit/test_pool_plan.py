"""actors.pool.plan_pool: actor pools sized per node, never from the cluster's total."""

from __future__ import annotations

import pytest

from actors.pool import plan_pool
from engine.errors import ConfigError


def one_cpu_nodes(n):
    return [{"CPU": 1.0, "GPU": 0.0} for _ in range(n)]


@pytest.mark.parametrize("n_nodes", [1, 2, 3, 8])
def test_one_actor_per_one_cpu_node(n_nodes):
    plan = plan_pool(one_cpu_nodes(n_nodes), cpus=1.0, work_items=100)
    assert plan.initial == n_nodes
    assert plan.per_node == (1,) * n_nodes
    assert plan.cpus == 1.0  # reads ask for no CPU: nothing is shaved off the actors
    assert (plan.min_size, plan.max_size) == (1, 100)  # grows into nodes that join


def test_sized_per_node_not_from_total():
    # 3 nodes x 2 CPUs = 6 CPUs in total; 1.5-CPU actors: the total says 4, only 3 fit
    plan = plan_pool([{"CPU": 2.0}] * 3, cpus=1.5, work_items=50)
    assert plan.initial == 3 and plan.per_node == (1, 1, 1)


def test_heterogeneous_and_gpu_nodes():
    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 0.0}, {"CPU": 16.0, "GPU": 4.0}]
    plan = plan_pool(nodes, cpus=1.0, gpus=1.0, work_items=100)
    assert plan.per_node == (2, 0, 4) and plan.initial == 6
    plan = plan_pool(nodes, cpus=3.0, work_items=100)
    assert plan.per_node == (2, 1, 5)


def test_bounds_follow_work_and_requests():
    assert plan_pool(one_cpu_nodes(4), cpus=1.0, work_items=2).max_size == 2
    assert plan_pool(one_cpu_nodes(4), cpus=1.0, work_items=2).initial == 2
    p = plan_pool(one_cpu_nodes(4), cpus=1.0, requested=3, max_actors=5, work_items=100)
    assert (p.initial, p.max_size) == (3, 5)


def test_actor_that_fits_nowhere_is_a_clear_error():
    with pytest.raises(ConfigError) as e:
        plan_pool(one_cpu_nodes(3), cpus=2.0, knob="effort")
    msg = str(e.value)
    assert "--effort-cpus" in msg and "2 CPU" in msg and "largest node: 1 CPU" in msg
    with pytest.raises(ConfigError, match="--influence-cpus"):
        plan_pool([], cpus=1.0, knob="influence")
