"""A GGUF's SentencePiece tokenizer ("llama": Llama 1/2, Mistral, Gemma), written by save_gguf_tokenizer and
read by mlx-lm's loader, encodes as SentencePiece itself does.

Tiny SentencePiece BPE models are trained on a few KB of calibration text, shaped like Llama's (a dummy
prefix) and Gemma's (none; whitespace runs, newlines and chat markers as user-defined pieces), and turned
into the GGUF tokenizer metadata as llama.cpp's convert_hf_to_gguf.py does (pieces, scores, token types;
the tokens tokenizer_config.json lists as added: control if special, else user-defined with "▁" as " ").
The reference for text holding special tokens is llama.cpp's: each stretch between them is encoded on its
own by SentencePiece.
"""

import io
import re

import pytest
import sentencepiece as spm
from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer, load as load_tokenizer

from mlx_flash.gguf import save_gguf_tokenizer
from mlx_flash.flash.sparsity import CALIBRATION_TEXT

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
CHAT = ["<start_of_turn>", "<end_of_turn>"]
SPACES = ["\u2581" * n for n in range(2, 5)]  # Gemma has "▁▁".."▁"*31
NEWLINES = ["\n", "\n\n"]

TEXTS = [
    "Hello world",
    "It is a truth universally acknowledged, that a single man",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "two  spaces, five     and six      ",
    "line one\nline two\n\nafter a blank line\n",
    "\n starts with a newline",
    "digits 0123456789 and 3.14159, 2024-12-31",
    "unicode: café, naïve, Ελληνικά, 日本語, emoji 🙂🚀 and ✓",
    "tabs\tand\u00a0no-break space",
    "Mr. Bennet's \"dear\" (Elizabeth) — said she; isn't it?",
    "",
    " ",
]


def train(add_dummy_prefix: bool, user_defined: list) -> spm.SentencePieceProcessor:
    text = CALIBRATION_TEXT.read_text(encoding="utf-8")[:12000]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in text.splitlines() if line.strip()]), model_writer=model,
        model_type="bpe", vocab_size=600, byte_fallback=True, split_digits=True, character_coverage=1.0,
        add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, user_defined_symbols=user_defined, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def gguf_tokenizer(sp, add_space_prefix, arch, special=(), added=()) -> dict:
    """What convert_hf_to_gguf.py's _create_vocab_sentencepiece writes, as load_gguf returns it."""
    types = []
    for i in range(sp.get_piece_size()):
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else UNUSED if sp.is_unused(i)
                     else BYTE if sp.is_byte(i) else NORMAL)
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    for t in special:  # in added_tokens_decoder with "special": true
        types[sp.piece_to_id(t)] = CONTROL
    for t in added:  # in added_tokens_decoder, not special: llama.cpp writes "▁" as " "
        i = sp.piece_to_id(t)
        tokens[i], types[i] = t.replace("\u2581", " "), USER_DEFINED
    return {
        "tokens": tokens, "merges": [], "model": "llama", "pre": "default", "token_type": types,
        "scores": [sp.get_score(i) for i in range(sp.get_piece_size())],
        "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": None, "add_bos": True,
        "add_space_prefix": add_space_prefix, "chat_template": None, "arch": arch,
    }


def reference(sp, text: str, specials: dict) -> list:
    """llama.cpp's SentencePiece tokenization: special tokens matched whole, each stretch between encoded alone."""
    ids = []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text) if specials else [text]:
        ids += [specials[part]] if part in specials else sp.encode(part) if part else []
    return ids


@pytest.fixture(scope="module", params=["llama", "gemma"])
def case(request, tmp_path_factory):
    if request.param == "llama":  # Llama 1/2, Mistral: "▁" before the text; </s> etc. as control tokens
        sp = train(True, [])
        tok = gguf_tokenizer(sp, None, "llama")  # llama.cpp's Llama files do not state add_space_prefix
    else:  # Gemma: no dummy prefix; chat markers special, whitespace runs and newlines user-defined
        sp = train(False, CHAT + SPACES + NEWLINES)
        tok = gguf_tokenizer(sp, False, "gemma3", special=CHAT, added=SPACES + NEWLINES)
    folder = tmp_path_factory.mktemp(request.param)
    save_gguf_tokenizer(tok, folder)
    return request.param, sp, load_tokenizer(folder)


def test_encode_matches_sentencepiece(case):
    _, sp, tokenizer = case
    for text in TEXTS:
        assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text), repr(text)
        assert tokenizer.encode(text) == [sp.bos_id()] + sp.encode(text), repr(text)


def test_bytes_fall_back(case):
    _, sp, tokenizer = case
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert ids == sp.encode("🙂")
    assert [sp.id_to_piece(i) for i in ids][-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]


def test_special_tokens_in_text(case):
    name, sp, tokenizer = case
    specials = {"<s>": sp.bos_id(), "</s>": sp.eos_id(), "<unk>": sp.unk_id()}
    if name == "gemma":
        specials.update({t: sp.piece_to_id(t) for t in CHAT})
    texts = ["<s>Hello</s>", "Hi</s> there <s>  again", "a<unk>b",
             "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"]
    for text in texts:
        assert tokenizer.encode(text, add_special_tokens=False) == reference(sp, text, specials), repr(text)
    if name == "gemma":  # SentencePiece matches user-defined pieces itself: the whole string, at once
        text = texts[-1]
        assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text)


def test_decode_round_trips(case):
    name, sp, tokenizer = case
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text == sp.decode(ids[1:]), repr(text)
        if name == "llama" and text.startswith(" "):
            continue  # mlx-lm's streaming detokenizer trims the dummy prefix from every flush while its text is empty
        detok = tokenizer.detokenizer
        detok.reset()
        for i in ids[1:]:
            detok.add_token(i)
        detok.finalize()
        assert detok.text == text, repr(text)


def test_tokenizer_config(case):
    name, sp, tokenizer = case
    assert isinstance(tokenizer.detokenizer, SPMStreamingDetokenizer)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert tokenizer.eos_token_ids == {sp.eos_id()}
