"""`featurestore crosscoder-sweep`: make the latents of a train-crosscoder basis readable.

A train-crosscoder basis (a model diff: base vs fine-tuned, or any aligned sources) has no run of
checkpoints, so feature-trajectory-sweep does not apply. This job encodes every token of the
basis's aligned activation sets once and writes, in one commit:

    crosscoder_latent_stats  per latent and source: activation rate, mean / mean-active / max
                             activation, energy (share of that source's reconstructed variance),
                             decoder norm, and the mean of that source's term of the latent's
                             pre-activation where it fires (which model's activations drive it)
    crosscoder_examples      the top tokens of every latent (as many as feature_examples keeps),
                             with their context window
                             (decoded when the first source's run has token strings) and, per
                             source, what the latent writes there and that source's encoder term

The code is joint: one latent value per token, computed from every source's activations. The
latent's value in source s is that value times its decoder norm for s, the size of what it writes
into s (the convention of crosscoder-kind shared bases). The sources hold the same tokens row for
row, so one context serves every source; they differ in how much the latent writes into each.
Exclusive latents (model_diff.class) are the ones that write into one source only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from featurestore.errors import FeaturestoreError
from featurestore.ingest.trajectory_sweep import SWEEP_BATCH, example_rows, top_examples
from featurestore.registry import CROSSCODER, get_basis
from featurestore.results import Result
from featurestore.warehouse import Warehouse


@dataclass
class CrosscoderSweepResult(Result):
    basis: str
    sources: list[str]
    n_tokens: int
    d_hidden: int
    live_latents: int  # latents active on at least one token
    example_rows: int
    decoded: bool  # whether contexts were decoded (token strings of the first source's run)
    seconds: float

    def summary(self) -> str:
        return (f"swept {self.basis!r}: {self.n_tokens:,} tokens of {', '.join(self.sources)}; "
                f"{self.live_latents} of {self.d_hidden} latents active, "
                f"{self.example_rows:,} examples"
                f"{'' if self.decoded else ' (no token strings: contexts as token ids)'} "
                f"({self.seconds:.1f}s)")


def crosscoder_sweep(basis: str, warehouse: str | None = None,
                     progress: bool = True) -> CrosscoderSweepResult:
    """Encode every aligned token of the train-crosscoder basis `basis`; write
    crosscoder_latent_stats and crosscoder_examples (replacing the basis's earlier rows)."""
    import torch
    from tqdm import tqdm

    from featurestore.aligned import AlignedActivations
    from featurestore.crosscoder import CrossCoder

    started = time.perf_counter()
    wh = Warehouse(warehouse)
    with wh.writer(f"crosscoder-sweep {basis}") as writer:
        with wh.connect() as con:
            row = get_basis(con, basis, CROSSCODER, needed_for=(
                f"sweep it with `featurestore feature-trajectory-sweep --basis {basis}`; "
                "crosscoder-sweep is for train-crosscoder bases"))
            _check_sources_stored(basis, row)
            labels = [s["label"] for s in row["sources"]]
            data = AlignedActivations(_sources(wh, con, row))
            strings = _token_strings(con, [s["run"] for s in row["sources"]])
        model = CrossCoder.load(wh.path(row["path"]))
        h, n = model.config.d_hidden, data.n_tokens
        norms = model.decoder_norms().detach().double().numpy()  # [h, sources]
        encoder = model.W_enc.detach()  # [sources, d, h]
        count, total_inputs = np.zeros(h), np.zeros((len(labels), h))
        squares = np.zeros((len(labels), h))
        parts = []
        with torch.no_grad():
            for start in tqdm(range(0, n, SWEEP_BATCH), desc=f"crosscoder-sweep {basis}",
                              unit="batch", disable=None if progress else True):
                index = np.arange(start, min(start + SWEEP_BATCH, n))
                x = data.batch(index, normalized=True)  # [batch, sources, d]
                latents = model.encode(x, normalized=True).double().numpy()
                active = latents > 0
                count += active.sum(axis=0)
                for s in range(len(labels)):
                    inputs = (x[:, s] @ encoder[s]).double().numpy()
                    total_inputs[s] += np.where(active, inputs, 0.0).sum(axis=0)
                    squares[s] += ((latents * norms[:, s]) ** 2).sum(axis=0)
                token, feature = np.nonzero(active)
                parts.append((index[token], feature, latents[token, feature]))
        token_row = np.concatenate([p[0] for p in parts])
        feature = np.concatenate([p[1] for p in parts])
        value = np.concatenate([p[2] for p in parts])
        latent_total = np.bincount(feature, weights=value, minlength=h)
        latent_peak = np.zeros(h)
        np.maximum.at(latent_peak, feature, value)
        stats = []
        for s, label in enumerate(labels):
            energy = squares[s] / max(squares[s].sum(), 1e-300)
            for i in range(h):
                stats.append({
                    "basis": basis, "feature_id": i, "source": label, "source_index": s,
                    "n_tokens": n, "activation_rate": float(count[i] / n),
                    "mean_activation": float(latent_total[i] * norms[i, s] / n),
                    "mean_active_activation": (float(latent_total[i] * norms[i, s] / count[i])
                                               if count[i] > 0 else None),
                    "max_activation": float(latent_peak[i] * norms[i, s]),
                    "energy": float(energy[i]), "decoder_norm": float(norms[i, s]),
                    "mean_encoder_input": (float(total_inputs[s, i] / count[i])
                                           if count[i] > 0 else None),
                })
        top_values, top_rows = top_examples(token_row, feature, value, h)
        examples = _example_rows(basis, labels, top_values, top_rows, data, model, norms, strings)
        writer.put("crosscoder_latent_stats", stats, replace_where={"basis": basis})
        writer.put("crosscoder_examples", examples, replace_where={"basis": basis})
    return CrosscoderSweepResult(basis, labels, n, h, int((count > 0).sum()), len(examples),
                                 strings is not None, time.perf_counter() - started)


def _check_sources_stored(basis: str, row: dict) -> None:
    """The sweep reads each source's stored activations: a crosscoder trained straight from
    models has none."""
    from_models = [s["label"] for s in row["sources"] if s["activation_set"] is None]
    if from_models:
        raise FeaturestoreError(
            f"--basis {basis} was trained straight from models (--tokens-from), so no "
            f"activation sets were stored for source(s) {', '.join(from_models)}. Collect the "
            "sources on one token set (featurestore collect --run RUN --stage STAGE "
            "--checkpoints STEP for each), train the crosscoder on those sets, then sweep it")


def _sources(wh: Warehouse, con, row: dict) -> list:
    """The basis's sources, opened, each with the norm scale the basis was trained with."""
    from featurestore.ingest.train_crosscoder import resolve_source

    sources = []
    for stored in row["sources"]:
        source, _ = resolve_source(wh, con, stored["label"], stored["activation_set"])
        source.activations.norm_scale = stored["norm_scale"]
        sources.append(source)
    return sources


def _token_strings(con, runs: list[str | None]):
    """The TokenStrings of the first source run that has token strings, else None (the
    sources hold the same tokens, so one run's strings decode them all)."""
    from featurestore.token_text import TokenStrings

    for run in runs:
        strings = TokenStrings.load(con, run)
        if strings is not None:
            return strings
    return None


def _example_rows(basis, labels, top_values, top_rows, data, model, norms, strings
                  ) -> list[dict]:
    """crosscoder_examples rows: each kept token with its context window (the sweep's
    example_rows), decoded where there are token strings, and its per-source values."""
    tokens = data.sources[0].activations.token_columns()
    splits = np.asarray(tokens.split).astype(str)
    rows = example_rows(basis, 0, top_values, top_rows, tokens, splits)
    if strings is not None:
        strings.decode_examples(rows)
    if not rows:
        return rows
    feature = np.array([r["feature_id"] for r in rows])
    kept_row = top_rows[np.array([r["rank"] for r in rows]) - 1, feature]
    # Each source's encoder term at the kept tokens, read in one batch.
    x = data.batch(kept_row, normalized=True).double().numpy()  # [kept, sources, d]
    encoder = model.W_enc.detach().double().numpy()  # [sources, d, h]
    inputs = np.einsum("ksd,sdk->ks", x, encoder[:, :, feature])
    for j, row in enumerate(rows):
        del row["step"]  # the sources are not checkpoints of one run
        f = row["feature_id"]
        row["source_values"] = {label: row["value"] * float(norms[f, s])
                                for s, label in enumerate(labels)}
        row["source_inputs"] = {label: float(inputs[j, s]) for s, label in enumerate(labels)}
        row.setdefault("token_text", None)
        row.setdefault("context_text", None)
    return rows
