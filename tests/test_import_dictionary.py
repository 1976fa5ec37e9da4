"""import-dictionary and export-dictionary against the warehouse of the tiny run.

A shared basis is exported to SAELens, loaded and saved again by SAELens itself, and imported:
the imported SAE then goes through the sweep, births and the report, and at the checkpoint it was
exported for its trajectories equal the original basis's. A two-source crosscoder in the
dictionary_learning fork's layout is imported over activation sets and swept as a model diff.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.crosscoder import CrossCoder
from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.ingest.birth_analysis import analyze_births
from featurestore.ingest.crosscoder_sweep import crosscoder_sweep
from featurestore.ingest.import_dictionary import import_dictionary
from featurestore.ingest.trajectory_sweep import feature_trajectory_sweep
from featurestore.queries.export_dictionary import export_dictionary
from featurestore.queries.report import write_report

from .conftest import TINY_RUN, basis_path, query, snapshot

sae_lens = pytest.importorskip("sae_lens")

STAGE = "layer_2_post_mlp"


@pytest.fixture(scope="module")
def imported(analysed_warehouse, tmp_path_factory):
    """tiny-l2 exported for its last step, re-saved by SAELens, imported as tiny-sl, swept,
    births analysed and reported."""
    from sae_lens import SAE

    root = tmp_path_factory.mktemp("imported") / "warehouse"
    shutil.copytree(analysed_warehouse, root)
    (last,), = query(root, "SELECT max(step) FROM trajectories WHERE basis = 'tiny-l2'")
    folder = tmp_path_factory.mktemp("saes")
    exported = export_dictionary("tiny-l2", "saelens", out=folder / "exported", step=last,
                                 warehouse=root)
    SAE.load_from_disk(exported.directory).save_model(folder / "saelens")
    result = import_dictionary("saelens", str(folder / "saelens"), "tiny-sl", run=TINY_RUN,
                               stage=STAGE, warehouse=root)
    feature_trajectory_sweep("tiny-sl", warehouse=root, progress=False)
    analyze_births("tiny-sl", metric="activation_rate", presence="absolute", threshold=0.05,
                   persistence=1, permutations=5, warehouse=root)
    report = write_report("tiny-sl", out=folder / "report", warehouse=root)
    return root, folder, last, exported, result, report


def test_an_imported_saelens_sae_is_a_basis_every_job_reads(imported):
    root, folder, last, exported, result, report = imported
    assert exported.step == last and exported.arch == "jumprelu"  # BatchTopK's threshold
    assert (result.kind, result.arch, result.n_sources) == ("pooled", "jumprelu", 1)
    (d_hidden, kind, run, stage, sources, trainer), = query(
        root, "SELECT d_hidden, kind, run, stage, sources, trainer_config FROM bases "
              "WHERE name = 'tiny-sl'")
    assert (kind, run, stage) == ("pooled", TINY_RUN, STAGE)
    assert [s["norm_scale"] for s in sources] == [1.0] * len(sources)  # its own units
    assert json.loads(trainer)["imported"]["format"] == "saelens"
    (features,), = query(root, "SELECT count(*) FROM features WHERE basis = 'tiny-sl'")
    assert features == d_hidden
    # decoder_directions hold the SAE's decoder as SAELens saved it
    from safetensors.torch import load_file

    W_dec = load_file(folder / "saelens" / "sae_weights.safetensors")["W_dec"]
    rows = query(root, "SELECT feature_id, direction FROM decoder_directions "
                       "WHERE basis = 'tiny-sl' ORDER BY feature_id")
    np.testing.assert_allclose(np.array([d for _, d in rows]), W_dec.numpy(), rtol=1e-6)
    # at the exported step its trajectories are the original basis's
    ours = query(root, "SELECT feature_id, activation_rate, mean_activation, max_activation "
                       "FROM trajectories WHERE basis = 'tiny-sl' AND step = ? "
                       "ORDER BY feature_id", [last])
    original = query(root, "SELECT feature_id, activation_rate, mean_activation, max_activation "
                           "FROM trajectories WHERE basis = 'tiny-l2' AND step = ? "
                           "ORDER BY feature_id", [last])
    assert len(ours) == d_hidden and any(rate > 0 for _, rate, _, _ in ours)
    np.testing.assert_allclose(np.array(ours, dtype=float), np.array(original, dtype=float),
                               rtol=1e-4, atol=1e-5)
    (births,), = query(root, "SELECT count(*) FROM births WHERE basis = 'tiny-sl'")
    assert births == d_hidden
    assert (folder / "report" / "report.html").exists() and report.sections


def test_reimporting_replaces_the_basis_and_what_was_computed_from_it(imported, tmp_path):
    root, folder, *_ = imported
    copy = tmp_path / "warehouse"
    shutil.copytree(root, copy)
    import_dictionary("saelens", str(folder / "saelens"), "tiny-sl", run=TINY_RUN, stage=STAGE,
                      warehouse=copy)
    for table in ("trajectories", "births", "feature_activations"):
        (count,), = query(copy, f"SELECT count(*) FROM {table} WHERE basis = 'tiny-sl'")
        assert count == 0, table
    (bases,), = query(copy, "SELECT count(*) FROM bases WHERE name = 'tiny-sl'")
    assert bases == 1


def fork_state_of(model: CrossCoder, mean: torch.Tensor) -> dict[str, torch.Tensor]:
    """A featurestore BatchTopK crosscoder written in the dictionary_learning fork's layout,
    with an activation normaliser of global scales = its norm scales and the given means: the
    fork computes ReLU(sum_l ((x_l - mean_l) g_l) @ W_l + b), so b absorbs g_l mean_l @ W_l."""
    g = model.norm_scales
    W_enc = model.W_enc.detach()
    return {"encoder.weight": W_enc,
            "encoder.bias": model.b_enc.detach() + torch.einsum("ld,ldh->h", g[:, None] * mean,
                                                                W_enc),
            "decoder.weight": model.decoder().detach().permute(1, 0, 2).contiguous(),
            "decoder.bias": model.b_dec.detach() - g[:, None] * mean,
            "code_normalization_id": torch.tensor(1), "k": torch.tensor(model.config.k),
            "threshold": model.threshold.detach(), "activation_mean": mean,
            "activation_std": torch.ones_like(mean), "activation_global_scale": g,
            "target_rms": torch.tensor(1.0)}


def test_a_fork_crosscoder_imports_over_activation_sets_as_a_model_diff(analysed_warehouse,
                                                                       tmp_path):
    root = tmp_path / "warehouse"
    shutil.copytree(analysed_warehouse, root)
    model = CrossCoder.load(basis_path(root, "tiny-diff"))
    mean = torch.randn(2, model.config.d_model, generator=torch.Generator().manual_seed(0))
    folder = tmp_path / "crosscoder"
    folder.mkdir()
    torch.save(fork_state_of(model, mean), folder / "model_final.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": "BatchTopKCrossCoder"}}))
    sources = query(root, "SELECT sources FROM bases WHERE name = 'tiny-diff'")[0][0]
    flags = [f"{s['label']}={s['activation_set']}" for s in sources]
    result = import_dictionary("dictionary_learning", str(folder), "tiny-fork", sources=flags,
                               warehouse=root)
    assert (result.kind, result.arch, result.n_sources) == ("crosscoder", "batchtopk", 2)
    crosscoder_sweep("tiny-fork", warehouse=root, progress=False)
    # the same dictionary as tiny-diff, so the same latents fire as often on the same tokens
    ours = query(root, "SELECT feature_id, frequency, relative_decoder_norm FROM features "
                       "WHERE basis = 'tiny-fork' ORDER BY feature_id")
    original = query(root, "SELECT feature_id, frequency, relative_decoder_norm FROM features "
                           "WHERE basis = 'tiny-diff' ORDER BY feature_id")
    np.testing.assert_allclose(np.array(ours, dtype=float), np.array(original, dtype=float),
                               rtol=1e-4, atol=1e-6)
    stats = query(root, "SELECT count(*) FROM crosscoder_latent_stats WHERE basis = 'tiny-fork'")
    assert stats[0][0] > 0


def test_bad_imports_are_refused_and_write_nothing(imported, tmp_path):
    root, folder, *_ = imported
    before = snapshot(root)
    with pytest.raises(FeaturestoreError, match="--run RUN --stage STAGE .* or --source"):
        import_dictionary("saelens", str(folder / "saelens"), "x", warehouse=root)
    with pytest.raises(FeaturestoreError, match="give --run and --stage together"):
        import_dictionary("saelens", str(folder / "saelens"), "x", run=TINY_RUN, warehouse=root)
    with pytest.raises(FeaturestoreError, match="no cfg.json"):
        import_dictionary("saelens", str(tmp_path), "x", run=TINY_RUN, stage=STAGE,
                          warehouse=root)
    # an SAE of another width: trained on another stage or model
    narrow = tmp_path / "narrow"
    sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=8, d_sae=16)).save_model(narrow)
    with pytest.raises(FeaturestoreError, match=f"--stage {STAGE} of run {TINY_RUN} has width "
                                                "32 and the dictionary reads width 8"):
        import_dictionary("saelens", str(narrow), "x", run=TINY_RUN, stage=STAGE,
                          warehouse=root)
    with pytest.raises(FeaturestoreError, match="reads 1 source.*and 2 were given"):
        import_dictionary("saelens", str(folder / "saelens"), "x",
                          sources=["a=nope", "b=nope"], warehouse=root)
    assert snapshot(root) == before


def test_export_errors_name_the_flag(imported, tmp_path):
    root, *_ = imported
    with pytest.raises(FeaturestoreError, match="--step: basis tiny-l2 scales each checkpoint"):
        export_dictionary("tiny-l2", "saelens", out=tmp_path / "a", warehouse=root)
    with pytest.raises(NotFoundError, match="--step 12345: basis tiny-l2 was not fitted on it"):
        export_dictionary("tiny-l2", "saelens", out=tmp_path / "a", step=12345, warehouse=root)
    with pytest.raises(FeaturestoreError, match="--basis tiny-diff is a crosscoder over 2"):
        export_dictionary("tiny-diff", "saelens", out=tmp_path / "a", warehouse=root)
    with pytest.raises(FeaturestoreError, match="sparsify encodes with per-token TopK only"):
        export_dictionary("tiny-sl", "sparsify", out=tmp_path / "a", warehouse=root)
    assert not (tmp_path / "a").exists()


def test_cli_imports_and_exports_with_json(imported, tmp_path):
    root, folder, *_ = imported
    copy = tmp_path / "warehouse"
    shutil.copytree(root, copy)
    runner = CliRunner()
    result = runner.invoke(cli, ["--warehouse", str(copy), "import-dictionary", "--format",
                                 "saelens", "--path", str(folder / "saelens"), "--name",
                                 "cli-sl", "--run", TINY_RUN, "--stage", STAGE, "--json"])
    assert result.exit_code == 0, result.output
    imported_row = json.loads(result.stdout)
    assert imported_row["name"] == "cli-sl" and imported_row["arch"] == "jumprelu"
    # the explained variance of every checkpoint it was registered on, by step
    assert set(imported_row["explained_variance"]) == {
        str(s) for (s,) in query(copy, "SELECT step FROM activation_sets WHERE run = ? "
                                            "AND stage = ?", [TINY_RUN, STAGE])}
    out = tmp_path / "exported"
    result = runner.invoke(cli, ["--warehouse", str(copy), "export-dictionary", "--basis",
                                 "cli-sl", "--format", "saelens", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    exported = json.loads(result.stdout)
    assert exported["files"] == ["cfg.json", "sae_weights.safetensors"]
    assert exported["step"] is None  # every checkpoint of an import shares its own units
    loaded = sae_lens.SAE.load_from_disk(out)
    assert loaded.cfg.d_sae == imported_row["d_hidden"]
    result = runner.invoke(cli, ["import-dictionary", "--help"])
    assert "featurestore import-dictionary --format saelens" in result.output
