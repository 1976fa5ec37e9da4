"""The grokking setup's data and progress measures, against hand-built inputs and numpy's FFT."""

from __future__ import annotations

import numpy as np
import pytest

from featurestore.grokking import (
    ModularAddition,
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
    assert tokens.shape == (P * P, 3) and (tokens[:, 2] == P).all()
    a, b = tokens[:, 0], tokens[:, 1]
    assert (tokens[:, 0] * P + tokens[:, 1] == np.arange(P * P)).all()
    assert (answers == (a + b) % P).all()
    mask = task.train_mask()
    assert mask.sum() == round(0.3 * P * P)
    assert (mask == ModularAddition(P, 0.3, seed=4).train_mask()).all()
    assert not (mask == ModularAddition(P, 0.3, seed=5).train_mask()).all()
    with pytest.raises(ValueError, match="prime"):
        ModularAddition(15, 0.3)


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
