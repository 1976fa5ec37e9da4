"""shared-feature-fit and feature-trajectory-sweep on the tiny run (three collected checkpoints).

The trajectory metrics are checked against a numpy re-implementation of the encoder applied to the
activation sets directly; every validation failure must register nothing.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from featurestore.cli import cli
from featurestore.errors import FeaturestoreError
from featurestore.ingest.shared_feature_fit import shared_feature_fit
from featurestore.ingest.trajectory_sweep import feature_trajectory_sweep
from featurestore.warehouse import Warehouse, connect, derived_from_basis

from .conftest import TINY_RUN, basis_path, query, snapshot

STAGE = "layer_2_post_mlp"
# Small and quick; the bounds are relaxed because 20 training steps leave the tiny model's
# activations nearly random, which no 64-feature dictionary compresses well.
FIT = dict(dict_size=64, k=4, steps=150, batch_size=256, progress=False,
           min_explained_variance=-1.0, max_active_fraction=1.0, max_dead_fraction=1.0)


def collected_steps(root) -> list[int]:
    con = connect(root)
    try:
        return [s for (s,) in con.execute(
            "SELECT step FROM activation_sets WHERE run = ? AND stage = ? ORDER BY step",
            [TINY_RUN, STAGE]).fetchall()]
    finally:
        con.close()


@pytest.fixture(scope="module")
def swept(tmp_path_factory, trained_warehouse):
    import shutil

    root = tmp_path_factory.mktemp("swept") / "warehouse"
    shutil.copytree(trained_warehouse, root)
    steps = ",".join(map(str, collected_steps(root)))
    fit = shared_feature_fit(TINY_RUN, STAGE, "tiny-l2", checkpoints=steps, warehouse=root, **FIT)
    sweep = feature_trajectory_sweep("tiny-l2", warehouse=root, progress=False)
    return root, fit, sweep


def numpy_codes(root, step: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(normalised activations, feature values, splits) of one checkpoint, computed with numpy
    from the stored weights and activation set, not through the crosscoder module."""
    from featurestore.registry import get_activation_set_row, open_activation_set

    wh = Warehouse(root)
    con = wh.connect()
    try:
        (path, config), = con.execute("SELECT path, config FROM bases WHERE name = 'tiny-l2'"
                                      ).fetchall()
        (sources,), = con.execute("SELECT sources FROM bases WHERE name = 'tiny-l2'").fetchall()
        source = next(s for s in sources if s["step"] == step)
        acts = open_activation_set(wh, get_activation_set_row(con, source["activation_set"]))
    finally:
        con.close()
    weights = load_file(wh.path(path) / "crosscoder.safetensors")
    x = acts.all_rows().astype(np.float64) * source["norm_scale"]
    pre = x @ weights["W_enc"][0].astype(np.float64) + weights["b_enc"]
    relu = np.maximum(pre, 0)
    decoder = np.concatenate([weights["W_dec_shared"][:, None, :], weights["W_dec"]])
    norms = np.linalg.norm(decoder.astype(np.float64), axis=2).sum(axis=1)
    f = relu * (relu * norms > float(weights["threshold"]))
    assert json.loads(config)["arch"] == "batchtopk"
    return x, f, list(acts.token_columns().split)


def test_fit_registers_a_basis_with_its_quality_report(swept):
    root, fit, _ = swept
    (kind, run, stage, n_sources, quality, sources), = query(
        root, "SELECT kind, run, stage, n_sources, fit_quality, sources FROM bases "
              "WHERE name = 'tiny-l2'")
    assert (kind, run, stage, n_sources) == ("pooled", TINY_RUN, STAGE, 1)
    assert [s["step"] for s in sources] == collected_steps(root)
    report = json.loads(quality)
    assert set(report["explained_variance"]) == {str(s) for s in collected_steps(root)}
    assert report["active_fraction"] == pytest.approx(report["l0"] / 64)
    assert report == fit.fit_quality


def test_trajectories_equal_a_numpy_computation(swept):
    root, _, _ = swept
    for step in collected_steps(root):
        x, f, splits = numpy_codes(root, step)
        rows = query(root, "SELECT feature_id, activation_rate, mean_activation, max_activation, "
                           "energy, split_activation_rates FROM trajectories WHERE basis = "
                           "'tiny-l2' AND step = ? ORDER BY feature_id", [step])
        assert len(rows) == 64
        _, rate, mean, peak, energy, split_rates = map(list, zip(*rows))
        np.testing.assert_allclose(rate, (f > 0).mean(axis=0), atol=2e-3)
        np.testing.assert_allclose(mean, f.mean(axis=0), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(peak, f.max(axis=0), rtol=1e-3, atol=1e-4)
        weights = load_file(basis_path(root, "tiny-l2") / "crosscoder.safetensors")
        decoder = np.concatenate([weights["W_dec_shared"], weights["W_dec"][:, 0]])
        contribution = ((f * np.linalg.norm(decoder, axis=1)) ** 2).sum(axis=0)
        np.testing.assert_allclose(energy, contribution / contribution.sum(), atol=1e-3)
        split = np.array(splits)
        for name in set(splits):
            expected = (f[split == name] > 0).mean(axis=0)
            got = [dict(r)[name] for r in split_rates]
            np.testing.assert_allclose(got, expected, atol=2e-3)
        (l0, dead), = query(root, "SELECT l0, dead_fraction FROM checkpoint_summary WHERE basis "
                                  "= 'tiny-l2' AND step = ?", [step])
        assert l0 == pytest.approx((f > 0).sum(axis=1).mean(), abs=0.05)
        assert dead == pytest.approx(((f > 0).sum(axis=0) == 0).mean(), abs=1 / 64 + 1e-9)


def test_feature_activations_hold_every_nonzero_value(swept):
    root, _, sweep = swept
    step = collected_steps(root)[-1]
    _, f, _ = numpy_codes(root, step)
    (count, total), = query(root, "SELECT count(*), sum(value) FROM feature_activations WHERE "
                                  "basis = 'tiny-l2' AND step = ?", [step])
    assert abs(count - (f > 0).sum()) <= 0.002 * f.size  # float32 vs float64 at the threshold
    assert total == pytest.approx(f.sum(), rel=2e-3)
    assert sweep.activation_rows == query(
        root, "SELECT count(*) FROM feature_activations WHERE basis = 'tiny-l2'")[0][0]
    # The best example of a feature is its largest activation.
    (feature, value), = query(root, "SELECT feature_id, value FROM feature_examples WHERE basis "
                                    "= 'tiny-l2' AND step = ? AND rank = 1 ORDER BY value DESC "
                                    "LIMIT 1", [step])
    assert value == pytest.approx(f[:, feature].max(), rel=1e-3)


def test_examples_and_refitted_directions_equal_numpy(swept):
    root, _, _ = swept
    step = collected_steps(root)[-1]
    x, f, _ = numpy_codes(root, step)
    examples = query(root, "SELECT feature_id, list(value ORDER BY rank) FROM feature_examples "
                           "WHERE basis = 'tiny-l2' AND step = ? GROUP BY 1", [step])
    refitted = dict(query(root, "SELECT feature_id, direction FROM feature_directions WHERE "
                                "basis = 'tiny-l2' AND step = ?", [step]))
    # Least squares x ~ f W + b over every token, by numpy.
    design = np.hstack([f, np.ones((len(f), 1))])
    solution = np.linalg.lstsq(design, x, rcond=None)[0]
    checked = 0
    for feature, values in examples:
        fired = np.sort(f[:, feature][f[:, feature] > 0])[::-1]
        if len(fired) < 20:  # rarely firing features sit near the threshold, where float32
            continue         # and float64 encoders may disagree on a token or two
        np.testing.assert_allclose(values, fired[:8], rtol=1e-3)
        direction = np.array(refitted[feature])
        cosine = direction @ solution[feature] / (np.linalg.norm(direction)
                                                  * np.linalg.norm(solution[feature]))
        assert cosine > 0.999, feature
        checked += 1
    assert checked >= 10


def test_direction_cosines_follow_the_refitted_directions(swept):
    root, _, _ = swept
    rows = query(root, "SELECT t.step, t.direction_cosine_previous, t.direction_cosine_final, "
                       "d.direction FROM trajectories t JOIN feature_directions d USING (basis, "
                       "feature_id, step) WHERE basis = 'tiny-l2' AND feature_id = ("
                       "SELECT feature_id FROM trajectories WHERE basis = 'tiny-l2' GROUP BY 1 "
                       "HAVING min(activation_rate) > 0 ORDER BY 1 LIMIT 1) ORDER BY t.step")
    directions = [np.array(r[3]) for r in rows]
    unit = [d / np.linalg.norm(d) for d in directions]
    assert rows[0][1] is None and rows[-1][2] == pytest.approx(1.0)
    for i in range(1, len(rows)):
        assert rows[i][1] == pytest.approx(unit[i] @ unit[i - 1], abs=1e-5)
        assert rows[i - 1][2] == pytest.approx(unit[i - 1] @ unit[-1], abs=1e-5)


def test_parallel_sweep_gives_the_same_tables(swept, tmp_path):
    import shutil

    root, _, _ = swept
    copy = tmp_path / "warehouse"
    shutil.copytree(root, copy)
    feature_trajectory_sweep("tiny-l2", workers=2, warehouse=copy, progress=False)
    for table, order in [("trajectories", "feature_id, step"),
                         ("feature_directions", "feature_id, step"),
                         ("checkpoint_summary", "step"), ("split_profiles", "feature_id, step, "
                                                                           "split"),
                         ("feature_examples", "feature_id, step, rank"),
                         ("feature_activations", "step, feature_id, sequence_id, position")]:
        sql = f"SELECT * FROM {table} ORDER BY {order}"
        assert query(copy, sql) == query(root, sql), table


@pytest.mark.parametrize("checkpoints, message", [
    ("all", "is missing for run 'tiny' at step"),
    ("0,LAST", "at least 3 checkpoints"),
    ("0,0,LAST", "steps repeat"),
    ("0,other@1,LAST", "belongs to run 'other'"),
])
def test_bad_checkpoint_sets_fail_and_register_nothing(warehouse_copy, checkpoints, message):
    before = snapshot(warehouse_copy)
    with pytest.raises(FeaturestoreError, match=message):
        shared_feature_fit(TINY_RUN, STAGE, "bad", checkpoints=checkpoints,
                           warehouse=warehouse_copy, **FIT)
    assert snapshot(warehouse_copy) == before


def test_a_poor_fit_names_the_bound_and_registers_nothing(warehouse_copy):
    steps = ",".join(map(str, collected_steps(warehouse_copy)))
    before = snapshot(warehouse_copy)
    runner = CliRunner()
    result = runner.invoke(cli, [
        "--warehouse", str(warehouse_copy), "shared-feature-fit", "--run", TINY_RUN, "--stage",
        STAGE, "--checkpoints", steps, "--name", "poor", "--dict-size", "64", "--k", "4",
        "--steps", "20", "--batch-size", "256", "--quiet", "--min-explained-variance", "0.999"])
    assert result.exit_code == 1
    assert "below --min-explained-variance 0.999 (short by" in result.output
    assert "nothing was registered" in result.output
    # Only the rejected fit's weights and report were added, kept aside for inspection.
    after = snapshot(warehouse_copy)
    kept = {path for path in after if path.startswith("rejected/poor/")}
    assert "rejected/poor/report.json" in kept
    assert {path: data for path, data in after.items() if path not in kept} == before


def test_sweep_of_an_unknown_basis_lists_the_shared_bases(swept):
    root, _, _ = swept
    with pytest.raises(FeaturestoreError,
                       match="--basis 'nope': no such basis; shared bases: tiny-l2"):
        feature_trajectory_sweep("nope", warehouse=root, progress=False)


def test_cli_sweep_reports_json(swept, tmp_path):
    import shutil

    root, _, _ = swept
    copy = tmp_path / "warehouse"
    shutil.copytree(root, copy)
    result = CliRunner().invoke(cli, ["--warehouse", str(copy), "feature-trajectory-sweep",
                                      "--basis", "tiny-l2", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["steps"] == collected_steps(copy) and report["activation_rows"] > 0


def test_a_refit_drops_every_row_computed_from_the_old_weights(analysed_warehouse, tmp_path):
    root = tmp_path / "wh"
    shutil.copytree(analysed_warehouse, root)
    derived = sorted({table for table, where in derived_from_basis("tiny-l2")
                      if set(where) == {"basis"}})
    count = {table: f"SELECT count(*) FROM {table} WHERE basis = ?" for table in derived}
    before = {t: query(root, sql, ["tiny-l2"])[0][0] for t, sql in count.items()}
    other = {t: query(root, sql, ["tiny-fn"])[0][0] for t, sql in count.items()}
    for table in ("trajectories", "births", "birth_summary", "diffs", "patches",
                  "lineage_edges", "feature_activations"):
        assert before[table] > 0, table  # the fixture analysed tiny-l2 every way
    # tiny-fn's lineage read tiny-l2's features as its upstream: those edges go with tiny-l2
    upstream = ("SELECT count(*) FROM lineage_edges "
                "WHERE json_extract_string(pruning, '$.upstream') = ?")
    assert query(root, upstream, ["tiny-l2"])[0][0] == other["lineage_edges"] > 0
    steps = ",".join(str(s) for (s,) in query(
        root, "SELECT step FROM activation_sets WHERE stage = 'layer_2_post_mlp' ORDER BY step"))
    shared_feature_fit(TINY_RUN, "layer_2_post_mlp", "tiny-l2", checkpoints=steps, dict_size=64,
                       k=4, steps=30, batch_size=256, seed=1, min_explained_variance=-1.0,
                       max_active_fraction=1.0, max_dead_fraction=1.0, warehouse=root,
                       progress=False)
    after = {t: query(root, sql, ["tiny-l2"])[0][0] for t, sql in count.items()}
    assert after == dict.fromkeys(derived, 0)
    assert query(root, upstream, ["tiny-l2"])[0][0] == 0
    assert {t: query(root, sql, ["tiny-fn"])[0][0] for t, sql in count.items()} == {
        **other, "lineage_edges": 0}
    # Nothing ranks features from the old basis's diffs any more.
    from featurestore.ingest.feature_patch import feature_patch

    with pytest.raises(FeaturestoreError, match="no diffs for basis tiny-l2"):
        feature_patch("tiny-l2", 0, 20, features="top:3", tokens=64, warehouse=root,
                      progress=False)


def test_the_sweep_refuses_non_finite_activations(swept, tmp_path):
    import pyarrow as pa
    import pyarrow.compute as pc

    root = tmp_path / "wh"
    shutil.copytree(swept[0], root)
    before = query(root, "SELECT count(*) FROM trajectories")
    (name, path), = query(root, "SELECT name, path FROM activation_sets WHERE run = ? AND "
                                "stage = ? ORDER BY step DESC LIMIT 1", [TINY_RUN, STAGE])
    # Rows 7 and 9 of the stored set become NaN, as a bad disk or an outside writer could do.
    (arrow,) = (root / path).glob("*.arrow")
    with pa.ipc.open_stream(arrow) as reader:
        table = reader.read_all()
    flat = table["activations"].combine_chunks()
    width = flat.type.list_size
    values = flat.flatten().to_numpy(zero_copy_only=False).copy()
    for row in (7, 9):
        values[row * width:(row + 1) * width] = np.nan
    table = table.set_column(table.schema.get_field_index("activations"), "activations",
                             pa.FixedSizeListArray.from_arrays(pa.array(values), width))
    assert pc.sum(pc.is_nan(table["activations"].combine_chunks().flatten())).as_py() == 2 * width
    with pa.ipc.new_stream(tmp_path / "poisoned.arrow", table.schema) as writer:
        writer.write_table(table)
    (tmp_path / "poisoned.arrow").replace(arrow)  # not in place: the table maps the old file

    with pytest.raises(FeaturestoreError, match=f"activation set {name}.*NaN/Inf.*first bad row 7"):
        feature_trajectory_sweep("tiny-l2", warehouse=root, progress=False)
    assert query(root, "SELECT count(*) FROM trajectories") == before  # nothing written
