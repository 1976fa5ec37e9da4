"""Training a crosscoder straight from models: an activation buffer fed by nnsight reads.

Instead of stored activation sets, every source is a model (a checkpoint of a registered run, or
a local Hugging Face folder) read at one stage. All sources run on the same token batches, so
their rows are aligned by construction, and nothing is written to disk.

The stream. A token source yields fixed-size batches of sequences, addressed by number (the demo
task's generator seeds batch i from (seed, i); a tokenized dataset is sliced), so any part of it
can be read again. Stream row r is token r of the concatenated batches.

The pool. The buffer holds P stream rows of every source in one preallocated tensor
[P, n_sources, d_model]. Each round shuffles the pool (seeded by the round number), serves the
first half of that order and refills the served slots with the next P/2 stream rows; once the
stream is exhausted the last round serves all that is left. So every stream row is served exactly
once, and which row is served at which position depends on integers alone (`PoolSchedule`):
the order can be computed without activations, a checkpoint needs only the pool's row numbers
and the token-source position, and training on the same rows stored as activation sets in that
order gives the same model. Training batches are consecutive positions, so a batch that straddles
two rounds is still whole: the buffer never yields an empty or partial batch. A round's refill
is read into its slots as they are served, which spreads the model reads over the steps (they
run in the trainer's background thread) without changing what the next round holds.

The norm scales are collect's (norm_sample, norm_scale), estimated on the first pool fill.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featurestore.activations import check_finite, norm_sample, norm_scale
from featurestore.aligned import AlignedActivations, Source
from featurestore.corpus import DEFAULT_OPTIONS, CorpusOptions, model_context, read_token_file
from featurestore.crosscoder_training import MIN_STEPS, check_enough_steps
from featurestore.errors import FeaturestoreError, InvalidActivationsError
from featurestore.registry import Run, get_checkpoints, get_run, parse_steps
from featurestore.resources import FLOAT_BYTES, require_memory
from featurestore.run_inputs import batch_sequences, open_reader
from featurestore.stages import StageReader, hf_reader
from featurestore.tasks import SyntheticTask, TaskConfig
from featurestore.token_text import TokenizerSearch

# Sequences per batch the buffer runs through each model, by default those of the demo task.
BATCH_SEQUENCES = batch_sequences(TaskConfig().n_ctx)

DEMO_TOKENS = "demo"  # --tokens-from value naming the demo task's generator
REPLAY_SEED_SALT = 1  # keeps the replay orders (--epochs) apart from the pool's round orders


# --- token sources ----------------------------------------------------------------------------


class TokenStream:
    """Token ids in numbered batches of `sequences` sequences of n_ctx tokens."""

    n_ctx: int
    sequences: int
    n_rows: int | None  # tokens in the stream; None: endless
    max_token_id: int
    description: str
    notes: tuple[str, ...] = ()  # what the user should know about the tokens, e.g. a file's size

    @property
    def rows_per_batch(self) -> int:
        return self.sequences * self.n_ctx

    def batch(self, index: int) -> torch.Tensor:
        """Token ids [sequences, n_ctx] of batch `index` (the last batch of a file may be short)."""
        raise NotImplementedError


class DemoTokens(TokenStream):
    """The demo task's per-sub-task splits in equal shares: like collect's token set, they do not
    depend on a run's task mix, so a base run and its fine-tune read the same tokens."""

    def __init__(self, task_config: dict, seed: int, n_rows: int | None,
                 sequences: int = BATCH_SEQUENCES):
        self.task = SyntheticTask(TaskConfig.from_dict(task_config))
        self.splits = SyntheticTask.DEFAULT_SPLITS
        self.sequences = sequences
        if self.sequences % len(self.splits):
            raise ValueError(f"sequences per batch must be a multiple of {len(self.splits)}")
        self.seed = seed
        self.n_ctx = self.task.config.n_ctx
        self.n_rows = n_rows
        self.max_token_id = self.task.vocab_size - 1
        self.description = (f"demo task splits={','.join(self.splits)} seed={seed} "
                            f"sequences_per_batch={self.sequences}")

    def batch(self, index: int) -> torch.Tensor:
        # One seed per batch, drawn from (seed, index): batch i is the same whenever it is read.
        seed = int(np.random.SeedSequence([self.seed, index]).generate_state(1, np.uint64)[0])
        per_split = self.sequences // len(self.splits)
        return torch.cat([self.task.sample(split, per_split, seed).tokens
                          for split in self.splits])


class TensorTokens(TokenStream):
    """Token ids held in memory [n_sequences, n_ctx], e.g. a tokenized dataset read from disk."""

    def __init__(self, tokens: torch.Tensor, n_rows: int, description: str,
                 sequences: int = BATCH_SEQUENCES, notes: tuple[str, ...] = ()):
        if n_rows > tokens.numel():
            raise ValueError(f"{n_rows} rows asked of {tokens.numel()} tokens")
        self.tokens = tokens
        self.sequences = sequences
        self.n_ctx = tokens.shape[1]
        self.n_rows = n_rows
        self.max_token_id = int(tokens.max())
        self.description = description
        self.notes = notes

    def batch(self, index: int) -> torch.Tensor:
        return self.tokens[index * self.sequences:(index + 1) * self.sequences]


class ReplayedTokens(TokenStream):
    """A bounded token stream read `epochs` times over (--epochs), for corpora too small for one
    pass to train on: the first pass in the stream's own order, every later one in a new seeded
    order of its sequences. The stream's sequences are held in memory (8 bytes per token).

    Sequences are the unit, so one pass must be whole sequences (n_rows a multiple of n_ctx).
    """

    def __init__(self, stream: TokenStream, epochs: int, seed: int):
        if stream.n_rows % stream.n_ctx:
            below = stream.n_rows // stream.n_ctx * stream.n_ctx
            choices = " or ".join(str(n) for n in (below, below + stream.n_ctx) if n)
            raise FeaturestoreError(
                f"--epochs {epochs} replays whole sequences, but --tokens {stream.n_rows} is not a "
                f"multiple of the sequence length {stream.n_ctx}: give --tokens {choices}")
        n_sequences = stream.n_rows // stream.n_ctx
        batches = -(-n_sequences // stream.sequences)
        self.corpus = torch.cat([stream.batch(i) for i in range(batches)])[:n_sequences]
        orders = [np.arange(n_sequences)] + [
            np.random.default_rng([seed, epoch, REPLAY_SEED_SALT]).permutation(n_sequences)
            for epoch in range(1, epochs)]
        self.order = torch.from_numpy(np.concatenate(orders))  # sequence at each stream place
        self.sequences = stream.sequences
        self.n_ctx = stream.n_ctx
        self.n_rows = stream.n_rows * epochs
        self.max_token_id = stream.max_token_id
        self.description = f"{stream.description} epochs={epochs}"
        self.notes = stream.notes

    def batch(self, index: int) -> torch.Tensor:
        return self.corpus[self.order[index * self.sequences:(index + 1) * self.sequences]]


def token_stream(tokens_from: str, sources: list[ModelSource], n_rows: int | None,
                 seed: int, options: CorpusOptions = DEFAULT_OPTIONS,
                 tokenizer: str | None = None) -> TokenStream:
    """The token source `--tokens-from` names, bounded by n_rows: demo, or a file of text or
    token ids (featurestore.corpus), sampled with `seed`. Text is tokenized with `tokenizer`, or
    the first source's (its run's registered tokenizer, or its model folder's)."""
    if tokens_from == DEMO_TOKENS:
        if options != DEFAULT_OPTIONS or tokenizer is not None:
            raise FeaturestoreError(
                "--tokens-from demo: --text-column, --tokenizer, --seq-len and --splits apply "
                "to a token file; the demo stream has its own sequences and splits")
        # A run of another task (the grokking experiment's) names it in its task_config.
        not_demo = [s.label for s in sources if s.task_config is None or "task" in s.task_config]
        if not_demo:
            raise FeaturestoreError(
                f"--tokens-from demo: source {not_demo[0]} is not a demo-task run, so it does not "
                "read the demo task's tokens; pass a tokenized dataset (--tokens-from PATH)")
        settings = [{k: v for k, v in s.task_config.items() if k != "mix"} for s in sources]
        differing = [s.label for s, other in zip(sources, settings) if other != settings[0]]
        if differing:
            raise FeaturestoreError(
                f"--tokens-from demo: sources {sources[0].label} and {differing[0]} come from "
                "demo runs with different task settings (beyond the mix), so no one token "
                "stream suits both; pass a tokenized dataset (--tokens-from PATH)")
        return DemoTokens(sources[0].task_config, seed, n_rows)
    first = sources[0]
    search = TokenizerSearch(tokenizer, first.run_info.tokenizer if first.run_info else None,
                             first.folder)
    contexts = [c for c in (model_context(s.reader.module) for s in sources) if c is not None]
    token_file = read_token_file(tokens_from, options, seed, n_rows, None, search,
                                 min(contexts, default=None))
    return TensorTokens(token_file.tokens, n_rows or token_file.tokens.numel(),
                        token_file.source, notes=tuple(token_file.notes))


# --- model sources ----------------------------------------------------------------------------


@dataclass
class ModelSource:
    label: str
    reader: StageReader
    stage: str
    info: dict  # what the basis records: activation_set (None), run, step, stage
    model: str  # RUN@STEP or hf:DIR, for messages and the resume check
    task_config: dict | None  # demo runs: the task their tokens come from
    run_info: Run | None = None  # RUN@STEP sources: the run (its tokenizer, its token_strings)
    folder: Path | None = None  # the checkpoint or hf:DIR folder, where a tokenizer may be

    def read(self, tokens: torch.Tensor) -> torch.Tensor:
        """The stage's activations [n_tokens, width] for token ids [n_sequences, n_ctx]."""
        value = self.reader.read(tokens, [self.stage])[self.stage]
        return value.reshape(-1, value.shape[-1]).float()


def is_model_target(target: str) -> bool:
    """Whether a --source target names a model (RUN@STEP:STAGE or hf:DIR:STAGE) by its shape."""
    return target.startswith("hf:") or ("@" in target and ":" in target.partition("@")[2])


def open_model_sources(warehouse, targets: list[tuple[str, str]]) -> list[ModelSource]:
    """resolve_model_source for every (label, target), on a connection of its own (for code
    outside a job, such as a notebook or a benchmark)."""
    from featurestore.warehouse import Warehouse

    wh = Warehouse(warehouse)
    with wh.connect() as con:
        return [resolve_model_source(wh, con, label, target) for label, target in targets]


def resolve_model_source(wh, con, label: str, target: str) -> ModelSource:
    """A ModelSource from RUN@STEP:STAGE (STEP a number or LAST) or hf:DIR:STAGE."""
    flag = f"--source {label}={target}"
    if target.startswith("hf:"):
        directory, _, stage = target[len("hf:"):].rpartition(":")
        if not directory or not stage:
            raise FeaturestoreError(f"{flag}: expected hf:DIR:STAGE, e.g. hf:~/models/gpt2:"
                                    "layer_6_post_mlp")
        path = Path(directory).expanduser().resolve()
        reader = _with_flag(flag, hf_reader, path)
        info = {"activation_set": None, "run": None, "step": None, "stage": stage}
        model, task_config, run_info, folder = f"hf:{path}", None, None, path
    else:
        run, _, rest = target.partition("@")
        step_text, _, stage = rest.partition(":")
        if not run or not step_text or not stage:
            raise FeaturestoreError(
                f"{flag}: expected RUN@STEP:STAGE (STEP a number or LAST), e.g. "
                "demo@LAST:layer_2_post_mlp, or hf:DIR:STAGE")
        steps = _with_flag(flag, parse_steps, step_text, flag)
        if steps is None or len(steps) != 1:
            raise FeaturestoreError(f"{flag}: give one step (a number or LAST), not {step_text!r}")
        run_info = _with_flag(flag, get_run, con, run)
        (checkpoint,) = _with_flag(flag, get_checkpoints, wh, con, run, steps)
        reader = _with_flag(flag, open_reader, run_info, checkpoint)
        info = {"activation_set": None, "run": run, "step": checkpoint.step, "stage": stage}
        model, task_config = f"{run}@{checkpoint.step}", run_info.task_config
        folder = checkpoint.path
    _with_flag(flag, reader.site, stage)
    return ModelSource(label, reader, stage, info, model, task_config, run_info, folder)


def _with_flag(flag: str, function, *args):
    """Call `function`, prefixing any FeaturestoreError with the --source flag it came from."""
    try:
        return function(*args)
    except FeaturestoreError as error:
        raise type(error)(f"{flag}: {error}") from None


def check_vocabulary(tokens: TokenStream, tokens_from: str, sources: list[ModelSource]) -> None:
    for source in sources:
        vocab = source.reader.vocab_size
        if tokens.max_token_id >= vocab:
            raise FeaturestoreError(
                f"--tokens-from {tokens_from}: token ids reach {tokens.max_token_id} but the model "
                f"of source {source.label} ({source.model}) has a vocabulary of {vocab}; use "
                "tokens of that model")


# --- which stream row is served where: integers only -------------------------------------------


@dataclass(frozen=True)
class PoolRound:
    """One round of the pool, as it starts."""

    number: int
    start: int  # position (in the buffer's output) of the first row it serves
    ids: np.ndarray  # the stream row each pool slot holds
    next_row: int  # the token-source position: the next stream row to read
    served: np.ndarray  # the slots it serves, in order

    @property
    def end(self) -> int:
        return self.start + len(self.served)


@dataclass(frozen=True)
class Refill:
    """How a round's pool becomes the next one's: new rows into served slots, then, once the
    stream has run dry, the slots left (the rest are dropped)."""

    slots: np.ndarray
    rows: np.ndarray  # the stream rows read into them, in order
    keep: np.ndarray | None


class PoolSchedule:
    def __init__(self, pool_rows: int, n_rows: int | None, seed: int):
        if pool_rows < 2:
            raise FeaturestoreError(f"the pool must hold at least 2 rows, got {pool_rows}")
        self.pool_rows = pool_rows
        self.half = pool_rows // 2
        self.n_rows = n_rows
        self.seed = seed

    def exhausted(self, next_row: int) -> bool:
        return self.n_rows is not None and next_row >= self.n_rows

    def round(self, number: int, start: int, ids: np.ndarray, next_row: int) -> PoolRound:
        order = np.random.default_rng([self.seed, number]).permutation(len(ids))
        # Refill half when half is used; with nothing left to refill from, serve the rest.
        served = order if self.exhausted(next_row) else order[:self.half]
        return PoolRound(number, start, ids, next_row, served)

    def first(self) -> PoolRound:
        filled = self.pool_rows if self.n_rows is None else min(self.pool_rows, self.n_rows)
        return self.round(0, 0, np.arange(filled), filled)

    def refill(self, current: PoolRound) -> Refill | None:
        """The refill after `current`; None after the last round."""
        if self.exhausted(current.next_row):
            return None
        left = None if self.n_rows is None else self.n_rows - current.next_row
        take = self.half if left is None else min(self.half, left)
        keep = None
        if take < len(current.served):  # the stream ran dry: the pool shrinks for its last round
            keep = np.setdiff1d(np.arange(len(current.ids)), current.served[take:])
        return Refill(current.served[:take], np.arange(current.next_row,
                                                       current.next_row + take), keep)

    def following(self, current: PoolRound) -> PoolRound | None:
        """The next round; None after the last."""
        refill = self.refill(current)
        if refill is None:
            return None
        ids = current.ids.copy()
        ids[refill.slots] = refill.rows
        if refill.keep is not None:
            ids = ids[refill.keep]
        return self.round(current.number + 1, current.end, ids,
                          current.next_row + len(refill.rows))

    def advance(self, current: PoolRound, position: int) -> PoolRound:
        """The round that serves `position` (or the last round, past the end)."""
        while position >= current.end:
            following = self.following(current)
            if following is None:
                break
            current = following
        return current

    def served_rows(self, stop: int) -> np.ndarray:
        """The stream rows served at positions 0 .. stop-1."""
        parts, current = [], self.first()
        while current is not None:
            parts.append(current.ids[current.served])
            current = None if current.end >= stop else self.following(current)
        order = np.concatenate(parts)
        if len(order) < stop:
            raise FeaturestoreError(f"the stream serves {len(order)} rows, fewer than {stop}")
        return order[:stop]


# --- the buffer -------------------------------------------------------------------------------


class ActivationBuffer:
    """Aligned, shuffled, normalised activations of several model sources, read on the fly.

    The training loop reads it as it reads AlignedActivations: indices_for_step gives the output
    positions of a step's batch and batch() their activations [batch, n_sources, d_model],
    normalised by the per-source norm scales estimated at the start. Positions must be asked in
    ascending order (the last batch may be asked again: the decoder-bias init reads step 0
    before the loop does): the pool moves on.
    """

    def __init__(self, sources: list[ModelSource], tokens: TokenStream, pool_rows: int,
                 seed: int = 0):
        if not sources:
            raise FeaturestoreError("a crosscoder needs at least one --source")
        self.sources = sources
        self.tokens = tokens
        self.n_rows = tokens.n_rows
        self.seed = seed
        self.schedule = PoolSchedule(pool_rows, tokens.n_rows, seed)
        self.produced = 0  # stream rows read through the models (re-reads count again)
        self.consumed = 0  # positions served to training
        self._cached_index, self._cached = -1, torch.empty(0)
        self.d_model = self._stream_batch(0).shape[-1]
        require_memory("--pool-batches", f"x --batch-size ({pool_rows:,} rows)",
                       pool_rows * len(sources) * self.d_model * FLOAT_BYTES,
                       f"the activation buffer's pool of {len(sources)} source(s) of width "
                       f"{self.d_model}")
        self.pool = torch.empty(pool_rows, len(sources), self.d_model)
        first = self.schedule.first()
        self._ledger = first  # the main thread's copy, for checkpoint states
        self.scales = self._begin(first)

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.sources]

    @property
    def norm_scales(self) -> torch.Tensor:
        return torch.tensor(self.scales, dtype=torch.float32)

    @property
    def memory_bytes(self) -> int:
        """The pool and the one stream batch kept of every source (what the pool size bounds)."""
        return (self.pool.numel() + self.tokens.rows_per_batch * len(self.sources)
                * self.d_model) * self.pool.element_size()

    def describe(self) -> dict:
        """What decides the data order; stored with the basis and compared on --resume."""
        return {"tokens": self.tokens.description, "n_rows": self.n_rows,
                "pool_rows": self.schedule.pool_rows, "seed": self.seed,
                "sources": [f"{s.label}={s.model}:{s.stage}" for s in self.sources]}

    # -- what the training loop reads ----------------------------------------------------------

    def indices_for_step(self, step: int, batch_size: int) -> np.ndarray:
        return np.arange(step * batch_size, (step + 1) * batch_size)

    def batch(self, positions: np.ndarray) -> torch.Tensor:
        """Normalised activations at the given output positions: [len, n_sources, d_model]."""
        if np.array_equal(positions, self._last[0]):
            return self._last[1].clone()
        order = np.argsort(positions, kind="stable")
        wanted = positions[order]
        if len(wanted) and wanted[0] < self._round.start:
            raise FeaturestoreError(
                f"activation buffer: position {wanted[0]} was served before the pool moved on "
                f"(it now starts at {self._round.start}); batches must be read in step order")
        out = torch.empty(len(positions), len(self.sources), self.d_model)
        done = 0
        while done < len(wanted):
            if wanted[done] >= self._round.end:
                self._next_round()
                continue
            upto = int(np.searchsorted(wanted, self._round.end))
            slots = self._round.served[wanted[done:upto] - self._round.start]
            out[order[done:upto]] = self.pool[slots]
            done = upto
        if len(wanted):
            self.consumed = max(self.consumed, int(wanted[-1]) + 1)
        self._last = (positions.copy(), out.clone())
        self._refill_served()
        return out

    def in_order(self, batch_size: int, max_tokens: int):
        """The first stream rows in order, normalised (for evaluation passes after training)."""
        end = max_tokens if self.n_rows is None else min(self.n_rows, max_tokens)
        for start in range(0, end, batch_size):
            yield self._rows(np.arange(start, min(start + batch_size, end))) * self._scale_column

    def calibration_batches(self, after_step: int, batch_size: int, n: int):
        """Whole batches for the BatchTopK threshold: the first stream rows again, since a
        bounded stream has nothing left after training."""
        return self.in_order(batch_size, n * batch_size)

    def progress(self) -> dict[str, str]:
        from tqdm import tqdm

        return {"read": tqdm.format_sizeof(self.produced) + "tok",
                "used": tqdm.format_sizeof(self.consumed) + "tok"}

    # -- checkpoints: row numbers and the token-source position, never activations -------------

    def state_at(self, position: int) -> dict:
        """The pool as the round serving `position` starts (position: the next step's first)."""
        self._ledger = self.schedule.advance(self._ledger, position)
        current = self._ledger
        return {"data": self.describe(), "round": current.number, "start": current.start,
                "next_row": current.next_row, "ids": current.ids.astype(np.int64)}

    def restore(self, state: dict | None) -> None:
        """Rebuild the pool of a saved state by reading its rows through the models again."""
        if state is None:
            raise FeaturestoreError(
                "--resume: the saved run trained on activation sets; resume it with the same "
                "--source sets and without --tokens-from")
        if state["data"] != self.describe():
            changed = sorted(k for k, v in self.describe().items() if state["data"].get(k) != v)
            raise FeaturestoreError(
                f"--resume: the saved run read its data differently ({', '.join(changed)}); "
                "resume with the same --source, --tokens-from, --tokens, --pool-batches and "
                "--seed, or start over without --resume")
        self._begin(self.schedule.round(state["round"], state["start"], state["ids"],
                                        state["next_row"]), self.scales)
        self._ledger = self._round
        self.consumed = self._round.start

    # -- reading ---------------------------------------------------------------------------------

    @property
    def _scale_column(self) -> torch.Tensor:
        return self.norm_scales[:, None]

    def _begin(self, first: PoolRound, scales: list[float] | None = None) -> list[float]:
        """Start at a round by reading every slot (the first round, or a restored one), and
        normalise them by `scales`, or by per-source norm scales estimated on these rows with
        collect's sample and formula: the stream's first rows, which the pool needs anyway."""
        self._round = first
        self._refill = self.schedule.refill(first)  # loaded as the round's slots are served
        self._refilled = 0  # rows of the refill already in the pool
        self._last = (np.empty(0, dtype=np.int64), torch.empty(0))  # positions, their batch
        raw = self._rows(first.ids, out=self.pool[:len(first.ids)])
        if scales is None:
            sample = norm_sample(first.ids % self.tokens.n_ctx)
            scales = [norm_scale(raw[sample, s].numpy()) for s in range(len(self.sources))]
        raw *= torch.tensor(scales, dtype=torch.float32)[:, None]
        return scales

    def _refill_served(self) -> None:
        """Read the refill's next rows into the slots served so far. The next round's pool is
        the same as if it were refilled all at once, but the model reads are spread over the
        steps, in the background thread, instead of stalling one step per round."""
        if self._refill is None:
            return
        served = min(len(self._refill.rows), self.consumed - self._round.start)
        if served > self._refilled:
            span = slice(self._refilled, served)
            self._load(self._refill.slots[span], self._refill.rows[span])
            self._refilled = served

    def _next_round(self) -> None:
        if self._refill is None:
            raise FeaturestoreError(
                f"activation buffer: the token source is exhausted after {self.n_rows} tokens, "
                f"all of them served; train for fewer steps or give more --tokens")
        refill, span = self._refill, slice(self._refilled, None)
        self._load(refill.slots[span], refill.rows[span])
        if refill.keep is not None:
            self.pool[:len(refill.keep)] = self.pool[refill.keep].clone()
        self._round = self.schedule.following(self._round)
        self._refill, self._refilled = self.schedule.refill(self._round), 0

    def _load(self, slots: np.ndarray, rows: np.ndarray) -> None:
        self.pool[slots] = self._rows(rows) * self._scale_column

    def _rows(self, rows: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """Raw activations [len(rows), n_sources, d_model] of the given stream rows (into `out`
        if given, e.g. a slice of the pool)."""
        per_batch = self.tokens.rows_per_batch
        batch_of = rows // per_batch
        if out is None:
            out = torch.empty(len(rows), len(self.sources), self.d_model)
        for index in np.unique(batch_of):  # ascending, so each stream batch is read once
            where = np.flatnonzero(batch_of == index)
            out[where] = self._stream_batch(int(index))[rows[where] - index * per_batch]
        return out

    def _stream_batch(self, index: int) -> torch.Tensor:
        """Every source's activations on stream batch `index`: [rows, n_sources, width]."""
        if index != self._cached_index:
            tokens = self.tokens.batch(index)
            reads = [source.read(tokens) for source in self.sources]
            first = self.sources[0]
            for source, read in zip(self.sources, reads):
                if read.shape[-1] != reads[0].shape[-1]:
                    raise InvalidActivationsError(
                        f"d_model mismatch: source {first.label} ({first.model}) has width "
                        f"{reads[0].shape[-1]} at {first.stage} but {source.label} "
                        f"({source.model}) has {read.shape[-1]} at {source.stage}; a crosscoder "
                        "needs sources of equal width")
                check_finite(read.numpy(), f"source {source.label} ({source.model}:"
                                           f"{source.stage}) on token batch {index}")
            self._cached, self._cached_index = torch.stack(reads, dim=1), index
            self.produced += len(tokens) * tokens.shape[1]
        return self._cached


class StoredInBufferOrder(AlignedActivations):
    """Activation sets holding a stream's rows (row r = stream row r), served in the order an
    ActivationBuffer with the same pool size and seed serves them, and calibrated on the first
    rows as the buffer is: training on them gives the model that training from the models
    gives (to float tolerance), so a buffer run can be checked or replayed from stored sets."""

    def __init__(self, sources: list[Source], pool_rows: int, seed: int, positions: int):
        super().__init__(sources, seed)
        self.order = PoolSchedule(pool_rows, self.n_tokens, seed).served_rows(positions)

    def indices_for_step(self, step: int, batch_size: int) -> np.ndarray:
        return self.order[step * batch_size:(step + 1) * batch_size]

    def calibration_batches(self, after_step: int, batch_size: int, n: int):
        return self.in_order(batch_size, n * batch_size)


def open_model_buffer(wh, con, parsed: list[tuple[str, str]], tokens_from: str,
                      n_rows: int | None, pool_rows: int, seed: int, batch_size: int,
                      steps: int | None, default_steps: int, epochs: int = 1,
                      options: CorpusOptions = DEFAULT_OPTIONS,
                      tokenizer: str | None = None) -> tuple[ActivationBuffer, int]:
    """The buffer of a train-crosscoder job whose --source values name models, and the steps
    its token stream allows, read `epochs` times (checked before any model runs). `options`
    and `tokenizer` say how to read a token file (token_stream)."""
    sources = [resolve_model_source(wh, con, label, target) for label, target in parsed]
    tokens = token_stream(tokens_from, sources, n_rows, seed, options, tokenizer)
    check_vocabulary(tokens, tokens_from, sources)
    derived = steps is None and tokens.n_rows is not None
    steps = steps_for_stream(tokens.n_rows, batch_size, steps, default_steps, epochs)
    if derived:
        read = f"{tokens.n_rows} tokens x --epochs {epochs}" if epochs > 1 else \
            f"{tokens.n_rows} tokens"
        fixes = [f"replay them with --epochs {-(-MIN_STEPS * batch_size // tokens.n_rows)}",
                 "give more --tokens"]
        if tokens.n_rows * epochs // MIN_STEPS:
            fixes.append(f"a smaller --batch-size (at most {tokens.n_rows * epochs // MIN_STEPS})")
        check_enough_steps(steps, f"the token source ({read} // --batch-size {batch_size})",
                           fixes)
    if epochs > 1:
        tokens = ReplayedTokens(tokens, epochs, seed)
    return ActivationBuffer(sources, tokens, pool_rows, seed), steps


def steps_for_stream(n_rows: int | None, batch_size: int, steps: int | None,
                     default_steps: int, epochs: int = 1) -> int:
    """Training steps a stream of n_rows tokens read `epochs` times allows: each row is used
    once per epoch, batches whole."""
    if epochs < 1:
        raise FeaturestoreError(f"--epochs must be at least 1, got {epochs}")
    if n_rows is None:
        if epochs > 1:
            raise FeaturestoreError(
                f"--epochs {epochs} replays a bounded token stream, but this one is endless: "
                "give --tokens N, the length of one pass")
        return steps or default_steps
    total = n_rows * epochs
    read = f"{n_rows} tokens" if epochs == 1 else f"{n_rows} tokens x --epochs {epochs}"
    if total < batch_size:
        raise FeaturestoreError(
            f"the token source is exhausted before the first batch: it has {read}, "
            f"fewer than --batch-size {batch_size}; give more --tokens or a smaller batch")
    if steps is not None and steps * batch_size > total:
        raise FeaturestoreError(
            f"--steps {steps} x --batch-size {batch_size} needs {steps * batch_size} tokens but "
            f"the token source has {read}; lower --steps to at most {total // batch_size}, give "
            "more --tokens or more --epochs")
    return steps or total // batch_size
