"""Tiny Hugging Face checkpoint directories: tokenizers built with the `tokenizers` library,
and the committed model fixtures made servable.

`write_hf_tokenizer(directory)` writes what a chat checkpoint ships: `tokenizer.json` (a
byte-level BPE trained on a few sentences, whose post-processor adds a leading `<s>`),
`tokenizer_config.json` (special tokens, a ChatML chat template) and `generation_config.json`
(two end ids: `</s>` and `<|im_end|>`). `write_hf_checkpoint(directory)` adds a tiny Mixtral's
config.json and safetensors (from tests/fixtures/hf) with a vocabulary that fits the tokenizer.

`python tests/hf_fixtures.py` rewrites `tests/fixtures/hf/olmoe_servable`
(`write_servable_fixture`): the OLMoE fixture's weights and reference logits (linked, not copied)
with a tokenizer small enough for its 96-symbol vocabulary, the checkpoint that
notebooks/huggingface.ipynb imports at the test size.
"""

from __future__ import annotations

import json
import pathlib

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts models route each token to a few experts.",
    "def add(x, y):\n    return x + y\n",
    "Grüße aus Köln! 東京は晴れ。 🙂",
]
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_level_bpe(vocab_size: int = 300) -> tokenizers.Tokenizer:
    """A byte-level BPE with `SPECIALS` (ids 0..4) whose post-processor prepends `<s>`."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return tokenizer


def write_hf_tokenizer(
    directory: pathlib.Path, chat_template: str | None = CHATML, vocab_size: int = 300
) -> tokenizers.Tokenizer:
    """Writes the tokenizer files of a chat checkpoint into `directory`; returns the tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_level_bpe(vocab_size)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<s>", "lstrip": False, "special": True},  # AddedToken form
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": 64,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    end_ids = [tokenizer.token_to_id("</s>"), tokenizer.token_to_id("<|im_end|>")]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": end_ids}))
    return tokenizer


FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def write_hf_checkpoint(
    directory: pathlib.Path,
    vocab_size: int = 300,
    chat_template: str | None = CHATML,
    family: str = "mixtral",
    seed: int = 0,
) -> pathlib.Path:
    """A servable checkpoint: the committed tiny `family` fixture with its vocabulary grown to
    `vocab_size` rows (new rows random) and the tokenizer files of `write_hf_tokenizer`."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    source = FIXTURES / family
    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    old_vocab, config["vocab_size"] = config["vocab_size"], vocab_size
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(source / "model.safetensors")
    rng = np.random.default_rng(seed)
    for name in VOCAB_TENSORS:
        rows = tensors[name]
        extra = rng.normal(0, rows.std(), (vocab_size - old_vocab, rows.shape[1]))
        tensors[name] = np.concatenate([rows, extra.astype(rows.dtype)])
    save_file(tensors, directory / "model.safetensors")
    write_hf_tokenizer(directory, chat_template=chat_template, vocab_size=vocab_size)
    return directory


SMALL_VOCAB_SPECIALS = ["<unk>", "<s>", "</s>"]


def small_vocab_bpe(texts: list[str], vocab_size: int) -> tokenizers.Tokenizer:
    """A BPE of at most `vocab_size` symbols for a tiny model's vocabulary: `<unk>`, `<s>`,
    `</s>` (ids 0..2), the most frequent characters of `texts` (others become `<unk>`) and
    merges; spaces are kept as `▁` (Metaspace) and a prompt gets a leading `<s>`."""
    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SMALL_VOCAB_SPECIALS,
        limit_alphabet=vocab_size - len(SMALL_VOCAB_SPECIALS) - 16,  # room for 16+ merges
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return tokenizer


def write_servable_fixture(directory: pathlib.Path, family: str = "olmoe") -> pathlib.Path:
    """The committed `family` fixture made servable without touching its weights: links to its
    `model.safetensors` and `reference.npz`, its config with the end ids of a `small_vocab_bpe`
    (trained on the first 300 kB of the Python standard library) that fits its vocabulary."""
    from jmoe.train.data import read_corpus

    source = FIXTURES / family
    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    tokenizer = small_vocab_bpe(
        read_corpus("stdlib", max_bytes=300_000).documents, config["vocab_size"]
    )
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    config.update(bos_token_id=bos, eos_token_id=eos, pad_token_id=None)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("model.safetensors", "reference.npz"):
        link = directory / name
        link.unlink(missing_ok=True)
        link.symlink_to(pathlib.Path("..") / family / name)
    tokenizer.save(str(directory / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(special, indent=2) + "\n")
    generation = {"bos_token_id": bos, "eos_token_id": eos}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return directory


if __name__ == "__main__":  # rewrites the servable fixture the Hugging Face notebook imports
    print(write_servable_fixture(FIXTURES / "olmoe_servable"))
