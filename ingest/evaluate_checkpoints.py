"""`featurestore evaluate-checkpoints`: next-token loss and accuracy of a run's checkpoints on a
token file, stored in checkpoints.heldout_loss / heldout_accuracy / split_metrics.

Runs trained here carry their task's own metrics from training; registered models (Hugging Face
folders, custom modules) get theirs from a token file, so checkpoint_metrics has a learning curve
for every run. The file is read like collect's --tokens-from (featurestore.corpus: text,
tokenized with the run's tokenizer, or equal-length input_ids; an optional split column), in
equal shares of its splits: as many sequences as that allows, or a given token count. Every
next-token prediction of every sequence counts: the split 'heldout' is all of them together, and
each split of the file gets a row of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from featurestore.errors import FeaturestoreError
from featurestore.results import Result
from featurestore.token_text import TokenizerSearch
from featurestore.warehouse import Warehouse, records

if TYPE_CHECKING:
    import torch

OVERALL_SPLIT = "heldout"
BATCH_SEQUENCES = 64


@dataclass
class CheckpointMetrics:
    loss: float  # mean next-token cross-entropy over every prediction (nats)
    accuracy: float  # share of predictions whose argmax is the next token
    split_metrics: list[dict]  # {split, loss, accuracy}: 'heldout' (all) and the file's splits


@dataclass
class EvalTokens:
    """A token file read for evaluation."""

    ids: torch.Tensor  # [n_sequences, length]
    splits: np.ndarray  # [n_sequences] split name of each sequence
    description: str  # what checkpoints.eval_tokens records: file, sampling, fingerprint

    @classmethod
    def read(cls, path: str, n_tokens: int | None, flag: str, tokenizer: TokenizerSearch,
             context: int | None) -> EvalTokens:
        """The file read as collect reads --tokens-from (featurestore.corpus): token ids, or text
        tokenized with the model's tokenizer; as many sequences as equal shares of the splits
        allow when `n_tokens` is None."""
        from featurestore.corpus import CorpusOptions, read_token_file

        try:
            token_set = read_token_file(path, CorpusOptions(), seed=0, tokens=n_tokens,
                                        default_tokens=None, tokenizer=tokenizer,
                                        context=context)
        except FeaturestoreError as error:  # corpus names collect's flags; name this command's
            count_flag = flag.removesuffix("-from")
            raise type(error)(str(error).replace("--tokens-from", flag)
                              .replace("--tokens ", f"{count_flag} ")) from None
        names = set(token_set.splits)
        if OVERALL_SPLIT in names and len(names) > 1:
            raise FeaturestoreError(
                f"{flag} {path}: a split is named {OVERALL_SPLIT!r}, the name of all sequences "
                "together; rename it")
        description = f"{token_set.source} fingerprint={token_set.columns().fingerprint()}"
        return cls(token_set.tokens, token_set.splits, description)

    def check_vocabulary(self, vocab_size: int, what: str) -> None:
        if int(self.ids.max()) >= vocab_size or int(self.ids.min()) < 0:
            raise FeaturestoreError(
                f"evaluation token ids range over {int(self.ids.min())}..{int(self.ids.max())} "
                f"but {what} has a vocabulary of {vocab_size}; use tokens of that model")


def next_token_metrics(module: torch.nn.Module, tokens: EvalTokens) -> CheckpointMetrics:
    """Loss and accuracy of a causal LM (forward: ids -> logits or an object with .logits)."""
    import torch
    import torch.nn.functional as F

    names = sorted(set(tokens.splits))
    loss_sum, correct, count = (dict.fromkeys(names, 0.0) for _ in range(3))
    module.eval()
    with torch.no_grad():
        for start in range(0, len(tokens.ids), BATCH_SEQUENCES):
            batch = tokens.ids[start:start + BATCH_SEQUENCES]
            output = module(batch)
            logits = (output.logits if hasattr(output, "logits") else output)[:, :-1].double()
            targets = batch[:, 1:]
            losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                     reduction="none").reshape(targets.shape).sum(dim=1)
            hits = (logits.argmax(-1) == targets).sum(dim=1)
            for split, loss, hit in zip(tokens.splits[start:start + len(batch)], losses, hits):
                loss_sum[split] += float(loss)
                correct[split] += float(hit)
                count[split] += targets.shape[1]
    total = sum(count.values())
    overall = {"split": OVERALL_SPLIT, "loss": sum(loss_sum.values()) / total,
               "accuracy": sum(correct.values()) / total}
    per_split = [{"split": s, "loss": loss_sum[s] / count[s], "accuracy": correct[s] / count[s]}
                 for s in names if s != OVERALL_SPLIT]  # a file whose one split is 'heldout'
    return CheckpointMetrics(overall["loss"], overall["accuracy"], [overall, *per_split])


def metric_columns(metrics: CheckpointMetrics, tokens: EvalTokens) -> dict:
    """The checkpoints columns an evaluation fills."""
    return {"heldout_loss": metrics.loss, "heldout_accuracy": metrics.accuracy,
            "split_metrics": metrics.split_metrics, "eval_tokens": tokens.description}


@dataclass
class EvaluateResult(Result):
    run: str
    eval_tokens: str
    checkpoints: list[dict] = field(default_factory=list)  # step, heldout_loss, heldout_accuracy

    def summary(self) -> str:
        lines = [f"evaluated {len(self.checkpoints)} checkpoint(s) of {self.run} on "
                 f"{self.eval_tokens}"]
        lines += [f"  step {checkpoint['step']:>8}  loss {checkpoint['heldout_loss']:.4f}  "
                  f"accuracy {checkpoint['heldout_accuracy']:.4f}"
                  for checkpoint in self.checkpoints]
        return "\n".join(lines)


def evaluate_checkpoints(run: str, tokens_from: str, tokens: int | None = None,
                         checkpoints: str | None = "all", tokenizer: str | None = None,
                         warehouse: str | None = None) -> EvaluateResult:
    """Evaluate the listed checkpoints of a registered model run and store their metrics."""
    from featurestore.corpus import model_context
    from featurestore.registry import get_checkpoints, get_run, parse_steps
    from featurestore.run_inputs import open_reader

    if tokens is not None and tokens < 1:
        raise FeaturestoreError(f"--tokens must be positive, got {tokens}")
    wh = Warehouse(warehouse)
    with wh.writer(f"evaluate-checkpoints {run}") as writer:
        with wh.connect() as con:
            run_info = get_run(con, run)
            chosen = get_checkpoints(wh, con, run, parse_steps(checkpoints))
            rows = {row["step"]: row for row in records(
                con, "SELECT * FROM checkpoints WHERE run = ?", [run])}
        if run_info.task_config is not None:
            raise FeaturestoreError(
                f"run {run!r} was trained here: its checkpoints carry the task's own train, "
                "heldout and sub-task metrics. evaluate-checkpoints is for registered models")
        first = open_reader(run_info, chosen[0])
        search = TokenizerSearch(tokenizer, run_info.tokenizer, chosen[0].path)
        eval_tokens = EvalTokens.read(tokens_from, tokens, "--tokens-from", search,
                                      model_context(first.module))
        eval_tokens.check_vocabulary(first.vocab_size, f"the model of {run!r}")
        result = EvaluateResult(run, eval_tokens.description)
        for checkpoint in chosen:
            reader = first if checkpoint is chosen[0] else open_reader(run_info, checkpoint)
            metrics = next_token_metrics(reader.module, eval_tokens)
            row = rows[checkpoint.step] | metric_columns(metrics, eval_tokens)
            writer.put("checkpoints", [row])
            result.checkpoints.append({"step": checkpoint.step, "heldout_loss": metrics.loss,
                                       "heldout_accuracy": metrics.accuracy})
    return result
