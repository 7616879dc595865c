"""jmoe.hf_tokenizer: a checkpoint's tokenizer.json, special tokens, stop ids and chat template;
streaming its tokens back to text; the small-vocabulary tokenizer of the servable OLMoE fixture
(tests/fixtures/hf/olmoe_servable, which notebooks/huggingface.ipynb imports)."""

import json

import pytest
import tokenizers
from hf_fixtures import CHATML, FIXTURES, SENTENCES, small_vocab_bpe, write_hf_tokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from jmoe.hf_tokenizer import PretrainedTokenizer, load_chat_template, load_hf_tokenizer
from jmoe.serve.chat import render_chat, template_tokens
from jmoe.serve.text import REPLACEMENT, TextStream
from jmoe.train.errors import MissingInputError, UserError
from jmoe.train.tokenizer import load_tokenizer


@pytest.fixture
def hf_dir(tmp_path):
    write_hf_tokenizer(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_special_tokens_stop_ids_and_template(hf_dir):
    tok = load_hf_tokenizer(hf_dir)
    raw = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert tok.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.eos_ids == (1, raw.token_to_id("<|im_end|>"))  # eos first, then the config's
    assert tok.chat_template == CHATML
    assert tok.vocab_size == raw.get_vocab_size()
    text = SENTENCES[0]
    assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
    assert tok.encode_prompt(text) == [tok.bos_id, *tok.encode(text)]  # the post-processor's BOS
    assert tok.decode([tok.bos_id, *tok.encode(text), tok.eos_id]) == text


def test_load_tokenizer_of_a_checkpoint_directory_keeps_its_special_tokens(hf_dir):
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, PretrainedTokenizer) and tok.eos_ids == load_hf_tokenizer(hf_dir).eos_ids


def test_save_then_load_is_the_same_tokenizer(hf_dir, tmp_path):
    tok = load_hf_tokenizer(hf_dir)
    tok.save(tmp_path / "copy")
    back = load_hf_tokenizer(tmp_path / "copy")
    assert back.special_tokens == tok.special_tokens and back.eos_ids == tok.eos_ids
    assert back.chat_template == tok.chat_template
    assert back.encode_prompt(SENTENCES[3]) == tok.encode_prompt(SENTENCES[3])


def test_fallbacks_special_tokens_map_then_generation_config(tmp_path):
    raw = write_hf_tokenizer(tmp_path, chat_template=None)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>"}))
    im_end = raw.token_to_id("<|im_end|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": im_end}))
    tok = load_hf_tokenizer(tmp_path)
    assert tok.special_tokens == {"bos_token": "<s>", "eos_token": "<|im_end|>"}
    assert tok.eos_ids == (im_end,) and tok.chat_template is None
    (tmp_path / "generation_config.json").unlink()
    assert load_hf_tokenizer(tmp_path).eos_id == raw.token_to_id("</s>")  # a usual eos name


def test_chat_template_file_wins_and_named_templates(tmp_path):
    write_hf_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config["chat_template"] = named
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}J")
    assert load_hf_tokenizer(tmp_path).chat_template == "{{ bos_token }}J"


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: (d / "tokenizer.json").unlink(), "holds no tokenizer.json"),
        (lambda d: (d / "tokenizer.json").write_text("{"), "not a valid tokenizer.json"),
        (lambda d: (d / "tokenizer_config.json").write_text("[1"), "not valid JSON"),
        (lambda d: (d / "tokenizer_config.json").write_text("[1]"), "must hold a JSON object"),
        (
            lambda d: (d / "tokenizer_config.json").write_text('{"eos_token": "<nope>"}'),
            "eos_token='<nope>' is not in the vocabulary",
        ),
        (
            lambda d: (d / "generation_config.json").write_text('{"eos_token_id": [1, 99999]}'),
            "eos_token_id 99999 is outside the vocabulary",
        ),
        (
            lambda d: (d / "generation_config.json").write_text('{"eos_token_id": "x"}'),
            "must be an integer or a list",
        ),
    ],
)
def test_broken_directories_name_the_file_and_field(hf_dir, edit, match):
    edit(hf_dir)
    with pytest.raises(UserError, match=match):
        load_hf_tokenizer(hf_dir)


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(MissingInputError, match="does not exist"):
        load_hf_tokenizer(tmp_path / "nope")


def test_no_end_of_text_token_anywhere(tmp_path):
    tokenizer = tokenizers.Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="names no end-of-text token"):
        load_hf_tokenizer(tmp_path)


def test_chat_prompt_renders_with_the_checkpoint_tokens(hf_dir):
    tok = load_hf_tokenizer(hf_dir)
    messages = [{"role": "user", "content": "Hi"}]
    prompt = render_chat(tok.chat_template, messages, **template_tokens(tok))
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt)  # the special tokens written by the template are single ids
    assert ids[0] == tok.tokenizer.token_to_id("<|im_start|>") and tok.eos_ids[1] in ids


def _stream(tok, prompt_ids, ids):
    stream = TextStream(tok, prompt_ids=prompt_ids)
    pieces = [stream.push(i)[0] for i in ids]
    return pieces + [stream.finish()]


def test_streaming_never_splits_a_utf8_character(hf_dir):
    tok = load_hf_tokenizer(hf_dir)
    text = "Köln 東京は晴れ 🙂🙂 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # some tokens hold part of a character
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)
    for prompt in ([], tok.encode("Grüße")):
        pieces = _stream(tok, prompt, ids)
        assert "".join(pieces) == text and not any(REPLACEMENT in p for p in pieces)


def test_streaming_keeps_the_first_word_space_of_sentencepiece_style_decoders():
    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"])
    tokenizer.train_from_iterator(SENTENCES, trainer)
    tok = PretrainedTokenizer(tokenizer, {"eos_token": "</s>"})
    prompt, completion = tok.encode("The quick"), tok.encode("The quick brown fox")
    generated = completion[len(prompt) :]
    assert tok.decode(generated) == "brown fox"  # alone, the word-start space is lost
    assert "".join(_stream(tok, prompt, generated)) == " brown fox"
    assert "".join(_stream(tok, [], generated)) == "brown fox"  # no prompt: nothing to follow


def test_small_vocab_bpe_fits_its_budget_and_round_trips():
    text = "The quick brown fox"
    for vocab_size in (96, 32):
        tok = small_vocab_bpe(SENTENCES * 4, vocab_size=vocab_size)
        assert tok.get_vocab_size() <= vocab_size
        assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
        ids = tok.encode(text).ids
        assert ids[0] == 1  # a leading <s>
        if vocab_size == 96:  # every character kept: the text comes back
            assert tok.decode(ids) == text and 0 not in ids
        else:  # the rarest characters left out of the alphabet become <unk>
            assert 0 in ids


def test_the_servable_olmoe_fixture_is_the_olmoe_weights_with_a_fitting_tokenizer():
    servable, olmoe = FIXTURES / "olmoe_servable", FIXTURES / "olmoe"
    for name in ("model.safetensors", "reference.npz"):
        assert (servable / name).resolve() == (olmoe / name).resolve()
    tok = load_hf_tokenizer(servable)
    vocab = json.loads((servable / "config.json").read_text())["vocab_size"]
    assert tok.vocab_size <= vocab and max(tok.eos_ids) < vocab
    text = "def main(x):\n    return x + 1\n"
    assert tok.decode(tok.encode_prompt(text)) == text
