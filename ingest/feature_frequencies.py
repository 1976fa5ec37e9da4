"""`featurestore feature-frequencies`: which Fourier frequency each feature of a modular-addition
basis follows, stored in `feature_frequencies`.

A run of the grokking experiment answers c = (a + b) mod p at the '=' position. At one checkpoint
(by default the basis's last) every feature is encoded on every collected problem at that
position, its activations are averaged per answer c (the answer profile, a function over Z_p),
and the profile's Fourier decomposition gives its dominant frequency. A feature of the Fourier
algorithm follows one frequency: its profile is (a rectified) cos(w_k c + phase). Whether that
frequency is one of the run's key frequencies (progress_measures) is stored beside it, so "when
were the key-frequency features born" is a join with births.

A feature can also look the answer up: fire on the problems of one answer, whatever the pair.
Such a feature follows no one frequency (its profile is a spike), but the answer features
together do: their decoder directions, averaged per answer, trace the circles of the Fourier
algorithm, and answer_feature_frequencies says how much of that lies in the key frequencies.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.grokking import (
    ModularAddition,
    answer_feature_shares,
    answer_frequency,
)
from featurestore.results import Result
from featurestore.warehouse import Warehouse

ENCODE_BATCH = 4096


@dataclass
class FeatureFrequenciesResult(Result):
    basis: str
    step: int
    n_problems: int  # problems read at the answer position
    n_features: int
    n_following: int  # features following one frequency (grokking.FOLLOWS_SHARE)
    n_key_frequency: int  # of those, features following a key frequency
    n_answer_features: int  # features looking the answer up (answer_feature_frequencies)
    answer_features_key_share: float | None  # their decoders' share in the key frequencies
    key_frequencies: list[int]
    seconds: float

    def summary(self) -> str:
        return (f"basis {self.basis!r} at step {self.step}: {self.n_problems} problems, "
                f"{self.n_following} of {self.n_features} features follow one frequency, "
                f"{self.n_key_frequency} a key frequency ({self.key_frequencies}); "
                f"{self.n_answer_features} look the answer up"
                + ("" if self.answer_features_key_share is None else
                   f", their decoders {self.answer_features_key_share:.0%} in the key "
                   "frequencies")
                + "; stored in feature_frequencies and answer_feature_frequencies")


def feature_frequencies(basis: str, step: int = -1, warehouse: str | None = None
                        ) -> FeatureFrequenciesResult:
    """Store every feature's answer profile and dominant frequency at `step` (-1: the last)."""
    import torch

    from featurestore.registry import get_run
    from featurestore.shared_basis import load_shared_basis
    from featurestore.tasks import task_from_config

    started = time.perf_counter()
    wh = Warehouse(warehouse)
    with wh.writer(f"feature-frequencies {basis}") as writer:
        with wh.connect() as con:
            shared, sets = load_shared_basis(wh, con, basis)
            shared.require_pooled("--basis")
            run = get_run(con, shared.run)
            task = task_from_config(run.task_config) if run.task_config else None
            if not isinstance(task, ModularAddition):
                raise FeaturestoreError(
                    f"--basis {basis}: its run {run.run!r} was not trained on modular addition "
                    "(featurestore experiment grokking), so its features are not functions of "
                    "an answer a + b mod p")
            keys = con.execute("SELECT any_value(key_frequencies) FROM progress_measures "
                               "WHERE run = ?", [run.run]).fetchone()[0]
            if keys is None:
                raise NotFoundError(f"--basis {basis}: run {run.run!r} has no progress_measures "
                                    "rows; train it with `featurestore experiment grokking`")
        (chosen,) = shared.resolve_steps([step], "--step")
        c = shared.steps.index(chosen)
        acts = sets[c]
        tokens = acts.token_columns()
        at_answer = np.flatnonzero(tokens.position == ModularAddition.ANSWER_POSITION)
        answers = _answers(tokens, at_answer, acts.name)
        values = np.concatenate([
            shared.encode([torch.from_numpy(acts.rows(at_answer[i:i + ENCODE_BATCH],
                                                      normalized=True))], c)[0].numpy()
            for i in range(0, len(at_answer), ENCODE_BATCH)])
        rows = []
        for feature in range(shared.d_hidden):
            found = answer_frequency(values[:, feature], answers, task.p)
            rows.append({"basis": basis, "feature_id": feature, "step": chosen, **asdict(found),
                         "follows_frequency": found.follows_frequency,
                         "answer_feature": found.answer_feature,
                         "key_frequency": (found.follows_frequency
                                           and found.dominant_frequency in keys)})
        writer.put("feature_frequencies", rows, replace_where={"basis": basis})
        # The answer features, each at the answer it fires most on.
        answer_features = [r for r in rows if r["answer_feature"]]
        looked_up = [int(np.argmax(r["answer_profile"])) for r in answer_features]
        answer_row = None
        if answer_features:
            shares = answer_feature_shares(
                shared.decoder_directions(c)[[r["feature_id"] for r in answer_features]],
                looked_up, task.p)
            answer_row = {
                "basis": basis, "step": chosen, "n_answer_features": len(answer_features),
                "answers_covered": len(set(looked_up)), "frequency_shares": shares.tolist(),
                "key_frequency_share": float(shares[list(keys)].sum() / shares[1:].sum()),
                "key_frequencies": list(keys)}
        writer.put("answer_feature_frequencies", [answer_row] if answer_row else [],
                   replace_where={"basis": basis})
    return FeatureFrequenciesResult(
        basis=basis, step=chosen, n_problems=len(at_answer), n_features=len(rows),
        n_following=sum(r["follows_frequency"] for r in rows),
        n_key_frequency=sum(r["key_frequency"] for r in rows),
        n_answer_features=len(answer_features),
        answer_features_key_share=(None if answer_row is None
                                   else answer_row["key_frequency_share"]),
        key_frequencies=list(keys), seconds=time.perf_counter() - started)


def _answers(tokens, at_answer: np.ndarray, name: str) -> np.ndarray:
    """The answer of each problem read at the answer position: the token after '=' in its
    sequence."""
    after = tokens.position == ModularAddition.ANSWER_POSITION + 1
    answer_of = dict(zip(tokens.sequence_id[after].tolist(), tokens.token_id[after].tolist()))
    sequences = tokens.sequence_id[at_answer].tolist()
    missing = [s for s in sequences if s not in answer_of]
    if missing:
        raise FeaturestoreError(
            f"activation set {name}: sequence {missing[0]} has no answer token after '='; "
            "collect the run's own task tokens (featurestore collect without --tokens-from)")
    return np.array([answer_of[s] for s in sequences], dtype=np.int64)

