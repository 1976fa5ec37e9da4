"""Every input is validated at the door: a corpus of bad numbers and files, each refused by the
real CLI with an error naming the flag or file, no traceback, and the warehouse unchanged.

Numbers out of range fail in click, before any work; settings whose memory the machine lacks
fail before the allocation; files of the wrong format are recognised by their first bytes; and a
checkpoint whose weights hold NaN is refused by the jobs that run it instead of storing NaN.
The Python API refuses the same values with a FeaturestoreError naming the flag.
"""

from __future__ import annotations

import importlib
import math
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.errors import FeaturestoreError

from .conftest import RELAXED_BOUNDS, TINY_RUN, TINY_STEPS, query, snapshot
from .fault_tally import TALLY

SET = f"x={TINY_RUN}@{TINY_STEPS}:final_norm"  # an activation set of the trained warehouse
HUGE = 10**15  # far beyond the memory of any machine these tests run on
TOO_BIG_FOR_INT64 = str(2**70)


def refused(warehouse: Path, args: list[str], *named: str) -> str:
    """Run the CLI on `warehouse`; assert a clean refusal naming every string of `named` and an
    unchanged warehouse; return the output."""
    before = snapshot(warehouse)
    result = CliRunner().invoke(cli, ["--warehouse", str(warehouse), *args])
    TALLY.record_cli("bad input", result, mixed_state=snapshot(warehouse) != before)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for text in named:
        assert text in result.output, result.output
    assert snapshot(warehouse) == before
    return result.output


# --- numbers out of range: refused by click, naming the flag and its range ---------------------

CROSSCODER = ["train-crosscoder", "--name", "c", "--source", SET, "--steps", "1"]
FIT = ["shared-feature-fit", "--run", TINY_RUN, "--stage", "final_norm", "--name", "s"]
PATCH = ["feature-patch", "--basis", "b", "--source", "0", "--target", "1"]
BIRTHS = ["feature-birth-analyze", "--basis", "b"]
LINEAGE = ["feature-lineage", "--basis", "b"]

BAD_NUMBERS = [
    # (command line, flag, the range the message states)
    (CROSSCODER + ["--lr", "nan"], "--lr", "> 0"),
    (CROSSCODER + ["--lr", "-1"], "--lr", "> 0"),
    (CROSSCODER + ["--lr", "inf"], "--lr", "> 0"),
    (CROSSCODER + ["--betas", "2", "2"], "--betas", "[0, 1)"),
    (CROSSCODER + ["--betas", "0.9", "1"], "--betas", "[0, 1)"),
    (CROSSCODER + ["--l1-coeff", "-1"], "--l1-coeff", ">= 0"),
    (CROSSCODER + ["--aux-coeff", "nan"], "--aux-coeff", ">= 0"),
    (CROSSCODER + ["--seed", "-1"], "--seed", "0<=x<=4294967295"),
    (CROSSCODER + ["--seed", TOO_BIG_FOR_INT64], "--seed", "0<=x<=4294967295"),
    (CROSSCODER + ["--batch-size", "0"], "--batch-size", "1<=x<="),
    (CROSSCODER + ["--min-explained-variance", "nan"], "--min-explained-variance",
     "finite number"),
    (CROSSCODER + ["--max-active-fraction", "inf"], "--max-active-fraction",
     "finite number"),
    (CROSSCODER + ["--max-dead-fraction", "nan"], "--max-dead-fraction",
     "finite number"),
    (FIT + ["--lr", "nan"], "--lr", "> 0"),
    (FIT + ["--l1-coeff", "-1"], "--l1-coeff", ">= 0"),
    (FIT + ["--init-weight", "nan"], "--init-weight", "[0, 1]"),
    (FIT + ["--seed", "-1"], "--seed", "0<=x<=4294967295"),
    (["train-model", "--run", "m", "--seed", "-1"], "--seed", "0<=x<=4294967295"),
    (["train-model", "--run", "m", "--seed", TOO_BIG_FOR_INT64], "--seed", "0<=x<=4294967295"),
    (["finetune", "--run", "ft", "--from", TINY_RUN, "--seed", "-1"], "--seed", "0<="),
    (["collect", "--run", TINY_RUN, "--stage", "final_norm", "--seed", "-1"], "--seed", "0<="),
    (PATCH + ["--mode", "scale", "--scale", "nan"], "--scale", "finite number"),
    (PATCH + ["--mode", "scale", "--scale", "-inf"], "--scale", "finite number"),
    (PATCH + ["--seed", TOO_BIG_FOR_INT64], "--seed", "0<="),
    (BIRTHS + ["--threshold", "nan"], "--threshold", "> 0"),
    (BIRTHS + ["--stable-eps", "inf"], "--stable-eps", ">= 0"),
    (BIRTHS + ["--stable-cos", "nan"], "--stable-cos", "[-1, 1]"),
    (LINEAGE + ["--min-weight", "nan"], "--min-weight", ">= 0"),
    (LINEAGE + ["--patch-threshold", "inf"], "--patch-threshold", ">= 0"),
    (["feature-compare", "--basis", "b", "--source", TOO_BIG_FOR_INT64, "--target", "0"],
     "--source", "0<=x<=9223372036854775807"),
    (["snapshots", "--limit", TOO_BIG_FOR_INT64], "--limit", "1<=x<=9223372036854775807"),
    (["feature-trajectory-sweep", "--basis", "b", "--workers", "100000"], "--workers",
     "1<=x<=1024"),
    (["--threads", "100000", "tables"], "--threads", "1<=x<=1024"),
]


def _test_id(args: list[str], flag: str) -> str:
    """e.g. 'train-crosscoder --betas 2 2'."""
    command = next(a for a in args if not a.startswith("-") and not a.isdigit())
    return " ".join([command, *args[args.index(flag):][:3]])


@pytest.mark.parametrize("args, flag, allowed", BAD_NUMBERS,
                         ids=[_test_id(args, flag) for args, flag, _ in BAD_NUMBERS])
def test_a_number_out_of_range_is_refused_with_its_flag_and_range(warehouse_copy, args, flag,
                                                                  allowed):
    refused(warehouse_copy, args, flag, allowed)


API_CALLS = [
    # (module, job, arguments, what the error starts with)
    ("train_crosscoder", "train_crosscoder_job", dict(name="c", sources=[SET], lr=math.nan),
     "--lr nan"),
    ("train_crosscoder", "train_crosscoder_job", dict(name="c", sources=[SET], betas=(2, 2)),
     "--betas 2"),
    ("train_crosscoder", "train_crosscoder_job", dict(name="c", sources=[SET], aux_coeff=-1),
     "--aux-coeff -1"),
    ("train_crosscoder", "train_crosscoder_job",
     dict(name="c", sources=[SET], steps=1, batch_size=HUGE), f"--batch-size {HUGE}"),
    ("shared_feature_fit", "shared_feature_fit",
     dict(run=TINY_RUN, stage="final_norm", name="s", l1_coeff=-1.0), "--l1-coeff -1.0"),
    ("shared_feature_fit", "shared_feature_fit",
     dict(run=TINY_RUN, stage="final_norm", name="s", seed=2**32 - 2, seeds=3),
     f"--seed {2**32 - 2} --seeds 3"),
    ("feature_patch", "feature_patch",
     dict(basis="b", source=0, target=1, mode="scale", scale=math.nan), "--scale nan"),
    ("train_model", "train_model", dict(run="m", seed=-1), "--seed -1"),
    ("train_model", "finetune", dict(run="ft", from_checkpoint=TINY_RUN, seed=2**70),
     f"--seed {2**70}"),
    ("collect", "collect", dict(run=TINY_RUN, stages=["final_norm"], seed=-1), "--seed -1"),
    ("birth_analysis", "analyze_births", dict(basis="b", seed=-1), "--seed -1"),
]


@pytest.mark.parametrize("module, job, arguments, message", API_CALLS,
                         ids=[f"{job}-{message.split()[0]}" for _, job, _, message in API_CALLS])
def test_the_python_api_refuses_the_same_values(warehouse_copy, module, job, arguments,
                                                message):
    function = getattr(importlib.import_module(f"featurestore.ingest.{module}"), job)
    before = snapshot(warehouse_copy)
    with pytest.raises(FeaturestoreError, match=f"^{re.escape(message)}"):
        function(**arguments, warehouse=warehouse_copy)
    assert snapshot(warehouse_copy) == before


def test_the_config_dataclasses_refuse_bad_numbers():
    from featurestore.crosscoder import CrossCoderConfig
    from featurestore.crosscoder_training import TrainerConfig
    from featurestore.fit_quality import FitBounds
    from featurestore.training import TrainConfig

    with pytest.raises(FeaturestoreError, match=r"--betas 1.0: must be .* in \[0, 1\)"):
        TrainerConfig(betas=(0.9, 1.0))
    with pytest.raises(FeaturestoreError, match="--lr inf"):
        TrainerConfig(lr=math.inf)
    with pytest.raises(FeaturestoreError, match="--max-dead-fraction nan"):
        FitBounds(max_dead_fraction=math.nan)
    with pytest.raises(FeaturestoreError, match="--seed -1"):
        TrainConfig(seed=-1)
    with pytest.raises(ValueError, match="aux_coeff must be a finite number >= 0"):
        CrossCoderConfig(n_sources=1, d_model=4, d_hidden=64, aux_coeff=math.nan)


# --- sizes the machine cannot hold: refused before the allocation -----------------------------

@pytest.mark.parametrize("args, flag", [
    (CROSSCODER + ["--batch-size", str(HUGE)], "--batch-size"),
    (CROSSCODER + ["--dict-size", str(HUGE)], "--dict-size"),
    (["train-crosscoder", "--name", "c", "--source", f"x={TINY_RUN}@LAST:final_norm",
      "--tokens-from", "demo", "--steps", "1", "--pool-batches", str(HUGE)], "--pool-batches"),
    (["train-model", "--run", "m", "--d-model", str(4 * 10**6)], "--d-model"),
    (["collect", "--run", TINY_RUN, "--stage", "final_norm", "--tokens", str(HUGE)], "--tokens"),
    (PATCH + ["--tokens", str(HUGE)], "--tokens"),
    (LINEAGE + ["--tokens", str(HUGE)], "--tokens"),
], ids=["crosscoder-batch", "crosscoder-dict", "buffer-pool", "d-model",
        "collect-tokens", "patch-tokens", "lineage-tokens"])
def test_a_size_beyond_the_machines_memory_is_refused_before_allocating(warehouse_copy, args,
                                                                         flag):
    output = refused(warehouse_copy, args, f"{flag} ", "bytes", "available")
    assert len(output.strip().splitlines()) == 1  # one line: flag, bytes needed, bytes there


def test_a_shared_fit_batch_beyond_the_machines_memory_is_refused(warehouse_copy):
    refused(warehouse_copy, FIT + ["--checkpoints", _collected(warehouse_copy), "--batch-size",
                                   str(HUGE)], f"--batch-size {HUGE}", "bytes", "available")


# --- files of another format, and empty ones ----------------------------------------------------

def _pickle(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"activations": [1.0, 2.0]}))
    return path


def _empty_activation_set(path: Path) -> Path:
    pq.write_table(pa.table({
        "activations": pa.array([], pa.list_(pa.float32(), 4)),
        "sequence_id": pa.array([], pa.int64()), "position": pa.array([], pa.int32()),
        "token_id": pa.array([], pa.int64()), "split": pa.array([], pa.string())}), path)
    return path


def test_a_pickle_named_parquet_is_refused_by_its_first_bytes(warehouse_copy, tmp_path):
    path = _pickle(tmp_path / "acts.parquet")
    refused(warehouse_copy, ["register-activations", "--path", str(path), "--name", "p"],
            f"{path} is not a Parquet file (it starts with", "pickle")
    refused(warehouse_copy, ["train-crosscoder", "--name", "c", "--source", f"x={path}"],
            f"{path} is not a Parquet file")
    refused(warehouse_copy, ["collect", "--run", TINY_RUN, "--stage", "final_norm",
                             "--tokens-from", str(path)], f"{path} is not a Parquet file")


def test_an_empty_or_misnamed_file_is_refused_by_name(warehouse_copy, tmp_path):
    empty = tmp_path / "empty.parquet"
    empty.touch()
    refused(warehouse_copy, ["register-activations", "--path", str(empty), "--name", "p"],
            f"{empty} is not a Parquet file (it is empty, 0 bytes)")
    npz = _pickle(tmp_path / "acts.npz")
    refused(warehouse_copy, ["register-activations", "--path", str(npz), "--name", "p"],
            f"{npz} is not an .npz file")
    ids = tmp_path / "ids.npy"
    np.save(ids, np.zeros((2, 3), dtype=np.int64))
    npy = _pickle(tmp_path / "acts.npy")
    refused(warehouse_copy, ["register-activations", "--path", str(npy), "--token-ids", str(ids),
                             "--name", "p"], f"{npy} is not an .npy file")
    np.save(tmp_path / "good.npy", np.zeros((2, 3, 4), dtype=np.float32))
    refused(warehouse_copy, ["register-activations", "--path", str(tmp_path / "good.npy"),
                             "--token-ids", str(_pickle(tmp_path / "bad_ids.npy")),
                             "--name", "p"], "--token-ids", "is not an .npy file")


def test_an_empty_parquet_file_suggests_no_flag_that_would_not_help(warehouse_copy, tmp_path):
    acts = _empty_activation_set(tmp_path / "acts.parquet")
    output = refused(warehouse_copy, ["train-crosscoder", "--name", "c", "--source", f"x={acts}"],
                     f"{acts} holds no rows")
    assert "--include-first-position" not in output  # train-crosscoder has no such flag
    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), text)
    output = refused(warehouse_copy, ["collect", "--run", TINY_RUN, "--stage", "final_norm",
                                      "--tokens-from", str(text)], "holds no rows")
    assert "--tokenizer" not in output and "--text-column" not in output


def test_a_pickle_named_model_safetensors_is_refused_at_registration(warehouse_copy, tmp_path):
    import transformers

    folder = tmp_path / "model"
    transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1,
                            n_head=2).save_pretrained(folder)
    weights = _pickle(folder / "model.safetensors")
    refused(warehouse_copy, ["register-model", "--run", "hf", "--path", str(folder)],
            f"{weights} is not a safetensors file (it starts with")


# --- checkpoints whose weights are NaN ----------------------------------------------------------

@pytest.fixture(scope="module")
def fitted_warehouse(trained_warehouse, tmp_path_factory) -> Path:
    """The trained warehouse with a small pooled basis `tiny-fn` at final_norm."""
    from featurestore.ingest.shared_feature_fit import shared_feature_fit

    root = tmp_path_factory.mktemp("fitted") / "warehouse"
    shutil.copytree(trained_warehouse, root)
    shared_feature_fit(TINY_RUN, "final_norm", "tiny-fn", checkpoints=_collected(root),
                       dict_size=64, k=4, steps=30, batch_size=256, warehouse=root,
                       progress=False, **RELAXED_BOUNDS)
    return root


def _poison(root: Path, step: int, tensor: str) -> Path:
    """Set one weight of the checkpoint at `step` to NaN, as a bad disk or a diverged run
    could; the checkpoint folder."""
    from safetensors.torch import load_file, save_file

    (path,) = query(root, "SELECT path FROM checkpoints WHERE run = ? AND step = ?",
                    [TINY_RUN, step])[0]
    weights = root / path / "model.safetensors"
    state = load_file(weights)
    state[tensor][0] = float("nan")
    save_file(state, weights)
    return root / path


def _steps(root: Path) -> list[int]:
    """The checkpoints with activation sets (the trained warehouse collects three)."""
    return [s for (s,) in query(root, "SELECT step FROM activation_sets WHERE stage = "
                                      "'final_norm' ORDER BY step")]


def _collected(root: Path) -> str:
    return ",".join(map(str, _steps(root)))


def test_finetune_refuses_a_checkpoint_with_nan_weights(warehouse_copy):
    folder = _poison(warehouse_copy, TINY_STEPS, "blocks.0.mlp.fc.weight")
    refused(warehouse_copy, ["finetune", "--run", "ft", "--from", TINY_RUN, "--steps", "2",
                             "--quiet"], str(folder), "NaN/Inf weights", "blocks.0.mlp.fc.weight")


@pytest.mark.parametrize("tensor", ["wte.weight", "unembed.weight"])
def test_feature_patch_refuses_a_checkpoint_whose_forward_is_nan(fitted_warehouse, tmp_path,
                                                                 tensor):
    root = tmp_path / "warehouse"
    shutil.copytree(fitted_warehouse, root)
    first, *_, last = _steps(root)
    _poison(root, last, tensor)
    refused(root, ["feature-patch", "--basis", "tiny-fn", "--source", str(first), "--target",
                   str(last), "--features", "0,1", "--tokens", "128", "--quiet"],
            f"checkpoint {TINY_RUN}@{last}", "NaN/Inf")


def test_feature_lineage_refuses_a_checkpoint_whose_forward_is_nan(fitted_warehouse, tmp_path):
    root = tmp_path / "warehouse"
    shutil.copytree(fitted_warehouse, root)
    last = _steps(root)[-1]
    _poison(root, last, "wte.weight")
    refused(root, ["feature-lineage", "--basis", "tiny-fn", "--steps", str(last), "--features",
                   "0,1", "--tokens", "128", "--quiet"], f"checkpoint {TINY_RUN}@{last}",
            "NaN/Inf")
