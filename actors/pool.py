"""How a scoring stage's actor pool is sized on a real cluster, and what it is waiting for.

Sizing is per NODE, not from the cluster's total: an actor lives on one node, so a pool
of "one actor per CPU" on N nodes of C CPUs must be planned as N x (actors that fit in C).
Sizing from the total (as before) put a 0.875-CPU actor on each 1-CPU node and left
0.125 CPU per node, where no read task (0.25 CPU) ever fit: a silent hang.

Two rules make a pool unable to starve its own input:
* the read tasks of ``actors.shards`` ask for no CPU (``READ_CPUS = 0``; reads are light
  IO, capped in number instead), so an actor pool may take every CPU of every node;
* the pool autoscales between ``min_size`` (1) and ``max_size``: it shrinks when a node is
  lost (Ray Data's actor autoscaler scales down to the resource budget) and grows, within
  the budget, when a node joins, from an initial size planned on the nodes alive now.

``plan_pool`` is a pure function of the node list (tested without Ray); ``alive_nodes`` and
``cluster_diagnosis`` read the live cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import ConfigError

_EPS = 1e-9


@dataclass(frozen=True)
class PoolPlan:
    """An actor pool: ``initial`` actors now, between ``min_size`` and ``max_size`` later."""

    initial: int
    min_size: int
    max_size: int
    cpus: float
    gpus: float
    per_node: tuple[int, ...]  # actors that fit on each alive node, in alive_nodes() order

    def describe(self) -> str:
        fit = "+".join(str(n) for n in self.per_node) or "0"
        return (f"{self.initial} actor(s) now (per node {fit}), autoscaling {self.min_size}..{self.max_size}, "
                f"{self.cpus:g} CPU / {self.gpus:g} GPU each")


def _fits(node: dict, cpus: float, gpus: float) -> int:
    """How many actors of (cpus, gpus) fit on one node's total resources."""
    n = math.inf
    if cpus > 0:
        n = min(n, math.floor(float(node.get("CPU", 0.0)) / cpus + _EPS))
    if gpus > 0:
        n = min(n, math.floor(float(node.get("GPU", 0.0)) / gpus + _EPS))
    return 0 if n is math.inf else int(n)


def plan_pool(nodes: list[dict], *, cpus: float, gpus: float = 0.0, requested: int = 0,
              max_actors: int = 0, work_items: int | None = None, knob: str = "actors") -> PoolPlan:
    """Plan an actor pool on ``nodes`` (each a dict of total resources, e.g. ``{"CPU": 1}``).

    Args:
        cpus, gpus: what one actor reserves.
        requested: a fixed initial size (0 = as many as fit on the nodes alive now).
        max_actors: the pool's upper bound (0 = auto: what fits now, or ``requested``, grown
            to the number of ``work_items`` so that nodes joining later get actors).
        work_items: the units of work (input shards); more actors than that are never useful.
        knob: the flag prefix named in errors (e.g. ``influence`` -> ``--influence-cpus``).

    Raises:
        ConfigError: no alive node can hold even one actor of that size.
    """
    if cpus < 0 or gpus < 0:
        raise ConfigError([f"{knob}: negative resources per actor (cpus={cpus!r}, gpus={gpus!r})"], config=f"{knob} pool")
    per_node = tuple(_fits(n, cpus, gpus) for n in nodes)
    fit = sum(per_node)
    if fit == 0:
        biggest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
        what = f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
        raise ConfigError([
            f"{knob}: one actor asks for {what}, but no alive node has that much (largest node: "
            f"{float(biggest.get('CPU', 0.0)):g} CPU, {float(biggest.get('GPU', 0.0)):g} GPU; "
            f"{len(nodes)} node(s)). Lower --{knob}-cpus" + (f" / --{knob}-gpus" if gpus else "")
            + " or add larger nodes"], config=f"{knob} pool")
    initial = requested or fit
    top = max_actors or max(initial, fit, work_items or 0)
    if work_items:
        top = min(top, max(work_items, 1))
        initial = min(initial, top)
    top = max(top, initial)
    return PoolPlan(initial=int(initial), min_size=1, max_size=int(top), cpus=float(cpus), gpus=float(gpus),
                    per_node=per_node)


def alive_nodes(ray) -> list[dict]:
    """Total resources of every alive node that can run work (CPU or GPU > 0)."""
    out = []
    for n in ray.nodes():
        if not n.get("Alive", n.get("alive", False)):
            continue
        res = n.get("Resources", {}) or {}
        if res.get("CPU", 0.0) > 0 or res.get("GPU", 0.0) > 0:
            out.append({"CPU": float(res.get("CPU", 0.0)), "GPU": float(res.get("GPU", 0.0))})
    return out


def cluster_diagnosis(ray, *, name: str) -> str:
    """What the cluster is doing, as ``ray status`` would say it: per-node use and the
    resource demands that nothing can satisfy now, plus this stage's actors by state."""
    lines = []
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status  # the source of `ray status`

        st = get_cluster_status(ray.get_runtime_context().gcs_address)
        for node in list(st.active_nodes) + list(st.idle_nodes):
            use = {u.resource_name: (u.used, u.total) for u in (node.resource_usage.usage if node.resource_usage else [])}
            parts = [f"{k} {u:g}/{t:g}" for k, (u, t) in sorted(use.items()) if k in ("CPU", "GPU") and t > 0]
            lines.append(f"node {str(node.node_id)[:8]} ({node.ip_address}): {', '.join(parts) or 'no CPU/GPU'}")
        demands = [str(b) for d in st.resource_demands.ray_task_actor_demand for b in d.bundles_by_count]
        demands += [str(b) for d in st.resource_demands.placement_group_demand for b in d.bundles_by_count]
        lines.append("pending demands: " + (", ".join(demands) if demands else "none"))
    except Exception as e:  # a diagnosis must never be what fails the job
        lines.append(f"cluster status unavailable ({type(e).__name__}: {e}); available: {ray.available_resources()}")
    try:
        from ray.util.state import list_actors

        counts: dict[str, int] = {}
        for a in list_actors(filters=[("class_name", "=", "_MapWorker")], limit=1000, raise_on_missing_output=False):
            counts[a.state] = counts.get(a.state, 0) + 1
        if counts:
            lines.append("Ray Data actors by state: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    except Exception:
        pass
    return f"[{name}] " + "\n  ".join(lines)
