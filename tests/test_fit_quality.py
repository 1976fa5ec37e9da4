"""One quality policy for train-crosscoder and shared-feature-fit: a fit that misses a bound
registers nothing and is kept, weights and report, under <warehouse>/rejected/<basis>/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featurestore.activations import TokenColumns, write_activation_set
from featurestore.cli import cli
from featurestore.crosscoder import CrossCoder
from featurestore.errors import FitRejectedError
from featurestore.fit_quality import FitBounds
from featurestore.ingest.shared_feature_fit import shared_feature_fit
from featurestore.ingest.train_crosscoder import train_crosscoder_job
from featurestore.warehouse import init_warehouse

from .conftest import TINY_RUN, basis_path, query, snapshot

N_TOKENS, D_MODEL = 2048, 16
SMALL = dict(dict_size=32, k=4, steps=40, batch_size=128, log_every=20, save_every=20,
             progress=False)
RELAXED = dict(min_explained_variance=-1.0, max_active_fraction=1.0, max_dead_fraction=1.0)


def write_set(folder: Path, seed: int = 0) -> np.ndarray:
    """A low-rank activation set of N_TOKENS x D_MODEL; returns its values."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N_TOKENS, 4)) @ rng.standard_normal((4, D_MODEL))).astype(np.float32)
    n = np.arange(N_TOKENS)
    write_activation_set(folder, x, TokenColumns(n // 32, (n % 32).astype(np.int32),
                                                 rng.integers(0, 100, N_TOKENS),
                                                 np.array(["s"] * N_TOKENS, dtype=object)))
    return x


def outside(root: Path, *folders: str) -> dict[str, bytes]:
    """The warehouse snapshot without the given top-level folders."""
    return {k: v for k, v in snapshot(root).items() if Path(k).parts[0] not in folders}


def test_bounds_name_every_miss_its_margin_and_its_flag():
    report = {"explained_variance": {"0": 0.95, "10": 0.62, "20": 0.4}, "active_fraction": 0.07,
              "dead_fraction": 0.25}
    failed = FitBounds().failures(report, "step", unfitted=["20"])
    assert failed == [
        "explained variance 0.620 at step 10 is below --min-explained-variance 0.8 "
        "(short by 0.180)",
        "mean active fraction 0.0700 is above --max-active-fraction 0.05 (over by 0.0200)"]
    assert FitBounds(0.5, 0.1, 0.2).failures(report, "source", unfitted=["20"]) == [
        "dead fraction 0.250 is above --max-dead-fraction 0.2 (over by 0.050)"]


def test_a_crosscoder_missing_a_bound_is_kept_aside_and_resume_registers_it(tmp_path):
    root = tmp_path / "wh"
    init_warehouse(root)
    x = write_set(tmp_path / "acts")
    before = snapshot(root)
    source = [f"a={tmp_path / 'acts'}"]
    with pytest.raises(FitRejectedError) as caught:
        train_crosscoder_job("cc", source, warehouse=root, min_explained_variance=1.5,
                             max_active_fraction=0.01, **SMALL)
    message = str(caught.value)
    folder = root / "rejected" / "cc"
    assert "nothing was registered" in message and str(folder) in message
    assert "below --min-explained-variance 1.5 (short by" in message
    assert "above --max-active-fraction 0.01 (over by" in message
    assert "--resume" in message
    assert outside(root, "rejected", "training") == before
    assert query(root, "SELECT count(*) FROM bases") == [(0,)]

    # The weights and report are there, and the report says what the weights do: the explained
    # variance and active fraction recomputed here, with numpy, from the kept weights.
    report = json.loads((folder / "report.json").read_text())
    assert report["basis"] == "cc" and report["job"] == "train-crosscoder"
    assert len(report["failures"]) == 2
    model = CrossCoder.load(folder)
    xn = torch.from_numpy(x * float(model.norm_scales[0]))[:, None, :]  # the job's scale
    latents = model.encode(xn, normalized=True)
    x_hat = model.decode(latents, normalized=True)[:, 0].double().numpy()
    xd = xn[:, 0].double().numpy()
    ev = 1 - ((xd - x_hat) ** 2).sum() / ((xd - xd.mean(axis=0)) ** 2).sum()
    quality = report["fit_quality"]
    assert quality["explained_variance"]["a"] == pytest.approx(ev, rel=1e-6)
    assert quality["active_fraction"] == pytest.approx(
        float((latents > 0).double().mean()), rel=1e-9)
    assert quality["bounds"] == {"min_explained_variance": 1.5, "max_active_fraction": 0.01,
                                 "max_dead_fraction": 0.5}

    # The same command with relaxed bounds and --resume registers those very weights, without
    # training again, and the rejected folder and training state go.
    result = train_crosscoder_job("cc", source, warehouse=root, resume=True, **RELAXED, **SMALL)
    assert result.steps == SMALL["steps"]
    registered = CrossCoder.load(basis_path(root, "cc")).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(registered[key], value), key
    assert not folder.exists() and not (root / "training" / "cc").exists()
    (stored,) = query(root, "SELECT fit_quality FROM bases WHERE name = 'cc'")
    assert json.loads(stored[0])["explained_variance"]["a"] == pytest.approx(ev, rel=1e-6)


def test_the_command_line_applies_the_bounds_to_train_crosscoder(tmp_path):
    write_set(tmp_path / "acts")
    root = tmp_path / "wh"
    args = ["--warehouse", str(root), "--threads", "1", "train-crosscoder", "--name", "cc",
            "--source", f"a={tmp_path / 'acts'}", "--dict-size", "32", "--k", "4", "--steps",
            "40", "--batch-size", "128", "--quiet"]
    rejected = CliRunner().invoke(cli, [*args, "--max-dead-fraction", "-0.5"])
    assert rejected.exit_code == 1
    assert "above --max-dead-fraction -0.5 (over by" in rejected.output
    assert (root / "rejected" / "cc" / "report.json").exists()
    accepted = CliRunner().invoke(cli, [*args, "--min-explained-variance", "-1",
                                        "--max-active-fraction", "1", "--json"])
    assert accepted.exit_code == 0, accepted.output
    assert not (root / "rejected" / "cc").exists()


def test_a_shared_fit_missing_a_bound_is_kept_aside_and_replaced(warehouse_copy):
    steps = [s for (s,) in query(warehouse_copy, "SELECT step FROM activation_sets WHERE stage = "
                                                 "'layer_2_post_mlp' ORDER BY step")]
    fit = dict(checkpoints=",".join(map(str, steps)), dict_size=64, k=4, steps=20,
               batch_size=256, warehouse=warehouse_copy, progress=False)
    before = snapshot(warehouse_copy)
    folder = warehouse_copy / "rejected" / "poor"
    with pytest.raises(FitRejectedError, match="short by") as caught:
        shared_feature_fit(TINY_RUN, "layer_2_post_mlp", "poor", seeds=2,
                           min_explained_variance=1.5, **fit)
    assert str(folder) in str(caught.value)
    assert outside(warehouse_copy, "rejected") == before
    first = json.loads((folder / "report.json").read_text())
    assert first["job"] == "shared-feature-fit" and first["seeds"] == [0, 1]
    assert set(first["fit_quality"]["explained_variance"]) == {str(s) for s in steps}
    assert (folder / "crosscoder.safetensors").exists()
    assert (folder / "seed_1" / "crosscoder.safetensors").exists()

    # The next rejected fit of the name replaces the folder whole.
    with pytest.raises(FitRejectedError, match="above --max-dead-fraction"):
        shared_feature_fit(TINY_RUN, "layer_2_post_mlp", "poor", max_dead_fraction=-1.0,
                           min_explained_variance=-1.0, max_active_fraction=1.0, **fit)
    second = json.loads((folder / "report.json").read_text())
    assert second["rejected_at"] > first["rejected_at"] and second["seeds"] == [0]
    assert not (folder / "seed_1").exists()
    assert [p.name for p in (warehouse_copy / "rejected").iterdir()] == ["poor"]

    # A fit of that name that passes is registered and the rejected one goes.
    shared_feature_fit(TINY_RUN, "layer_2_post_mlp", "poor", **RELAXED, **fit)
    assert not folder.exists()
    assert query(warehouse_copy, "SELECT count(*) FROM bases WHERE name = 'poor'") == [(1,)]


def test_an_earlier_rejected_fit_survives_a_failed_replacement(tmp_path):
    from featurestore.fit_quality import keep_rejected
    from featurestore.warehouse import Warehouse

    wh = Warehouse(tmp_path / "wh")
    keep_rejected(wh, "b", lambda folder: (folder / "w").write_text("old"), {"n": 1})

    def broken(folder):
        (folder / "w").write_text("new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        keep_rejected(wh, "b", broken, {"n": 2})
    kept = tmp_path / "wh" / "rejected"
    assert [p.name for p in kept.iterdir()] == ["b"]  # no temp folder left
    assert (kept / "b" / "w").read_text() == "old"
    assert json.loads((kept / "b" / "report.json").read_text()) == {"n": 1}


def test_a_missing_warehouse_keeps_only_the_rejected_fit(tmp_path):
    write_set(tmp_path / "acts")
    root = tmp_path / "nowhere"
    with pytest.raises(FitRejectedError):
        train_crosscoder_job("cc", [f"a={tmp_path / 'acts'}"], warehouse=root,
                             min_explained_variance=1.5, **SMALL)
    # No catalog, lock or tmp/: only what the failure keeps on purpose.
    assert sorted(p.name for p in root.iterdir()) == ["rejected", "training"]
