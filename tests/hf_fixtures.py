"""Tiny Hugging Face checkpoint directories: tokenizers built with the `tokenizers` library,
and the committed model fixtures made servable.

`write_hf_tokenizer(directory)` writes what a chat checkpoint ships: `tokenizer.json` (a
byte-level BPE trained on a few sentences, whose post-processor adds a leading `<s>`),
`tokenizer_config.json` (special tokens, a ChatML chat template) and `generation_config.json`
(two end ids: `</s>` and `<|im_end|>`). `write_hf_checkpoint(directory)` adds a tiny Mixtral's
config.json and safetensors (from tests/fixtures/hf) with a vocabulary that fits the tokenizer.
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
