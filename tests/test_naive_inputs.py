"""register-activations takes activations as users write them, and converts them once.

Each input is written the way a user would (datasets from .tolist(), polars, float16, bfloat16
through datasets, .npz); the registered set must equal the input cast to float32 (compared with
numpy), its token columns must be the input's, and the input must be left byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.errors import InvalidActivationsError
from featurestore.ingest.register import register_activations
from featurestore.registry import get_activation_set_row, open_activation_set
from featurestore.warehouse import Warehouse

from .conftest import query

N_SEQUENCES, SEQ_LEN, D_MODEL = 12, 16, 8
N = N_SEQUENCES * SEQ_LEN


def values(dtype=np.float64) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((N, D_MODEL)).astype(dtype)


def token_columns() -> dict:
    index = np.arange(N)
    return {"sequence_id": index // SEQ_LEN, "position": index % SEQ_LEN,
            "token_id": np.random.default_rng(1).integers(0, 500, N),
            "split": np.where(index // SEQ_LEN % 2 == 0, "even", "odd")}


def datasets_tolist(path: Path):
    import datasets

    x = values()
    columns = {k: v.tolist() for k, v in token_columns().items()}
    datasets.Dataset.from_dict({"activations": x.tolist(), **columns}).save_to_disk(str(path))
    return path, x, "datasets column activations: list<item: double>"


def polars_tolist(path: Path):
    import polars as pl

    x = values()
    pl.DataFrame({"activations": x.tolist(), **token_columns()}).write_parquet(path)
    return path, x, "Parquet column activations: large_list<element: double>"


def polars_array(path: Path):
    import polars as pl

    x = values()
    frame = pl.DataFrame({"activations": x, **token_columns()})
    assert frame.schema["activations"] == pl.Array(pl.Float64, D_MODEL)
    frame.write_parquet(path)
    return path, x, "Parquet column activations: fixed_size_list<element: double>[8]"


def float16_fixed(path: Path):
    x = values(np.float16)
    flat = pa.array(x.reshape(-1))
    pq.write_table(pa.table({"activations": pa.FixedSizeListArray.from_arrays(flat, D_MODEL),
                             **token_columns()}), path)
    return path, x, "Parquet column activations: fixed_size_list<element: halffloat>[8]"


def float16_datasets(path: Path):
    import datasets

    x = values(np.float16)
    columns = {k: v.tolist() for k, v in token_columns().items()}
    datasets.Dataset.from_dict({"activations": x, **columns}).save_to_disk(str(path))
    return path, x, "datasets column activations: list<item: halffloat>"


def bfloat16_datasets(path: Path):
    """A bfloat16 tensor: datasets stores it as float32 lists (Arrow has no bfloat16)."""
    import datasets
    import torch

    x = torch.from_numpy(values(np.float32)).to(torch.bfloat16)
    columns = {k: v.tolist() for k, v in token_columns().items()}
    datasets.Dataset.from_dict({"activations": x, **columns}).save_to_disk(str(path))
    return path, x.float().numpy(), "datasets column activations: list<item: float>"


def npz(path: Path):
    x = values()
    tokens = token_columns()
    np.savez(path, activations=x.reshape(N_SEQUENCES, SEQ_LEN, D_MODEL),
             token_ids=tokens["token_id"].reshape(N_SEQUENCES, SEQ_LEN),
             split=tokens["split"][::SEQ_LEN])
    return path, x, "npz array activations: float64 [12, 16, 8]"


def npz_float16_compressed(path: Path):
    x = values(np.float16)
    np.savez_compressed(path, activations=x.reshape(N_SEQUENCES, SEQ_LEN, D_MODEL),
                        token_ids=token_columns()["token_id"].reshape(N_SEQUENCES, SEQ_LEN))
    return path, x, "npz array activations: float16 [12, 16, 8]"


INPUTS = {"datasets-tolist": (datasets_tolist, ""), "polars-tolist": (polars_tolist, ".parquet"),
          "polars-array": (polars_array, ".parquet"),
          "float16-parquet": (float16_fixed, ".parquet"),
          "float16-datasets": (float16_datasets, ""),
          "bfloat16-datasets": (bfloat16_datasets, ""), "npz": (npz, ".npz"),
          "npz-float16-compressed": (npz_float16_compressed, ".npz")}


def digest(path: Path) -> str:
    files = sorted(p for p in [path, *path.rglob("*")] if p.is_file())
    sha = hashlib.sha256()
    for file in files:
        sha.update(str(file.relative_to(path.parent)).encode())
        sha.update(file.read_bytes())
    return sha.hexdigest()


def stored(root: Path, name: str):
    wh = Warehouse(root)
    con = wh.connect()
    try:
        row = get_activation_set_row(con, name)
    finally:
        con.close()
    return row, open_activation_set(wh, row)


@pytest.mark.parametrize("form", list(INPUTS))
def test_inputs_are_converted_once_to_the_float32_values(tmp_path, form):
    write, suffix = INPUTS[form]
    path, x, described = write(tmp_path / f"input{suffix}")
    before = digest(path)
    root = tmp_path / "wh"
    result = CliRunner().invoke(cli, ["--warehouse", str(root), "register-activations",
                                      "--path", str(path), "--run", "ext", "--step", "3",
                                      "--stage", "resid", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["converted_from"] == described
    assert out["input_path"] == str(path) and out["format"] == "hf_dataset"
    folder = Path(out["path"])  # a new, versioned folder
    assert folder.parent == root / "activations" / "ext" / "resid"
    assert folder.name.startswith("step_000000003@")

    row, acts = stored(root, "ext@3:resid")
    assert row["source"] == "converted" and str(path) in row["token_source"]
    np.testing.assert_array_equal(acts.all_rows(), x.astype(np.float32))
    tokens, expected = acts.token_columns(), token_columns()
    for column in ("sequence_id", "position", "token_id"):
        np.testing.assert_array_equal(getattr(tokens, column), expected[column])
    if form != "npz-float16-compressed":  # that .npz has no split: every row reads "tokens"
        assert tokens.split.tolist() == expected["split"].tolist()
    else:
        assert set(tokens.split.tolist()) == {"tokens"}
    assert digest(path) == before
    assert query(root, "SELECT kind, d_model FROM runs") == [("external", D_MODEL)]


def test_float32_fixed_lists_stay_in_place(tmp_path):
    import polars as pl

    path = tmp_path / "acts.parquet"
    x = values(np.float32)
    pl.DataFrame({"activations": x, **token_columns()}).write_parquet(path)
    root = tmp_path / "wh"
    result = register_activations(str(path), name="probe", warehouse=root)
    assert result.converted_from is None and result.path == str(path)
    assert not (root / "activations").exists()  # no copy
    row, acts = stored(root, "probe")
    assert row["source"] == "registered" and row["path"] == str(path)
    np.testing.assert_array_equal(acts.all_rows(), x)


def test_the_text_output_says_what_was_converted(tmp_path):
    path, _, described = npz(tmp_path / "acts.npz")
    result = CliRunner().invoke(cli, ["--warehouse", str(tmp_path / "wh"), "register-activations",
                                      "--path", str(path), "--name", "probe"])
    assert result.exit_code == 0, result.output
    assert f"converted from {described} in {path} to float32 at " in result.output
    assert str(tmp_path / "wh" / "activations" / "_named" / "probe") in result.output


def test_a_row_of_another_width_is_refused_by_number_and_nothing_is_left(tmp_path):
    rows = values().tolist()
    rows[37] = rows[37][:-1]
    path = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"activations": rows, **token_columns()}), path)
    root = tmp_path / "wh"
    with pytest.raises(InvalidActivationsError,
                       match="row 37 of 'activations' has 7 values but row 0 has 8"):
        register_activations(str(path), name="ragged", warehouse=root)
    assert not root.exists()


@pytest.mark.parametrize("arrays, message", [
    ({"activations": np.zeros((N, D_MODEL)), "token_ids": np.zeros((N_SEQUENCES, SEQ_LEN))},
     r"shape \(192, 8\); expected \[n_sequences, seq_len, d_model\].*reshape"),
    ({"activations": np.zeros((N_SEQUENCES, SEQ_LEN, D_MODEL))}, "not token_ids.*np.savez"),
    ({"activations": np.zeros((N_SEQUENCES, SEQ_LEN, D_MODEL)),
      "token_ids": np.zeros((N_SEQUENCES, SEQ_LEN - 1), dtype=np.int64)},
     r"token_ids has shape \(12, 15\) but activations has \(12, 16\)"),
    ({"activations": np.zeros((N_SEQUENCES, SEQ_LEN, D_MODEL), dtype=np.int16),
      "token_ids": np.zeros((N_SEQUENCES, SEQ_LEN), dtype=np.int64)},
     "activations are int16; expected float16, float32 or float64"),
    ({"activations": np.zeros((N_SEQUENCES, SEQ_LEN, D_MODEL), dtype="V2"),
      "token_ids": np.zeros((N_SEQUENCES, SEQ_LEN), dtype=np.int64)},
     r"bfloat16 saved through ml_dtypes\?.*x.float\(\).numpy\(\)"),
])
def test_npz_files_of_another_layout_are_refused_with_the_fix(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InvalidActivationsError, match=message):
        register_activations(str(tmp_path / "bad.npz"), name="bad", warehouse=tmp_path / "wh")


def test_an_npy_takes_its_token_ids_from_a_second_npy(tmp_path):
    x, tokens = values(), token_columns()
    np.save(tmp_path / "acts.npy", x.reshape(N_SEQUENCES, SEQ_LEN, D_MODEL))
    with pytest.raises(InvalidActivationsError, match="holds no token ids.*--token-ids"):
        register_activations(str(tmp_path / "acts.npy"), name="x", warehouse=tmp_path / "wh")
    np.save(tmp_path / "ids.npy", tokens["token_id"].reshape(N_SEQUENCES, SEQ_LEN))
    result = CliRunner().invoke(cli, [
        "--warehouse", str(tmp_path / "wh"), "register-activations", "--path",
        str(tmp_path / "acts.npy"), "--token-ids", str(tmp_path / "ids.npy"), "--name", "npy",
        "--json"])
    assert result.exit_code == 0, result.output
    converted = json.loads(result.stdout)["converted_from"]
    assert converted == "npy array activations: float64 [12, 16, 8]"
    _, activation_set = stored(tmp_path / "wh", "npy")
    np.testing.assert_array_equal(activation_set.all_rows(), x.astype(np.float32))
    columns = activation_set.token_columns()
    np.testing.assert_array_equal(columns.token_id, tokens["token_id"])
    np.testing.assert_array_equal(columns.sequence_id, tokens["sequence_id"])
    np.testing.assert_array_equal(columns.position, tokens["position"])
    # Token ids of another layout are refused before anything is written.
    np.save(tmp_path / "flat.npy", tokens["token_id"])
    with pytest.raises(InvalidActivationsError, match="token_ids has shape"):
        register_activations(str(tmp_path / "acts.npy"), token_ids=str(tmp_path / "flat.npy"),
                             name="flat", warehouse=tmp_path / "wh")
    with pytest.raises(InvalidActivationsError, match="--token-ids goes with a .npy"):
        register_activations(str(npz(tmp_path / "acts.npz")[0]),
                             token_ids=str(tmp_path / "ids.npy"), name="y",
                             warehouse=tmp_path / "wh")


def test_conversion_reads_in_slices(tmp_path, monkeypatch):
    """Slices smaller than the set give the same set as one slice (rows across slice edges)."""
    import featurestore.activation_inputs as inputs

    path, x, _ = polars_tolist(tmp_path / "acts.parquet")
    monkeypatch.setattr(inputs, "SLICE_VALUES", 5 * D_MODEL)  # 5 rows a slice
    register_activations(str(path), name="sliced", warehouse=tmp_path / "wh")
    np.testing.assert_array_equal(stored(tmp_path / "wh", "sliced")[1].all_rows(),
                                  x.astype(np.float32))
    npz_path, x, _ = npz(tmp_path / "acts.npz")
    register_activations(str(npz_path), name="sliced-npz", warehouse=tmp_path / "wh")
    np.testing.assert_array_equal(stored(tmp_path / "wh", "sliced-npz")[1].all_rows(),
                                  x.astype(np.float32))
