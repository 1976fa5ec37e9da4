"""The activation buffer: whole batches at every pool boundary, the same model as training on
the same tokens pre-collected into activation sets, and exact resume."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore.activation_buffer import (
    ActivationBuffer,
    DemoTokens,
    PoolSchedule,
    StoredInBufferOrder,
    TensorTokens,
    open_model_sources,
    steps_for_stream,
)
from featurestore.activations import ActivationSet, norm_sample, norm_scale, write_activation_set
from featurestore.aligned import Source
from featurestore.corpus import sequence_columns
from featurestore.crosscoder import CrossCoder, CrossCoderConfig
from featurestore.crosscoder_training import TrainerConfig, _state_metadata, train_crosscoder
from featurestore.errors import FeaturestoreError
from featurestore.ingest.collect import read_stages

from .conftest import TINY_D_MODEL, TINY_RUN


@dataclass
class RowNumbers:
    """A source whose activation at a token is (multiplier x (token id + 1), 1): with token ids
    0, 1, 2, ... it says which stream row every served row is."""

    label: str
    multiplier: float
    model: str = "row-numbers"
    stage: str = "none"

    def read(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.reshape(-1).double() + 1
        return torch.stack([self.multiplier * ids, torch.ones_like(ids)], dim=1).float()


def row_buffer(n_rows: int, n_ctx: int, sequences: int, pool_rows: int) -> ActivationBuffer:
    n_sequences = -(-n_rows // n_ctx)
    tokens = torch.arange(n_sequences * n_ctx).reshape(n_sequences, n_ctx)
    stream = TensorTokens(tokens, n_rows, "row numbers", sequences=sequences)
    return ActivationBuffer([RowNumbers("a", 1.0), RowNumbers("b", 3.0)], stream, pool_rows,
                            seed=7)


def served_rows(buffer: ActivationBuffer, x: torch.Tensor) -> np.ndarray:
    """The stream row of every row of a batch, checked to be the same for both sources."""
    scales = buffer.norm_scales
    a = torch.round(x[:, 0, 0].double() / scales[0].double()).numpy() - 1
    b = torch.round(x[:, 1, 0].double() / (3 * scales[1].double())).numpy() - 1
    np.testing.assert_array_equal(a, b)
    return a.astype(np.int64)


@settings(max_examples=60, deadline=None)
@given(pool_rows=st.integers(2, 48), batch_size=st.integers(1, 40), n_ctx=st.integers(2, 6),
       sequences=st.integers(1, 5), extra_rows=st.integers(1, 200))
def test_every_batch_is_whole_and_every_row_is_served_once(pool_rows, batch_size, n_ctx,
                                                           sequences, extra_rows):
    n_rows = batch_size + extra_rows
    buffer = row_buffer(n_rows, n_ctx, sequences, pool_rows)
    steps = steps_for_stream(n_rows, batch_size, None, 0)
    assert steps == n_rows // batch_size
    rows = []
    for step in range(steps):
        index = buffer.indices_for_step(step, batch_size)
        x = buffer.batch(index)
        assert x.shape == (batch_size, 2, 2)
        again = buffer.batch(index)  # the last batch may be read again (the bias init does)
        assert torch.equal(x, again)
        rows.append(served_rows(buffer, x))
    rows = np.concatenate(rows)
    assert len(np.unique(rows)) == len(rows) and rows.min() >= 0 and rows.max() < n_rows
    # The order is computable from integers alone.
    np.testing.assert_array_equal(rows, PoolSchedule(pool_rows, n_rows, 7).served_rows(len(rows)))
    # Position p is served from a pool that has read at most pool_rows + (p // half) * half rows.
    half = pool_rows // 2
    positions = np.arange(len(rows))
    assert (rows < pool_rows + positions // half * half).all()
    assert buffer.pool.shape == (pool_rows, 2, 2)
    # The stream ends cleanly: no partial batch past the last whole one.
    with pytest.raises(FeaturestoreError, match="token source is exhausted"):
        buffer.batch(buffer.indices_for_step(steps, batch_size))


def test_a_whole_pass_serves_a_permutation_and_earlier_batches_are_gone():
    buffer = row_buffer(n_rows=200, n_ctx=4, sequences=3, pool_rows=40)
    rows = np.concatenate([served_rows(buffer, buffer.batch(buffer.indices_for_step(s, 20)))
                           for s in range(10)])
    assert sorted(rows) == list(range(200))
    assert not np.array_equal(rows, np.arange(200))
    with pytest.raises(FeaturestoreError, match="batches must be read in step order"):
        buffer.batch(buffer.indices_for_step(0, 20))
    with pytest.raises(FeaturestoreError, match="exhausted before the first batch"):
        steps_for_stream(10, 20, None, 0)
    with pytest.raises(FeaturestoreError, match="lower --steps to at most 10"):
        steps_for_stream(200, 20, 11, 0)


# --- against a real model: the tiny demo run ---------------------------------------------------

N_ROWS = 1536  # 96 sequences of 16 tokens, in stream batches of 8 sequences
POOL_ROWS = 256
TRAIN = TrainerConfig(steps=N_ROWS // 64, batch_size=64, warmup_steps=3, log_every=4,
                      save_every=6)


@pytest.fixture(scope="module")
def model_sources(trained_warehouse):
    return open_model_sources(trained_warehouse, [
        ("base", f"{TINY_RUN}@0:layer_2_post_mlp"), ("tuned", f"{TINY_RUN}@LAST:layer_2_post_mlp")])


def model_buffer(sources, pool_rows=POOL_ROWS) -> ActivationBuffer:
    tokens = DemoTokens(sources[0].task_config, seed=5, n_rows=N_ROWS, sequences=8)
    return ActivationBuffer(sources, tokens, pool_rows, seed=5)


def small_model(arch: str, d_model: int) -> CrossCoder:
    torch.manual_seed(0)
    config = CrossCoderConfig(n_sources=2, d_model=d_model, d_hidden=64, arch=arch, k=4,
                              aux_k=4, dead_after_tokens=256, source_labels=("base", "tuned"))
    return CrossCoder(config)


@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_training_from_models_equals_training_on_the_same_tokens_collected(
        tmp_path, model_sources, arch):
    buffer = model_buffer(model_sources)
    from_models = small_model(arch, buffer.d_model)
    trained = train_crosscoder(from_models, buffer, TRAIN, tmp_path / "buffer", progress=False)

    # Pre-collect the stream's tokens the way collect reads them, into activation sets.
    stream = buffer.tokens
    token_ids = torch.cat([stream.batch(i) for i in range(N_ROWS // stream.rows_per_batch)])
    columns = sequence_columns(token_ids, np.full(len(token_ids), "demo", dtype=object))
    sources = []
    for source in model_sources:
        values = read_stages(source.reader, token_ids, [source.stage])[source.stage]
        # Collect's norm scale, on the rows of the buffer's first pool fill.
        scale = norm_scale(values[:POOL_ROWS][norm_sample(columns.position[:POOL_ROWS])])
        write_activation_set(tmp_path / source.label, values, columns)
        sources.append(Source(source.label, ActivationSet(tmp_path / source.label,
                                                          norm_scale=scale)))
    assert buffer.scales == pytest.approx([s.activations.norm_scale for s in sources], rel=1e-6)
    stored = StoredInBufferOrder(sources, POOL_ROWS, 5, TRAIN.steps * TRAIN.batch_size)
    from_sets = small_model(arch, buffer.d_model)
    expected = train_crosscoder(from_sets, stored, TRAIN, tmp_path / "sets", progress=False)

    for name, value in from_sets.state_dict().items():
        torch.testing.assert_close(from_models.state_dict()[name], value, rtol=1e-5, atol=1e-6,
                                   msg=name)
    for got, want in zip(trained.metrics, expected.metrics):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_a_killed_run_resumes_from_the_pool_rows_and_token_position(tmp_path, model_sources):
    straight = small_model("batchtopk", TINY_D_MODEL)
    uninterrupted = train_crosscoder(straight, model_buffer(model_sources), TRAIN,
                                     tmp_path / "a", progress=False)

    class Killed(Exception):
        pass

    def kill_at_14(step):
        if step == 14:
            raise Killed

    with pytest.raises(Killed):
        train_crosscoder(small_model("batchtopk", TINY_D_MODEL), model_buffer(model_sources), TRAIN,
                         tmp_path / "b", progress=False, on_step=kill_at_14)
    saved = _state_metadata(tmp_path / "b")
    assert saved["step"] == 12
    # Step 12 starts at position 768, in round 6 of a 256-row pool refilled 128 rows at a time;
    # the stream has been read up to row 256 + 6 x 128.
    assert (saved["data"]["round"], saved["data"]["next_row"]) == (6, 256 + 6 * 128)

    resumed_model = small_model("batchtopk", TINY_D_MODEL)  # a fresh process: a fresh buffer
    resumed = train_crosscoder(resumed_model, model_buffer(model_sources), TRAIN, tmp_path / "b",
                               resume=True, progress=False)
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[name]), name
    assert resumed.metrics == uninterrupted.metrics

    with pytest.raises(FeaturestoreError, match=r"read its data differently \(pool_rows\)"):
        train_crosscoder(small_model("batchtopk", TINY_D_MODEL), model_buffer(model_sources, 128),
                         TRAIN, tmp_path / "b", resume=True, progress=False)
