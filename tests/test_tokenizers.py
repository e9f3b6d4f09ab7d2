"""Tokenizers of both text encoders: framing, truncation, padding, files, and Chinese / English / mixed text."""
from __future__ import annotations

import json

import numpy as np
import pytest

from diffusion.tokenizers import (
    CLIP_UNK, EOT, SOT, CLIPBPETokenizer, WordPieceTokenizer, build_clip_bpe_vocab, build_wordpiece_vocab,
    load_tokenizer,
)
from schemas.errors import UserError

BILINGUAL = [
    "一只可爱的猫坐在窗台上",
    "A photo of a cat sitting on a windowsill",
    "一只 cat 在花园 garden 里玩耍!",
    "Hello, World! 你好，世界。",
    "a red car on the street, 街道上的红色汽车",
    "Café au lait",
] * 3


# ---------------------------------------------------------------- WordPiece (text encoder 1)

# Laid out like Chinese BERT's vocab.txt: [PAD] at 0, unused slots, specials, then characters and pieces.
WP_VOCAB = ["[PAD]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "!", ",", "。", "一", "只", "猫", "在",
            "花", "园", "the", "cat", "play", "##ing", "a", "photo", "of", "cafe"]
WP = {t: i for i, t in enumerate(WP_VOCAB)}


@pytest.fixture()
def wordpiece(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(WP_VOCAB) + "\n", encoding="utf-8")
    return WordPieceTokenizer.from_dir(tmp_path)


def _wp(*tokens):
    ids = [WP["[CLS]"], *(WP[t] for t in tokens), WP["[SEP]"]]
    return ids + [0] * (77 - len(ids))


def test_wordpiece_chinese_english_mixed(wordpiece):
    ids = wordpiece(["一只猫", "The CAT playing!", "一只cat在花园playing。", "Café", "龍 dog"])
    assert ids.dtype == np.int32 and ids.shape == (5, 77)
    assert ids[0].tolist() == _wp("一", "只", "猫")
    assert ids[1].tolist() == _wp("the", "cat", "play", "##ing", "!")
    # Every CJK character is its own word, so "只cat在" splits into 只 / cat / 在.
    assert ids[2].tolist() == _wp("一", "只", "cat", "在", "花", "园", "play", "##ing", "。")
    assert ids[3].tolist() == _wp("cafe")  # lower-cased, accent stripped
    assert ids[4].tolist() == _wp("[UNK]", "[UNK]")
    assert wordpiece.vocab_size == len(WP_VOCAB)
    assert wordpiece.decode(ids[1]) == "the cat playing!"


def test_wordpiece_truncation_and_padding(wordpiece):
    ids = wordpiece(["猫" * 100, "猫" * 75, "猫" * 74, ""])
    cat = WP["猫"]
    # Longer than 77: the first 76 ids ([CLS] + 75 tokens), then [SEP].
    assert ids[0].tolist() == [WP["[CLS]"]] + [cat] * 75 + [WP["[SEP]"]]
    assert ids[1].tolist() == ids[0].tolist()
    assert ids[2].tolist() == [WP["[CLS]"]] + [cat] * 74 + [WP["[SEP]"], 0]
    assert ids[3].tolist() == [WP["[CLS]"], WP["[SEP]"]] + [0] * 75


def test_wordpiece_save_round_trip(wordpiece, tmp_path):
    wordpiece.save(tmp_path / "copy")
    again = load_tokenizer("wordpiece", tmp_path / "copy")
    assert isinstance(again, WordPieceTokenizer)
    assert (tmp_path / "copy" / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1] == WP_VOCAB
    texts = ["一只cat在花园playing。", "the photo of a cat"]
    assert np.array_equal(again(texts), wordpiece(texts))


def test_build_wordpiece_vocab(tmp_path):
    tok = build_wordpiece_vocab(BILINGUAL, tmp_path, max_size=300)
    assert tok.vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.vocab_size <= 300
    ids = tok(BILINGUAL[:6])
    # The training texts need no unknown token; Chinese characters come out one per id.
    assert not (ids == tok.unk_id).any()
    assert tok.tokens("一只可爱的猫") == ["一", "只", "可", "爱", "的", "猫"]
    assert tok.decode(ids[3]) == "hello, world! 你 好 ， 世 界 。"
    assert np.array_equal(WordPieceTokenizer.from_dir(tmp_path)(BILINGUAL), tok(BILINGUAL))
    with pytest.raises(ValueError, match="max_size"):
        build_wordpiece_vocab(BILINGUAL, tmp_path / "small", max_size=20)


def test_wordpiece_file_errors(tmp_path):
    with pytest.raises(UserError, match=r"vocab\.txt is missing"):
        WordPieceTokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.txt").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=r"vocab\.txt is empty"):
        WordPieceTokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"vocab\.txt.*\[CLS\]"):
        WordPieceTokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match=r"vocab\.txt is not UTF-8"):
        WordPieceTokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------- CLIP BPE (text encoder 2)


def _gpt2_byte_chars() -> list[str]:
    """The byte-level alphabet as the CLIP/GPT-2 format defines it, indexed by byte value."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


REAL_MERGES = [("h", "e"), ("l", "o</w>"), ("he", "l"), ("hel", "lo</w>"), ("c", "a"), ("ca", "t</w>")]


@pytest.fixture()
def clip_dir(tmp_path):
    """A small vocab.json / merges.txt in the exact layout of a real CLIP tokenizer directory."""
    chars = sorted(_gpt2_byte_chars(), key=ord)  # vocab.json order: printable bytes, then the shifted ones
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in REAL_MERGES] + [SOT, EOT]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in REAL_MERGES)
    (tmp_path / "merges.txt").write_text(merges, encoding="utf-8")
    return tmp_path, {t: i for i, t in enumerate(tokens)}


def test_clip_bpe_real_format(clip_dir):
    path, vocab = clip_dir
    tok = load_tokenizer("clip_bpe", path)
    assert isinstance(tok, CLIPBPETokenizer)
    assert (tok.start_id, tok.end_id, tok.vocab_size) == (len(vocab) - 2, len(vocab) - 1, len(vocab))
    byte = _gpt2_byte_chars()
    ids = tok(["Hello", "a   CAT!!\n", "猫", "&amp;amp;", "it's"])
    assert ids.shape == (5, 77) and ids.dtype == np.int32

    def row(*tokens):
        out = [vocab[SOT], *(vocab[t] for t in tokens), vocab[EOT]]
        return out + [0] * (77 - len(out))

    assert ids[0].tolist() == row("hello</w>")
    # Whitespace collapsed, lower-cased; punctuation is its own word with no merges here.
    assert ids[1].tolist() == row("a</w>", "cat</w>", "!", "!</w>")
    # Chinese goes through the byte alphabet: 猫 = e7 8c ab, the last byte marked as the word end.
    assert ids[2].tolist() == row(byte[0xE7], byte[0x8C], byte[0xAB] + "</w>")
    assert ids[3].tolist() == row("&</w>")  # HTML unescaped twice, as CLIP does
    assert ids[4].tolist() == row("i", "t</w>", "'", "s</w>")
    assert tok.decode(ids[2]) == "猫"
    assert tok.decode(ids[1]) == "a cat !!"


def test_clip_bpe_truncation_keeps_eot_last(clip_dir):
    path, vocab = clip_dir
    tok = CLIPBPETokenizer.from_dir(path)
    ids = tok(["hello " * 100, "hello " * 75, "hello " * 74, ""])
    hello = vocab["hello</w>"]
    assert ids[0].tolist() == [vocab[SOT]] + [hello] * 75 + [vocab[EOT]]
    assert ids[1].tolist() == ids[0].tolist()
    assert ids[2].tolist() == [vocab[SOT]] + [hello] * 74 + [vocab[EOT], 0]
    assert ids[3].tolist() == [vocab[SOT], vocab[EOT]] + [0] * 75
    # Text encoder 2 pools at the highest id: always the EOT.
    assert ids.argmax(axis=1).tolist() == [76, 76, 75, 1]
    # A literal "<|endoftext|>" in a prompt is text, not a second EOT.
    injected = tok(["hello <|endoftext|> cat"])[0]
    assert (injected == vocab[EOT]).sum() == 1


def test_clip_bpe_save_round_trip(clip_dir, tmp_path):
    path, _ = clip_dir
    tok = CLIPBPETokenizer.from_dir(path)
    tok.save(tmp_path / "copy")
    again = CLIPBPETokenizer.from_dir(tmp_path / "copy")
    assert again.vocab == tok.vocab and again.merges == tok.merges
    assert (tmp_path / "copy" / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\nh e\n")
    texts = ["Hello cat", "一只猫 hello"]
    assert np.array_equal(again(texts), tok(texts))


def test_clip_bpe_file_errors(clip_dir):
    path, vocab = clip_dir
    good_vocab = (path / "vocab.json").read_text(encoding="utf-8")
    (path / "merges.txt").rename(path / "merges.bak")
    with pytest.raises(UserError, match=r"merges\.txt is missing"):
        CLIPBPETokenizer.from_dir(path)
    (path / "merges.bak").rename(path / "merges.txt")
    (path / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match=r"vocab\.json is not valid JSON"):
        CLIPBPETokenizer.from_dir(path)
    (path / "vocab.json").write_text('["a", "b"]', encoding="utf-8")
    with pytest.raises(UserError, match=r"vocab\.json must be a JSON object"):
        CLIPBPETokenizer.from_dir(path)
    swapped = dict(vocab)
    swapped[SOT], swapped[EOT] = vocab[EOT], vocab[SOT]
    (path / "vocab.json").write_text(json.dumps(swapped), encoding="utf-8")
    with pytest.raises(UserError, match=r"vocab\.json.*must have the highest id"):
        CLIPBPETokenizer.from_dir(path)
    (path / "vocab.json").write_text(good_vocab, encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\nh e\nzz q\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"merges\.txt, line 3: 'zz' is not in vocab\.json"):
        CLIPBPETokenizer.from_dir(path)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer("sentencepiece", path)


def test_build_clip_bpe_vocab_full_alphabet(tmp_path):
    tok = build_clip_bpe_vocab(BILINGUAL, tmp_path, vocab_size=700)
    assert tok.vocab_size <= 700
    assert tok.end_id == tok.vocab_size - 1 and tok.start_id == tok.vocab_size - 2
    assert CLIP_UNK not in tok.vocab
    # The whole byte alphabet is there, so unseen text (Korean, a rare character, emoji) encodes and decodes exactly.
    for text in ["一只可爱的猫坐在窗台上", "a photo of a cat", "一只 cat 在花园 garden", "안녕 龍 🐈"]:
        ids = tok([text])[0]
        assert ids.max() == tok.end_id and ids[0] == tok.start_id
        assert tok.decode(ids) == text
    # Merges learnt from the training texts shorten them well below one id per byte.
    sentence = "一只可爱的猫坐在窗台上"
    assert len(tok.tokens(sentence)) < len(sentence.encode("utf-8")) // 2
    assert "cat</w>" in tok.tokens("a cat")
    again = load_tokenizer("clip_bpe", tmp_path)
    assert np.array_equal(again(BILINGUAL), tok(BILINGUAL))


def test_build_clip_bpe_vocab_small(tmp_path):
    tok = build_clip_bpe_vocab(BILINGUAL, tmp_path, vocab_size=200)
    assert tok.vocab_size <= 200
    assert tok.end_id == tok.vocab_size - 1
    assert tok.vocab[CLIP_UNK] == tok.vocab_size - 3
    for text in BILINGUAL[:6]:
        assert tok.vocab[CLIP_UNK] not in tok([text])[0]
    for text in ("一只可爱的猫坐在窗台上", "A photo of a cat sitting on a windowsill", "Café au lait"):
        assert tok.decode(tok([text])[0]) == text.lower()
    # Seen bytes in new positions (the training sentence reversed) need no unknown token.
    reversed_ids = tok(["上台窗在坐猫的爱可只一 llewodniw"])[0]
    assert tok.vocab[CLIP_UNK] not in reversed_ids
    assert tok.decode(reversed_ids) == "上台窗在坐猫的爱可只一 llewodniw"
    # A byte never seen in training maps to <|unk|>, never to the EOT.
    ids = tok(["🐈"])[0]
    assert tok.vocab[CLIP_UNK] in ids and (ids == tok.end_id).sum() == 1
    with pytest.raises(ValueError, match="too small"):
        build_clip_bpe_vocab(BILINGUAL, tmp_path / "tiny", vocab_size=20)


def test_call_needs_a_list(clip_dir):
    tok = CLIPBPETokenizer.from_dir(clip_dir[0])
    with pytest.raises(TypeError):
        tok("hello")
    assert tok([]).shape == (0, 77)
