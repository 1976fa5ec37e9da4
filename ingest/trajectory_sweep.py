"""`featurestore feature-trajectory-sweep`: encode every checkpoint in a shared basis.

One streaming pass per checkpoint over its activation set (batches of SWEEP_BATCH tokens; memory
bounded by the batch and the basis) gathers everything the tables need:

    trajectories         per feature: activation rate, mean / mean-active / max activation,
                         energy (share of the reconstructed variance), per-split rates, and the
                         drift of its direction (cosine to the previous and to the last checkpoint)
    feature_directions   per feature: its direction refitted on this checkpoint's codes, by least
                         squares x ~ f W + b over all tokens (from the sums F'F and F'x)
    feature_activations  every non-zero activation, one Parquet file per checkpoint
    feature_examples     the top EXAMPLES activations per feature, with their token contexts
                         (as text too, when the basis's run has token_strings)
    checkpoint_summary   explained variance, relative error, L0, dead fraction
    split_profiles       per feature and token split: activation rate and mean activation

With --workers N, checkpoints are swept by N processes; each writes its feature_activations file
into the warehouse's tmp/ and returns the small tables, and the parent registers everything in
one commit, so the result is the same as a serial sweep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featurestore.activations import check_finite
from featurestore.errors import FeaturestoreError
from featurestore.results import Result
from featurestore.warehouse import Warehouse

if TYPE_CHECKING:  # imported for annotations only: workers import torch when they start
    from featurestore.activations import ActivationSet
    from featurestore.shared_basis import SharedBasis

SWEEP_BATCH = 4096
EXAMPLES = 8  # top activating contexts kept per feature and checkpoint
CONTEXT_BEFORE, CONTEXT_AFTER = 8, 4
RIDGE = 1e-6  # keeps the refit solvable when features never fire together


@dataclass
class SweepResult(Result):
    basis: str
    steps: list[int]
    tokens_per_checkpoint: int
    activation_rows: int
    seconds: float
    tokens_per_second: float
    rows_per_second_written: float
    write_seconds: float

    def summary(self) -> str:
        return (f"swept {self.basis!r}: {len(self.steps)} checkpoints x "
                f"{self.tokens_per_checkpoint:,} tokens in {self.seconds:.1f}s "
                f"({self.tokens_per_second:,.0f} tokens/s); {self.activation_rows:,} "
                f"activation rows written at {self.rows_per_second_written:,.0f} rows/s")


@dataclass
class CheckpointSweep:
    """What one checkpoint's pass produces, minus the big table (already in a Parquet file)."""

    step: int
    n_tokens: int
    trajectory: dict[str, np.ndarray]  # per-feature columns
    split_rates: dict[str, np.ndarray]  # split -> per-feature rate
    split_means: dict[str, np.ndarray]
    split_tokens: dict[str, int]
    directions: np.ndarray  # [h, d]
    examples: list[dict]
    summary: dict
    activations_file: Path
    activation_rows: int
    write_seconds: float
    # other seeds of the basis: seed -> per-feature activation_rate, mean_activation, energy
    seed_trajectories: dict[int, dict[str, np.ndarray]]


def feature_trajectory_sweep(basis: str, checkpoints: str = "all", workers: int = 1,
                             warehouse: str | None = None, progress: bool = True) -> SweepResult:
    from featurestore.registry import parse_steps
    from featurestore.shared_basis import load_shared_basis
    from featurestore.token_text import TokenStrings

    if workers < 1:
        raise FeaturestoreError(f"--workers must be at least 1, got {workers}")
    started = time.perf_counter()
    wh = Warehouse(warehouse)
    with wh.writer(f"feature-trajectory-sweep {basis}") as writer:
        with wh.connect() as con:
            shared, sets = load_shared_basis(wh, con, basis)
            strings = TokenStrings.load(con, shared.run)  # None: examples stay token ids
        available = shared.steps
        wanted = shared.resolve_steps(parse_steps(checkpoints), "--checkpoints")
        indices = [available.index(s) for s in wanted]
        writer.tmp_dir.mkdir(parents=True)
        files = {c: writer.tmp_dir / f"sweep-{available[c]}.parquet" for c in indices}
        if workers == 1:
            from tqdm import tqdm

            sweeps = [encode_checkpoint(shared, sets, c, files[c]) for c in tqdm(
                indices, desc=f"sweep {basis}", unit="checkpoint",
                disable=None if progress else True)]
        else:
            import multiprocessing

            import torch

            from featurestore.settings import set_torch_threads

            # spawn: a fresh interpreter per worker, no forked torch thread pools. The workers
            # share this process's torch threads, so N of them do not oversubscribe the cores.
            threads = max(1, torch.get_num_threads() // workers)
            with multiprocessing.get_context("spawn").Pool(
                    workers, initializer=set_torch_threads, initargs=(threads,)) as pool:
                sweeps = pool.starmap(sweep_checkpoint, [
                    (str(wh.root), wh.catalog_setting, basis, c, files[c]) for c in indices])

        tables = sweep_tables(basis, sweeps)
        if strings is not None:
            strings.decode_examples(tables["feature_examples"])
        tables["seed_trajectories"] = seed_trajectory_rows(shared, sweeps)
        for table, rows in tables.items():
            writer.put(table, rows)
        for sweep in sweeps:
            writer.adopt_partition("feature_activations", {"basis": basis, "step": sweep.step},
                                   sweep.activations_file)
    seconds = time.perf_counter() - started
    n_rows = sum(s.activation_rows for s in sweeps)
    write_seconds = sum(s.write_seconds for s in sweeps)
    tokens = sum(s.n_tokens for s in sweeps)
    return SweepResult(basis, [s.step for s in sweeps], sweeps[0].n_tokens, n_rows, seconds,
                       tokens / seconds, n_rows / max(write_seconds, 1e-9), write_seconds)


def sweep_checkpoint(root: str, catalog: str | None, basis_name: str, c: int,
                     activations_file: Path) -> CheckpointSweep:
    """Checkpoint c of the basis, swept (runs in a worker process with --workers)."""
    from featurestore.shared_basis import load_shared_basis

    wh = Warehouse(root, catalog)
    with wh.connect() as con:
        basis, sets = load_shared_basis(wh, con, basis_name)
    return encode_checkpoint(basis, sets, c, activations_file)


def encode_checkpoint(basis: SharedBasis, sets: list[ActivationSet], c: int,
                      activations_file: Path) -> CheckpointSweep:
    """One pass over checkpoint c's tokens: every statistic of the tables, and its
    feature_activations partition written to `activations_file`."""
    import pyarrow as pa
    import torch
    from scipy import sparse

    from featurestore.schema import spec
    from featurestore.shared_basis import ReconstructionSums
    from featurestore.writer import write_partition_file

    basis_name = basis.name
    step = basis.checkpoints[c].step
    tokens = sets[c].token_columns()
    n, h, d = len(tokens), basis.d_hidden, sets[c].d_model
    splits = np.asarray(tokens.split).astype(str)
    split_names = sorted(set(splits))
    decoder_norms = np.linalg.norm(basis.decoder_directions(c), axis=1)
    weight = energy_weights(basis, c)

    # One pass over the tokens keeps only the sparse codes (row, feature, value), the sums the
    # direction refit needs from the dense activations, and the reconstruction sums; every
    # per-feature statistic is then read off the sparse codes at once.
    gram, cross = np.zeros((h + 1, h + 1)), np.zeros((h + 1, d))
    reconstruction = ReconstructionSums()
    parts = []
    # The other seeds' dictionaries see the same batches; only their per-feature sums are kept.
    seed_bases = {seed: basis.seed_basis(seed) for seed in basis.seed_models}
    seed_sums = {seed: np.zeros((3, other.d_hidden)) for seed, other in seed_bases.items()}
    wanted = range(len(sets)) if basis.kind == "crosscoder" else [c]
    for start in range(0, n, SWEEP_BATCH):
        index = np.arange(start, min(start + SWEEP_BATCH, n))
        batch = [sets[s].rows(index, normalized=True) for s in wanted]
        for s, values in zip(wanted, batch):  # as fit and training refuse them, not encode them
            check_finite(values, f"activation set {sets[s].name}", first_row=start)
        rows = [torch.from_numpy(values) for values in batch]
        values, x_hat = basis.encode(rows, c)
        x = rows[c if basis.kind == "crosscoder" else 0].double().numpy()
        reconstruction.add(x, x_hat.double().numpy())
        # Feature-major (by feature, then token): the order the partition file is sorted in.
        feature, token = (t.numpy() for t in torch.nonzero(values.T > 0, as_tuple=True))
        value = values[token, feature].double().numpy()
        codes = sparse.csr_matrix((value, (token, feature)), shape=(len(index), h))
        cross[:h] += codes.T @ x
        cross[h] += x.sum(axis=0)
        parts.append((index[token], feature, value))
        for seed, other in seed_bases.items():
            seed_values = other.encode(rows, c)[0].double().numpy()
            seed_sums[seed] += [(seed_values > 0).sum(axis=0), seed_values.sum(axis=0),
                                ((seed_values * energy_weights(other, c)) ** 2).sum(axis=0)]
    token_row = np.concatenate([p[0] for p in parts])
    feature = np.concatenate([p[1] for p in parts])
    value = np.concatenate([p[2] for p in parts])
    # Each batch is a sorted run by (feature, row), so a stable sort only merges the runs (far
    # cheaper than sorting the table by its three key columns); the result is the partition's
    # (feature_id, sequence_id, position) order whenever the set's rows are in sequence order,
    # and write_partition_file sorts only if it is not.
    by_feature = np.argsort(feature, kind="stable")
    token_row, feature, value = token_row[by_feature], feature[by_feature], value[by_feature]

    written = time.perf_counter()
    activations = pa.table({
        "basis": pa.array([basis_name] * len(token_row), pa.string()),
        "step": pa.array(np.full(len(token_row), step, dtype=np.int64)),
        "feature_id": feature.astype(np.int32),
        "sequence_id": np.asarray(tokens.sequence_id)[token_row].astype(np.int64),
        "position": np.asarray(tokens.position)[token_row].astype(np.int32),
        "value": value.astype(np.float32),
    })
    write_partition_file(spec("feature_activations"), {"basis": basis_name, "step": step},
                         activations, activations_file)
    write_seconds = time.perf_counter() - written

    count = np.bincount(feature, minlength=h).astype(np.float64)
    total = np.bincount(feature, weights=value, minlength=h)
    energy = np.bincount(feature, weights=(value * weight[feature]) ** 2, minlength=h)
    split_of_row = splits[token_row]
    split_count = {s: np.bincount(feature[split_of_row == s], minlength=h) for s in split_names}
    split_total = {s: np.bincount(feature[split_of_row == s], weights=value[split_of_row == s],
                                  minlength=h) for s in split_names}
    top_values, top_rows = top_examples(token_row, feature, value, h)
    peak = np.maximum(top_values[0], 0)  # the largest value of each feature; 0 if it never fired

    codes = sparse.csr_matrix((value, (token_row, feature)), shape=(n, h))
    gram[:h, :h] = (codes.T @ codes).toarray()
    gram[:h, h] = gram[h, :h] = total
    gram[h, h] = n
    solution = np.linalg.solve(gram + RIDGE * np.eye(h + 1), cross)
    directions = np.where((count > 0)[:, None], solution[:h], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        trajectory = {
            "activation_rate": count / n, "mean_activation": total / n,
            "mean_active_activation": np.where(count > 0, total / count, np.nan),
            "max_activation": peak, "energy": energy / max(energy.sum(), 1e-300),
            "decoder_norm": decoder_norms if basis.kind == "crosscoder" else np.full(h, np.nan),
        }
    split_tokens = {s: int((splits == s).sum()) for s in split_names}
    seed_trajectories = {
        seed: {"activation_rate": sums[0] / n, "mean_activation": sums[1] / n,
               "energy": sums[2] / max(sums[2].sum(), 1e-300)}
        for seed, sums in seed_sums.items()}
    return CheckpointSweep(
        step=step, n_tokens=n, trajectory=trajectory,
        split_rates={s: split_count[s] / split_tokens[s] for s in split_names},
        split_means={s: split_total[s] / split_tokens[s] for s in split_names},
        split_tokens=split_tokens, directions=directions,
        examples=example_rows(basis_name, step, top_values, top_rows, tokens, splits),
        summary={"basis": basis_name, "step": step, "n_tokens": n,
                 "explained_variance": reconstruction.explained_variance,
                 "relative_reconstruction_error": reconstruction.mean_relative_error,
                 "l0": float(count.sum() / n), "active_fraction": float(count.sum() / n / h),
                 "dead_fraction": float((count == 0).mean())},
        activations_file=activations_file, activation_rows=len(token_row),
        write_seconds=write_seconds, seed_trajectories=seed_trajectories)


def energy_weights(basis: SharedBasis, c: int) -> np.ndarray:
    """What multiplies a feature's value to give the size of what it writes at checkpoint c:
    on a pooled basis its decoder norm (it writes f_i * d_i); crosscoder values already carry
    ||d_ic||."""
    if basis.kind == "pooled":
        return np.linalg.norm(basis.decoder_directions(c), axis=1)
    return np.ones(basis.d_hidden)


def top_examples(row: np.ndarray, feature: np.ndarray, value: np.ndarray, h: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """([EXAMPLES, h] values, [EXAMPLES, h] rows): each feature's largest activations, largest
    first, ties to the earlier row; -inf where a feature fired fewer than EXAMPLES times."""
    order = np.lexsort((row, -value, feature))
    by_feature = feature[order]
    rank = np.arange(len(order)) - np.searchsorted(by_feature, by_feature, side="left")
    kept = order[rank < EXAMPLES]
    top_values = np.full((EXAMPLES, h), -np.inf)
    top_rows = np.zeros((EXAMPLES, h), dtype=np.int64)
    top_values[rank[rank < EXAMPLES], feature[kept]] = value[kept]
    top_rows[rank[rank < EXAMPLES], feature[kept]] = row[kept]
    return top_values, top_rows


def example_rows(basis: str, step: int, top_values, top_rows, tokens, splits) -> list[dict]:
    """feature_examples rows: each kept activation with the tokens around it in its sequence."""
    sequence = np.asarray(tokens.sequence_id)
    position = np.asarray(tokens.position)
    token_ids = np.asarray(tokens.token_id)
    # Rows sorted by (sequence, position); each sequence is one slice [first, end) of `order`.
    order = np.lexsort((position, sequence))
    sorted_sequence = sequence[order]
    first = np.searchsorted(sorted_sequence, sorted_sequence, side="left")
    end = np.searchsorted(sorted_sequence, sorted_sequence, side="right")
    place = np.empty_like(order)
    place[order] = np.arange(len(order))
    rows = []
    for feature in range(top_values.shape[1]):
        rank = 0
        for value, row in zip(top_values[:, feature], top_rows[:, feature]):
            if not value > 0:
                break
            rank += 1
            at = place[row]
            lo = max(first[at], at - CONTEXT_BEFORE)
            hi = min(end[at], at + CONTEXT_AFTER + 1)
            rows.append({
                "basis": basis, "feature_id": feature, "step": step, "rank": rank,
                "value": float(value), "sequence_id": int(sequence[row]),
                "position": int(position[row]), "split": str(splits[row]),
                "context_token_ids": token_ids[order[lo:hi]].astype(int).tolist(),
                "context_start": int(position[order[lo]]),
            })
    return rows


def sweep_tables(basis: str, sweeps: list[CheckpointSweep]) -> dict[str, list[dict]]:
    """The small tables from every checkpoint's pass, with drift across checkpoints."""
    def unit(v: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        return np.where(norms > 0, v / np.where(norms > 0, norms, 1), np.nan)

    final = unit(sweeps[-1].directions)
    trajectories, directions, splits, examples, summaries = [], [], [], [], []
    previous = None
    for sweep in sweeps:
        current = unit(sweep.directions)
        to_final = (current * final).sum(axis=1)
        to_previous = (current * previous).sum(axis=1) if previous is not None else None
        t = sweep.trajectory
        norms = np.linalg.norm(sweep.directions, axis=1)
        for i in range(len(current)):
            trajectories.append({
                "basis": basis, "feature_id": i, "step": sweep.step, "n_tokens": sweep.n_tokens,
                "activation_rate": float(t["activation_rate"][i]),
                "mean_activation": float(t["mean_activation"][i]),
                "mean_active_activation": _finite(t["mean_active_activation"][i]),
                "max_activation": float(t["max_activation"][i]),
                "energy": float(t["energy"][i]),
                "split_activation_rates": {s: float(r[i]) for s, r in sweep.split_rates.items()},
                "direction_cosine_previous": None if to_previous is None else
                _finite(to_previous[i]),
                "direction_cosine_final": _finite(to_final[i]),
                "decoder_norm": _finite(t["decoder_norm"][i]),
            })
            directions.append({"basis": basis, "feature_id": i, "step": sweep.step,
                               "norm": float(norms[i]),
                               "direction": sweep.directions[i].astype(np.float32).tolist()})
            for s in sweep.split_rates:
                splits.append({"basis": basis, "feature_id": i, "step": sweep.step, "split": s,
                               "n_tokens": sweep.split_tokens[s],
                               "activation_rate": float(sweep.split_rates[s][i]),
                               "mean_activation": float(sweep.split_means[s][i])})
        examples += sweep.examples
        summaries.append(sweep.summary)
        previous = current
    return {"trajectories": trajectories, "feature_directions": directions,
            "split_profiles": splits, "feature_examples": examples,
            "checkpoint_summary": summaries}


def seed_trajectory_rows(basis: SharedBasis, sweeps: list[CheckpointSweep]) -> list[dict]:
    """seed_trajectories rows: every other seed's features at every swept checkpoint, each
    with the basis's feature it is paired with."""
    from featurestore.ingest.shared_feature_fit import match_features

    rows = []
    for seed, other in basis.seed_models.items():
        matched, cosine = match_features(basis.model, other)
        for sweep in sweeps:
            t = sweep.seed_trajectories[seed]
            rows += [{"basis": basis.name, "seed": seed, "feature_id": i,
                      "matched_feature_id": int(matched[i]), "match_cosine": float(cosine[i]),
                      "step": sweep.step, "activation_rate": float(t["activation_rate"][i]),
                      "mean_activation": float(t["mean_activation"][i]),
                      "energy": float(t["energy"][i])}
                     for i in range(other.config.d_hidden)]
    return rows


def _finite(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None
