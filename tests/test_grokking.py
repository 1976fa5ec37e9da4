"""The grokking setup's data and progress measures, against hand-built inputs and numpy's FFT."""

from __future__ import annotations

import numpy as np
import pytest

from featurestore.grokking import (
    ModularAddition,
    answer_feature_shares,
    answer_frequency,
    cross_entropy,
    fourier_basis,
    frequency_shares,
    key_frequencies,
    restricted_and_excluded_logits,
)

P = 13


def test_problems_are_every_pair_and_a_fixed_share_is_trained():
    task = ModularAddition(P, 0.3, seed=4)
    tokens, answers = task.tokens(), task.answers()
    assert tokens.shape == (P * P, 4) and (tokens[:, 2] == P).all()
    a, b = tokens[:, 0], tokens[:, 1]
    assert (tokens[:, 0] * P + tokens[:, 1] == np.arange(P * P)).all()
    assert (answers == (a + b) % P).all() and (tokens[:, 3] == answers).all()
    mask = task.train_mask()
    assert mask.sum() == round(0.3 * P * P)
    assert (mask == ModularAddition(P, 0.3, seed=4).train_mask()).all()
    assert not (mask == ModularAddition(P, 0.3, seed=5).train_mask()).all()
    with pytest.raises(ValueError, match="prime"):
        ModularAddition(15, 0.3)


def test_a_split_sample_is_the_whole_split_when_asked_for_as_many():
    task = ModularAddition(P, 0.3, seed=4)
    train, test = task.sample("train", P * P, seed=0), task.sample("test", P * P, seed=0)
    rows = {tuple(r) for r in train.tokens.tolist()} | {tuple(r) for r in test.tokens.tolist()}
    assert len(train.tokens) == task.train_mask().sum() and len(rows) == P * P
    assert {tuple(r) for r in train.tokens.tolist()} == {
        tuple(r) for r in task.tokens()[task.train_mask()].tolist()}
    # Only the prediction at '=' (of the answer) is graded.
    assert train.scored.sum(0).tolist() == [0, 0, len(train.tokens), 0]
    few = task.sample("test", 10, seed=3)
    assert len(few.tokens) == 10 and not task.train_mask()[few.tokens[:, 0] * P
                                                            + few.tokens[:, 1]].any()
    assert (few.tokens == task.sample("test", 10, seed=3).tokens).all()


def test_frequency_shares_match_numpy_fft():
    basis = fourier_basis(P)
    np.testing.assert_allclose(basis @ basis.T, np.eye(P), atol=1e-12)
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(P, 7))
    shares = frequency_shares(matrix)
    # numpy's complex DFT over x: |X_k|² + |X_{p-k}|² is frequency k's energy (times p).
    spectrum = np.abs(np.fft.fft(matrix, axis=0)) ** 2
    energy = np.concatenate([spectrum[:1].sum(1), (spectrum[1:(P + 1) // 2]
                                                    + spectrum[:(P - 1) // 2:-1]).sum(1)])
    np.testing.assert_allclose(shares, energy / energy.sum(), atol=1e-12)


def test_key_frequencies_of_an_embedding_built_on_two():
    x = np.arange(P)
    rng = np.random.default_rng(1)
    matrix = (np.outer(np.cos(2 * np.pi * 3 * x / P), rng.normal(size=8))
              + np.outer(np.sin(2 * np.pi * 5 * x / P), rng.normal(size=8))
              + 0.01 * rng.normal(size=(P, 8)))
    assert key_frequencies(frequency_shares(matrix)) == [3, 5]


def test_restricted_and_excluded_logits_split_a_planted_algorithm_from_noise():
    task = ModularAddition(P, 0.5)
    a, b = task.tokens()[:, 0], task.tokens()[:, 1]
    c = np.arange(P)
    phase = 2 * np.pi * 4 * ((a + b)[:, None] - c[None, :]) / P
    algorithm = 3.0 * np.cos(phase)  # the Fourier algorithm on frequency 4: peaks at c = a + b
    noise = np.random.default_rng(2).normal(size=(P * P, P))
    restricted, excluded = restricted_and_excluded_logits(algorithm + noise, [4])
    # The noise's own part along the key directions, by least squares per input.
    directions = np.stack([np.ones_like(phase), np.cos(phase), np.sin(phase)], axis=1)
    own = np.einsum("nd,ndc->nc", np.stack([np.linalg.lstsq(d.T, n, rcond=None)[0]
                                            for d, n in zip(directions, noise)]), directions)
    np.testing.assert_allclose(restricted, algorithm + own, atol=1e-9)
    np.testing.assert_allclose(excluded - excluded.mean(1, keepdims=True),
                               (noise - own) - (noise - own).mean(1, keepdims=True), atol=1e-9)
    answers = task.answers()
    assert cross_entropy(restricted, answers) < cross_entropy(excluded, answers)


def test_cross_entropy_by_hand():
    logits = np.array([[0.0, np.log(3.0)], [2.0, 2.0]])
    assert cross_entropy(logits, np.array([1, 0])) == pytest.approx(
        (-np.log(3 / 4) - np.log(1 / 2)) / 2)


def numpy_shares(values: np.ndarray) -> np.ndarray:
    """Share of a length-p vector's squared norm per frequency, from numpy's complex FFT."""
    p = len(values)
    spectrum = np.abs(np.fft.fft(values)) ** 2
    energy = np.concatenate([spectrum[:1], spectrum[1:(p + 1) // 2] + spectrum[:(p - 1) // 2:-1]])
    return energy / energy.sum()


def test_fourier_udfs_match_numpy_fft(tmp_path):
    import duckdb

    from featurestore.sql_functions import register_sql_functions
    from featurestore.warehouse import Warehouse

    con = duckdb.connect()
    register_sql_functions(con, Warehouse(tmp_path))
    rng = np.random.default_rng(5)
    c = np.arange(P)
    wave = np.maximum(np.cos(2 * np.pi * 4 * c / P + 0.3), 0) + 0.05 * rng.normal(size=P)
    for values in (rng.normal(size=P), wave):
        got = con.execute("SELECT fourier_shares(?::DOUBLE[])", [values.tolist()]).fetchone()[0]
        np.testing.assert_allclose(got, numpy_shares(values), atol=1e-12)
    assert con.execute("SELECT dominant_frequency(?::DOUBLE[])", [wave.tolist()]).fetchone()[0] \
        == 4 == int(np.argmax(numpy_shares(wave)[1:])) + 1
    # A constant or zero profile follows no frequency; an even length is no Z_p for odd p.
    assert con.execute("SELECT dominant_frequency([2.0, 2.0, 2.0]), "
                       "fourier_shares([0.0, 0.0, 0.0]), fourier_shares([1.0, 2.0])"
                       ).fetchone() == (None, [0.0, 0.0], None)


def test_answer_frequency_of_planted_features():
    task = ModularAddition(P, 0.5)
    a, b, answers = task.tokens()[:, 0], task.tokens()[:, 1], task.answers()
    # A rectified wave of frequency 3 in the answer: the Fourier algorithm's kind of feature.
    wave = np.maximum(np.cos(2 * np.pi * 3 * answers / P + 1.0), 0)
    found = answer_frequency(wave, answers, P)
    profile = np.array([wave[answers == c].mean() for c in range(P)])
    np.testing.assert_allclose(found.answer_profile, profile, atol=1e-12)
    shares = numpy_shares(profile)
    assert found.dominant_frequency == 3 and found.follows_frequency
    assert found.dominant_share == pytest.approx(shares[3] / shares[1:].sum())
    assert found.answer_variance_share == pytest.approx(1.0)
    assert found.n_active == int((wave > 0).sum())
    # A feature of the first operand only: its mean per answer is flat, so the answer explains
    # none of its variance (up to the finite grid, exactly none: every answer meets every a).
    operand = np.maximum(np.sin(2 * np.pi * 2 * a / P), 0)
    flat = answer_frequency(operand, answers, P)
    assert flat.answer_variance_share == pytest.approx(0.0, abs=1e-12)
    assert flat.dominant_frequency is None and not flat.follows_frequency
    # Two equal waves: neither holds a majority, so the feature follows no one frequency.
    mixed = (np.cos(2 * np.pi * 2 * answers / P) + np.cos(2 * np.pi * 5 * answers / P)
             + 0.0 * b)
    both = answer_frequency(mixed, answers, P)
    assert both.dominant_frequency in (2, 5) and both.dominant_share == pytest.approx(0.5)
    silent = answer_frequency(np.zeros(P * P), answers, P)
    assert (silent.n_active, silent.dominant_frequency, silent.answer_variance_share) == \
        (0, None, None)


def test_answer_features_on_two_circles_put_their_share_in_those_frequencies():
    # Answer features whose decoders lie on the circles of frequencies 2 and 5 (as the Fourier
    # algorithm writes the answer), two features for some answers, none for answer 0.
    rng = np.random.default_rng(6)
    u = np.linalg.qr(rng.normal(size=(16, 4)))[0].T  # 4 orthonormal directions
    answers = [c for c in range(1, P)] + [3, 7]
    c = np.array(answers)
    decoders = (np.outer(np.cos(2 * np.pi * 2 * c / P), u[0])
                + np.outer(np.sin(2 * np.pi * 2 * c / P), u[1])
                + 0.5 * np.outer(np.cos(2 * np.pi * 5 * c / P), u[2])
                + 0.5 * np.outer(np.sin(2 * np.pi * 5 * c / P), u[3]))
    decoders *= rng.uniform(0.5, 2.0, size=(len(c), 1))  # norms do not matter: unit directions
    shares = answer_feature_shares(decoders, answers, P)
    units = decoders / np.linalg.norm(decoders, axis=1, keepdims=True)
    means = np.stack([units[c == a].mean(0) if (c == a).any() else np.zeros(16)
                      for a in range(P)])
    np.testing.assert_allclose(shares, numpy_shares_columns(means), atol=1e-12)
    waves = shares[1:] / shares[1:].sum()
    assert waves[[1, 4]].sum() > 0.9  # frequencies 2 and 5 (answer 0's gap leaks a little)


def numpy_shares_columns(matrix: np.ndarray) -> np.ndarray:
    spectrum = (np.abs(np.fft.fft(matrix, axis=0)) ** 2).sum(axis=1)
    energy = np.concatenate([spectrum[:1], spectrum[1:(P + 1) // 2] + spectrum[:(P - 1) // 2:-1]])
    return energy / energy.sum()
