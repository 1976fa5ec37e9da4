"""A tiny text language model series, built locally for tests that need real text.

`build_text_models(root)` writes an English corpus generated from templates (a .txt file with
blank lines between documents, and the same documents as .jsonl with a topic split), trains a
byte-level BPE tokenizer on it with the `tokenizers` library, and trains a tiny GPT-2 on the
packed text with plain torch, saving a checkpoint folder (model and tokenizer, save_pretrained)
at each of a few steps. Nothing is downloaded; with the default arguments it takes a few seconds.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

EOS = "<|endoftext|>"
STEPS = (0, 20, 60, 120)  # the saved checkpoints
SEQ_LEN = 32

# Sentence templates per topic; each slot is filled from its word list. The topics are the
# splits of the .jsonl corpus.
TOPICS = {
    "weather": (
        ["The {time} was {adj} and {adj2}, so we stayed {place}.",
         "By {time} the wind had turned {adj}, and the {noun} looked {adj2}.",
         "Forecasters said the {noun} would bring {adj} skies to the {area} by {time}.",
         "We watched the {noun} roll over the {area} while the air grew {adj}."],
        {"time": ["morning", "afternoon", "evening", "night", "weekend"],
         "adj": ["cold", "warm", "grey", "bright", "damp", "windy", "clear"],
         "adj2": ["quiet", "heavy", "calm", "strange", "pleasant"],
         "place": ["inside", "at home", "near the fire", "under the porch"],
         "noun": ["storm", "fog", "rain", "cloud bank", "snow"],
         "area": ["valley", "coast", "city", "hills", "harbour"]}),
    "cooking": (
        ["{name} added {amount} of {food} to the {dish} and let it {verb} slowly.",
         "The recipe asks for {amount} of {food}, a pinch of salt and a {adj} pan.",
         "After the {dish} had {verb_past}, {name} served it with fresh {food}.",
         "A {adj} {dish} needs good {food} more than any clever trick."],
        {"name": ["Maria", "Tom", "Aisha", "Ken", "Lena", "the chef"],
         "amount": ["a cup", "two spoons", "a handful", "half a litre", "a little"],
         "food": ["butter", "garlic", "tomatoes", "rice", "basil", "onions", "cream"],
         "dish": ["soup", "stew", "sauce", "risotto", "bread dough"],
         "verb": ["simmer", "rest", "cook", "thicken"],
         "verb_past": ["simmered", "rested", "cooled", "risen"],
         "adj": ["heavy", "simple", "hot", "wide", "good"]}),
    "travel": (
        ["The {vehicle} to {city} left at {hour} and arrived {adv} late.",
         "{name} packed a {adj} bag and took the {vehicle} across the {area}.",
         "In {city} we found a {adj} hotel close to the old {building}.",
         "Our guide in {city} showed us the {building} and a {adj} market."],
        {"vehicle": ["train", "bus", "ferry", "night train", "plane"],
         "city": ["Lisbon", "Oslo", "Kyoto", "Lima", "Cairo", "Vienna"],
         "hour": ["six", "nine", "noon", "midnight", "half past four"],
         "adv": ["slightly", "very", "rather", "barely"],
         "name": ["Maria", "Tom", "Aisha", "Ken", "my sister"],
         "adj": ["small", "cheap", "busy", "lovely", "noisy"],
         "area": ["border", "mountains", "bay", "plains"],
         "building": ["cathedral", "station", "castle", "library", "bridge"]}),
}


@dataclass(frozen=True)
class TextModels:
    folders: dict[int, Path]  # step -> checkpoint folder (model and tokenizer)
    text_file: Path  # corpus.txt: documents separated by blank lines
    jsonl_file: Path  # corpus.jsonl: the same documents, {"text": ..., "split": topic}
    splits: tuple[str, ...]  # the topics, the splits of corpus.jsonl
    n_ctx: int  # the models' context (n_positions)


def documents(n_documents: int = 240, seed: int = 0) -> list[tuple[str, str]]:
    """(topic, text) documents of 3 to 6 sentences each, the topics in turn."""
    rng = random.Random(seed)
    out = []
    for i in range(n_documents):
        topic = list(TOPICS)[i % len(TOPICS)]
        templates, words = TOPICS[topic]
        sentences = []
        for _ in range(rng.randint(3, 6)):
            template = rng.choice(templates)
            sentences.append(template.format(**{k: rng.choice(v) for k, v in words.items()}))
        out.append((topic, " ".join(sentences)))
    return out


def train_tokenizer(texts: list[str], vocab_size: int = 700):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers tokenizer with an EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)


def build_text_models(root: Path, steps: tuple[int, ...] = STEPS, seed: int = 0) -> TextModels:
    """Corpus files, tokenizer and GPT-2 checkpoints under `root` (see the module docstring)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    root.mkdir(parents=True, exist_ok=True)
    docs = documents(seed=seed)
    text_file = root / "corpus.txt"
    text_file.write_text("\n\n".join(text for _, text in docs) + "\n", encoding="utf-8")
    jsonl_file = root / "corpus.jsonl"
    jsonl_file.write_text("".join(json.dumps({"text": text, "split": topic}) + "\n"
                                  for topic, text in docs), encoding="utf-8")

    tokenizer = train_tokenizer([text for _, text in docs])
    ids = []
    for _, text in docs:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    n_sequences = len(ids) // SEQ_LEN
    packed = torch.tensor(ids[:n_sequences * SEQ_LEN]).reshape(n_sequences, SEQ_LEN)

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=2 * SEQ_LEN, n_embd=32,
                        n_layer=2, n_head=2, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    # One thread: a model this small gains nothing from more, and on a busy machine extra
    # threads waiting on each other made training many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folders = _train(model, tokenizer, packed, steps, seed, root)
    finally:
        torch.set_num_threads(threads)
    return TextModels(folders, text_file, jsonl_file, tuple(TOPICS), config.n_positions)


def _train(model, tokenizer, packed, steps: tuple[int, ...], seed: int,
           root: Path) -> dict[int, Path]:
    """Train on random batches of the packed text, saving a folder at each of `steps`."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    folders = {}
    for step in range(max(steps) + 1):
        if step in steps:
            folder = root / f"step_{step:04d}"
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            folders[step] = folder
        if step == max(steps):
            break
        batch = packed[torch.randint(len(packed), (16,), generator=generator)]
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return folders
