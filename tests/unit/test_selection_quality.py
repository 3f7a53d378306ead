"""The selection-quality benchmark: a thin driver over the product's own jobs.

The fast tests check its validation, its resume rule and its table from hand-made per-user files
(what `dealrec evaluate` writes); the slow test runs --dry-run-tiny end to end (prune with the
textrec backend, second prunes for dealrec-align / dealrec-valid / dealrec-llm, finetune,
evaluate, table) and its resume.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.errors import ConfigError, ResumeError


def _load_benchmark():
    """benchmarks/ is a folder of scripts, not a package: load the module from its file."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "selection_quality.py"
    spec = importlib.util.spec_from_file_location("selection_quality", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("selection_quality", mod)
    spec.loader.exec_module(mod)
    return mod


sq = _load_benchmark()


def _args(tmp_path, *extra):
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "meta.json").write_text("{}")
    return sq.build_parser().parse_args(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                                         "--budget", "8", *extra])


def test_validation_reports_every_problem(tmp_path):
    a = _args(tmp_path, "--methods", "dealrec", "magic", "--seeds", "1", "1", "--pool", "1", "--tune-lam", "1",
              "--n-boot", "10", "--ks", "5")
    a.data = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as e:
        sq.validate(a)
    msg = str(e.value)
    for word in ("not a prepared folder", "magic", "'random'", "distinct seeds", "pool=1", "--tune-groups", "n_boot",
                 "include 10 and 20"):
        assert word in msg, word


def test_changed_config_refused_unless_overwrite(tmp_path):
    a = _args(tmp_path)
    out = sq.start(a)
    (out / "runs").mkdir()
    assert sq.start(a) == out  # same config: resumes
    b = _args(tmp_path, "--epochs", "5")
    with pytest.raises(ResumeError, match="--overwrite"):
        sq.start(b)
    b.overwrite = True
    sq.start(b)
    assert not (out / "runs").exists() and json.loads((out / "bench.json").read_text())["fingerprint"] == sq.fingerprint(b)
    c = _args(tmp_path, "--epochs", "5", "--seeds", "0", "1", "2", "3")  # more seeds: same results stay valid
    assert sq.fingerprint(c) == sq.fingerprint(b)


def test_table_from_per_user_files(tmp_path):
    a = _args(tmp_path, "--methods", "random", "dealrec", "greedy", "--seeds", "0", "1", "--full-data", "skip",
              "--n-boot", "200", "--no-valid")
    out = sq.start(a)
    rng = np.random.default_rng(0)
    users = np.array([f"u{i}" for i in range(30)])
    base = rng.random(30)
    for name, shift in (("random", 0.0), ("dealrec", 0.1), ("greedy", 0.05), ("zero-shot", -0.1)):
        for s in ((0,) if name == "zero-shot" else (0, 1)):
            run = out / "runs" / f"{name}__seed{s}"
            run.mkdir(parents=True)
            vals = {f"{m}@{k}": np.clip(base + shift + 0.01 * rng.standard_normal(30), 0, 1)
                    for m in ("recall", "ndcg") for k in (5, 10, 20, 50)}
            np.savez(run / "metrics-test.per_user.npz", user_ids=users, **vals)
            (run / "finetune.json").write_text(json.dumps({"n_train": 8, "epochs_done": 0 if name == "zero-shot" else 3,
                                                           "train_seconds": 2.0, "optimizer_steps": 3}))
    res = sq.write_table(a, out, sq.SelectionConfig(budget=8, lam=0.3, groups=5))
    md = (out / "table.md").read_text()
    assert [r["method"] for r in res["rows"]] == ["random", "dealrec", "greedy", "zero-shot"]
    assert res["rows"][1]["stats"]["ndcg@20"]["rel_diff"] > 0.1 and res["rows"][1]["stats"]["ndcg@20"]["p_value"] < 0.05
    assert res["rows"][3]["n_train"] == 0  # zero-shot trained nothing
    assert "| dealrec |" in md and "| greedy | strata" in md and (out / "table.png").exists()
    assert (out / "table.csv").read_text().count("\n") == 1 + 4 * 4  # header + rows x metrics
    np.savez(out / "runs" / "greedy__seed1" / "metrics-test.per_user.npz", user_ids=users[::-1],
             **{f"{m}@{k}": base for m in ("recall", "ndcg") for k in (5, 10, 20, 50)})
    with pytest.raises(sq.DealrecError, match="other users"):
        sq.write_table(a, out, sq.SelectionConfig(budget=8, lam=0.3, groups=5))


def test_variant_rows_get_their_influence_term_tested(tmp_path):
    a = _args(tmp_path, "--methods", "random", "dealrec", "effort-only", "dealrec-valid", "--seeds", "0", "1",
              "--full-data", "skip", "--n-boot", "200", "--no-valid", "--no-zero-shot")
    out = sq.start(a)
    rng = np.random.default_rng(1)
    users = np.array([f"u{i}" for i in range(40)])
    base = rng.random(40)
    for name, shift in (("random", 0.0), ("dealrec", 0.05), ("effort-only", 0.05), ("dealrec-valid", 0.2)):
        for s in (0, 1):
            run = out / "runs" / f"{name}__seed{s}"
            run.mkdir(parents=True)
            np.savez(run / "metrics-test.per_user.npz", user_ids=users,
                     **{f"{m}@{k}": np.clip(base + shift + 0.01 * rng.standard_normal(40), 0, 1)
                        for m in ("recall", "ndcg") for k in (5, 10, 20, 50)})
            (run / "finetune.json").write_text(json.dumps({"n_train": 8, "epochs_done": 3}))
    md = sq.write_table(a, out, sq.SelectionConfig(budget=8, lam=0.3, groups=5))["markdown"]
    # the variant against effort-only (its influence term) and against dealrec, as a component table
    assert "| dealrec-valid vs |" in md
    line = next(x for x in md.splitlines() if x.startswith("| effort-only | its influence term"))
    assert "+" in line.split("|")[4] and "(p=0.0" in line.split("|")[4]
    assert "| dealrec | its influence vs the default" in md
    assert sq.VARIANTS["dealrec-valid"] == ("prune-valid", ["--influence-target", "valid"])


@pytest.mark.timeout(1800)  # ~1 min: in the default suite (as a slow test it missed a broken variant run)
def test_dry_run_tiny_end_to_end_and_resume(tmp_path):
    out = tmp_path / "sq"
    argv = ["--dry-run-tiny", "--out", str(out), "--methods", "random", "dealrec", "dealrec-align", "dealrec-valid",
            "dealrec-llm", "--seeds", "0", "--full-data", "epochs"]
    assert sq.main(argv) == 0
    for name in ("random", "dealrec", "dealrec-align", "dealrec-valid", "dealrec-llm", "full-data", "zero-shot"):
        run = out / "runs" / f"{name}__seed0"
        assert (run / "metrics-test.json").exists() and (run / "metrics-valid.per_user.npz").exists(), name
    man = json.loads((out / "prune" / "manifest.json").read_text())
    assert man["backend"]["name"] == "textrec"
    align = json.loads((out / "prune-align" / "manifest.json").read_text())
    assert align["config"]["influence"]["solver"] == "identity"
    valid = json.loads((out / "prune-valid" / "manifest.json").read_text())
    assert valid["influence_target"]["surrogate"] == "valid"
    assert json.loads((out / "prune-llm" / "manifest.json").read_text())["influence_source"] == "llm"
    md = (out / "table.md").read_text()
    assert "| dealrec-align |" in md and "## Validation period" in md
    stamp = (out / "runs" / "dealrec__seed0" / "finetune.json").stat().st_mtime_ns
    assert sq.main(argv) == 0  # resumed: nothing retrained
    assert (out / "runs" / "dealrec__seed0" / "finetune.json").stat().st_mtime_ns == stamp


def test_backend_options_reach_every_job_as_that_backend_takes_them(tmp_path):
    assert sq.backend_argv(_args(tmp_path, "--textrec-model", "/enc")) == [
        "--backend", "textrec", "--prompt", "games", "--textrec-model", "/enc"]
    assert sq.backend_argv(_args(tmp_path, "--backend", "bigrec", "--prompt", "movies")) == [
        "--backend", "bigrec", "--prompt", "movies"]
    t = _args(tmp_path, "--backend", "tiger", "--semantic-ids", "/sid", "--tiger-config", '{"d_model": 64}')
    assert sq.backend_argv(t) == ["--backend", "tiger", "--semantic-ids", "/sid", "--tiger-config", '{"d_model": 64}']


def test_tiger_options_are_validated_and_left_out_of_other_fingerprints(tmp_path):
    with pytest.raises(ConfigError, match="--semantic-ids: --backend tiger needs the folder"):
        sq.validate(_args(tmp_path, "--backend", "tiger"))
    with pytest.raises(ConfigError, match=r"--semantic-ids is an option of --backend tiger \(--backend is 'textrec'\)"):
        sq.validate(_args(tmp_path, "--semantic-ids", "/sid"))
    with pytest.raises(ConfigError, match="--semantic-ids: "):  # a folder that is not semantic ids of --data
        sq.validate(_args(tmp_path, "--backend", "tiger", "--semantic-ids", str(tmp_path)))
    from engine.config import stable_hash

    a = _args(tmp_path)
    before = {k: v for k, v in vars(a).items() if k not in sq.RESULT_FREE and k not in sq.UNSET_FREE}
    assert sq.fingerprint(a) == stable_hash(before)  # the fingerprint of runs made before TIGER existed
    assert sq.fingerprint(_args(tmp_path, "--backend", "tiger", "--semantic-ids", "/sid")) != sq.fingerprint(a)
    assert sq.fingerprint(_args(tmp_path, "--finetune-args", "--patience 3")) != sq.fingerprint(a)
