"""Tokenizers of PanGu-Draw's two text encoders, built on the `tokenizers` library.

- `WordPieceTokenizer` (text encoder 1): Chinese BERT WordPiece from `vocab.txt` (one token per line, id = line
  number). Lower-cased, accents stripped, a space around every CJK character, punctuation split;
  `[CLS] tokens [SEP]`, cut to 76 ids + `[SEP]` when longer than 77, padded with 0.
- `CLIPBPETokenizer` (text encoder 2): CLIP's byte-level BPE from `vocab.json` + `merges.txt` (the Hugging Face
  files of a real CLIP model work as they are). HTML-unescaped, whitespace collapsed, lower-cased, split with CLIP's
  pattern, `</w>` marking word ends; `<|startoftext|> tokens <|endoftext|>`, truncated keeping `<|endoftext|>` last,
  padded with 0. `<|endoftext|>` must have the highest id: text encoder 2 pools at the row's highest id.

Both return int32 arrays (B, 77). `build_wordpiece_vocab` and `build_clip_bpe_vocab` train small vocabularies in
these formats from texts.
"""
from __future__ import annotations

import html
import json
import logging
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from schemas.errors import UserError

log = logging.getLogger(__name__)

CONTEXT_LENGTH = 77

WORDPIECE_VOCAB_FILE = "vocab.txt"
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
WORDPIECE_SPECIALS = (PAD, UNK, CLS, SEP, MASK)

CLIP_VOCAB_FILE = "vocab.json"
CLIP_MERGES_FILE = "merges.txt"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# Only in vocabularies too small for the whole byte alphabet: a byte never seen in training maps here.
CLIP_UNK = "<|unk|>"
END_OF_WORD = "</w>"
# CLIP's split pattern without its special-token alternatives, so a prompt cannot inject an EOT (which would
# move the pooled position of text encoder 2).
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class _PaddedTokenizer:
    """Shared framing: start id + body + end id, cut to `context_length` keeping the end id, padded with 0."""

    kind: str

    def __init__(self, tokenizer: Tokenizer, start_id: int, end_id: int, vocab_size: int, context_length: int):
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        self._tok = tokenizer
        self.start_id = start_id
        self.end_id = end_id
        self.pad_id = 0
        self.context_length = context_length
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        """Rows the text encoder's token table needs (highest id + 1)."""
        return self._vocab_size

    def _prepare(self, text: str) -> str:
        return text

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids (B, context_length) int32 for a list of texts."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        texts = list(texts)
        out = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int32)
        if not texts:
            return out
        encodings = self._tok.encode_batch([self._prepare(t) for t in texts], add_special_tokens=False)
        body = self.context_length - 2
        for row, enc in enumerate(encodings):
            ids = [self.start_id, *enc.ids[:body], self.end_id]
            out[row, : len(ids)] = ids
        return out

    def tokens(self, text: str) -> list[str]:
        """The text's tokens as strings, without the start and end tokens and without truncation."""
        return self._tok.encode(self._prepare(text), add_special_tokens=False).tokens


# ---------------------------------------------------------------- WordPiece (text encoder 1)


class WordPieceTokenizer(_PaddedTokenizer):
    """Chinese BERT WordPiece, framed as `[CLS] ... [SEP]` and padded to 77 with 0 (text encoder 1)."""

    kind = "wordpiece"

    def __init__(self, vocab: Sequence[str], context_length: int = CONTEXT_LENGTH, *, source: str = "vocabulary"):
        self.vocab = list(vocab)
        # As BERT's own loader does, a repeated line maps the token to its last id.
        ids = {tok: i for i, tok in enumerate(self.vocab) if tok}
        missing = [t for t in (UNK, CLS, SEP) if t not in ids]
        if missing:
            raise UserError(f"{source}: a WordPiece vocabulary needs the tokens {missing}")
        if self.vocab and self.vocab[0] != PAD:
            log.warning("%s: id 0 is %r, not %s; rows are still padded with id 0", source, self.vocab[0], PAD)
        tok = Tokenizer(models.WordPiece(ids, unk_token=UNK, max_input_chars_per_word=100))
        tok.normalizer = _wordpiece_normalizer()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        self._specials = {ids[t] for t in WORDPIECE_SPECIALS if t in ids}
        self.unk_id = ids[UNK]
        super().__init__(tok, ids[CLS], ids[SEP], len(self.vocab), context_length)

    @classmethod
    def from_dir(cls, path: str | Path, context_length: int = CONTEXT_LENGTH) -> "WordPieceTokenizer":
        """Read `vocab.txt` (one token per line; id = line number) from a directory."""
        file = Path(path) / WORDPIECE_VOCAB_FILE
        text = _read_text(file, "a WordPiece tokenizer directory holds vocab.txt")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        vocab = [line.rstrip("\r") for line in lines]
        if not vocab:
            raise UserError(f"{file} is empty: expected one WordPiece token per line")
        return cls(vocab, context_length, source=str(file))

    def save(self, path: str | Path) -> Path:
        """Write `vocab.txt` into a directory (created if needed)."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        (root / WORDPIECE_VOCAB_FILE).write_text("".join(t + "\n" for t in self.vocab), encoding="utf-8")
        return root

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids, without specials and padding (CJK characters come back space-separated)."""
        ids = [int(i) for i in ids]
        if self.end_id in ids:
            ids = ids[: ids.index(self.end_id)]  # the rest is padding
        keep = [i for i in ids if i not in self._specials]
        return self._tok.decode(keep, skip_special_tokens=False)


def _wordpiece_normalizer() -> normalizers.Normalizer:
    # strip_accents=None follows `lowercase`, as BERT's basic tokenizer does.
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)


def build_wordpiece_vocab(texts: Iterable[str], out_dir: str | Path, max_size: int) -> WordPieceTokenizer:
    """Train a WordPiece vocabulary of at most `max_size` tokens (specials first, `[PAD]` = 0) and save it."""
    tok = Tokenizer(models.WordPiece(unk_token=UNK))
    tok.normalizer = _wordpiece_normalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=max_size, special_tokens=list(WORDPIECE_SPECIALS), continuing_subword_prefix="##",
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    if len(vocab) > max_size:
        raise ValueError(
            f"the texts have {len(vocab)} distinct characters and pieces, more than max_size={max_size}"
        )
    result = WordPieceTokenizer(vocab)
    result.save(out_dir)
    log.info("WordPiece vocabulary of %d tokens written to %s", len(vocab), out_dir)
    return result


# ---------------------------------------------------------------- CLIP byte-level BPE (text encoder 2)


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """The 256 printable characters that stand for bytes 0..255 in byte-level BPE, indexed by byte value.

    Printable Latin-1 bytes stand for themselves; the others (control characters, space, 0x7f-0xa0, 0xad) are
    shifted to 256 + n in byte order. This is the alphabet, and the order, of CLIP's first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {}
    shifted = 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return tuple(chars[b] for b in range(256))


def _clip_vocab_order() -> list[str]:
    """CLIP's id order of the byte alphabet: printable bytes first, then the shifted ones (as in vocab.json)."""
    return sorted(byte_alphabet(), key=ord)


def _clip_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([
        normalizers.NFC(),
        normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Strip(),
        normalizers.Lowercase(),
    ])


def _clip_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _clip_clean(text: str) -> str:
    # CLIP unescapes HTML twice before splitting ("&amp;amp;" -> "&").
    return html.unescape(html.unescape(text))


class CLIPBPETokenizer(_PaddedTokenizer):
    """CLIP byte-level BPE, framed as `<|startoftext|> ... <|endoftext|>` and padded to 77 with 0 (text encoder 2)."""

    kind = "clip_bpe"

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
                 context_length: int = CONTEXT_LENGTH, *, source: str = "vocabulary"):
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        _check_clip_vocab(self.vocab, source)
        unk = CLIP_UNK if CLIP_UNK in self.vocab else None
        tok = Tokenizer(models.BPE(
            self.vocab, self.merges, unk_token=unk, end_of_word_suffix=END_OF_WORD, fuse_unk=False,
        ))
        tok.normalizer = _clip_normalizer()
        tok.pre_tokenizer = _clip_pre_tokenizer()
        self._id_to_token = {i: t for t, i in self.vocab.items()}
        self._byte_of = {c: b for b, c in enumerate(byte_alphabet())}
        super().__init__(tok, self.vocab[SOT], self.vocab[EOT], len(self.vocab), context_length)

    def _prepare(self, text: str) -> str:
        return _clip_clean(text)

    @classmethod
    def from_dir(cls, path: str | Path, context_length: int = CONTEXT_LENGTH) -> "CLIPBPETokenizer":
        """Read `vocab.json` ({token: id}) and `merges.txt` (`#version` line, then one "a b" pair per line)."""
        root = Path(path)
        vocab_file, merges_file = root / CLIP_VOCAB_FILE, root / CLIP_MERGES_FILE
        need = "a CLIP BPE tokenizer directory holds vocab.json and merges.txt"
        try:
            vocab = json.loads(_read_text(vocab_file, need))
        except json.JSONDecodeError as exc:
            raise UserError(f"{vocab_file} is not valid JSON: {exc}") from None
        if not isinstance(vocab, dict) or not all(isinstance(k, str) and type(v) is int for k, v in vocab.items()):
            raise UserError(f"{vocab_file} must be a JSON object mapping each token to an integer id")
        merges = _parse_merges(_read_text(merges_file, need), vocab, merges_file)
        return cls(vocab, merges, context_length, source=str(vocab_file))

    def save(self, path: str | Path) -> Path:
        """Write `vocab.json` and `merges.txt` in the Hugging Face CLIP format."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        ordered = dict(sorted(self.vocab.items(), key=lambda kv: kv[1]))
        (root / CLIP_VOCAB_FILE).write_text(json.dumps(ordered, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in self.merges)]
        (root / CLIP_MERGES_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        return root

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids, without SOT, EOT and padding (word ends become spaces)."""
        out = bytearray()
        ids = [int(i) for i in ids]
        if self.end_id in ids:
            # Everything after the EOT is padding, whatever token id 0 happens to be.
            ids = ids[: ids.index(self.end_id)]
        for i in ids:
            if i == self.start_id:
                continue
            token = self._id_to_token[i]
            if token == CLIP_UNK:
                out += "\ufffd".encode()
                continue
            word_end = token.endswith(END_OF_WORD)
            if word_end:
                token = token[: -len(END_OF_WORD)]
            out += bytes(self._byte_of[c] for c in token)
            if word_end:
                out += b" "
        return out.decode("utf-8", errors="replace").strip()


def _check_clip_vocab(vocab: dict[str, int], source: str) -> None:
    for special in (SOT, EOT):
        if special not in vocab:
            raise UserError(f"{source}: the vocabulary has no {special} token")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise UserError(f"{source}: token ids must be unique and cover 0..{len(ids) - 1} without gaps")
    if vocab[EOT] != len(ids) - 1:
        raise UserError(
            f"{source}: {EOT} has id {vocab[EOT]} but must have the highest id {len(ids) - 1} "
            "(text encoder 2 pools at the highest id of each row)"
        )


def _parse_merges(text: str, vocab: dict[str, int], file: Path) -> list[tuple[str, str]]:
    merges = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise UserError(f"{file}, line {number}: expected two tokens separated by one space, got {line!r}")
        a, b = parts
        for piece in (a, b, a + b):
            if piece not in vocab:
                raise UserError(f"{file}, line {number}: {piece!r} is not in {CLIP_VOCAB_FILE}")
        merges.append((a, b))
    return merges


def build_clip_bpe_vocab(texts: Iterable[str], out_dir: str | Path, vocab_size: int) -> CLIPBPETokenizer:
    """Train a CLIP-format byte-level BPE vocabulary of at most `vocab_size` ids and save it.

    With `vocab_size` >= 514 the vocabulary holds the whole byte alphabet twice (plain and with `</w>`), as real
    CLIP does, so any text encodes without unknowns. A smaller one holds only the bytes seen in `texts` (both
    forms) plus `<|unk|>` for the rest. Ids: alphabet, merged tokens in merge order, [`<|unk|>`], SOT, EOT (highest).
    """
    texts = [_clip_clean(t) for t in texts]
    order = _clip_vocab_order()
    full = vocab_size >= 2 * len(order) + 2
    tok = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
    tok.normalizer = _clip_normalizer()
    tok.pre_tokenizer = _clip_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        # Generous: the merge list is cut to the budget below, once the alphabet's true size is known.
        vocab_size=vocab_size + 2 * len(order), special_tokens=[], initial_alphabet=list(order) if full else [],
        end_of_word_suffix=END_OF_WORD, show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    trained_merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    if full:
        base = list(order) + [c + END_OF_WORD for c in order]
        tail = [SOT, EOT]
    else:
        # Each byte seen anywhere gets both forms, so any text made of seen bytes encodes without unknowns.
        merged = {a + b for a, b in trained_merges}
        seen = {t.removesuffix(END_OF_WORD) for t in model["vocab"] if t not in merged}
        chars = [c for c in order if c in seen]
        base = chars + [c + END_OF_WORD for c in chars]
        tail = [CLIP_UNK, SOT, EOT]
    budget = vocab_size - len(base) - len(tail)
    if budget < 0:
        raise ValueError(f"vocab_size={vocab_size} is too small: these texts need at least {len(base) + len(tail)}")
    tokens = list(base)
    known = set(tokens)
    merges = []
    for a, b in trained_merges:
        joined = a + b
        if joined not in known:
            if len(tokens) - len(base) == budget:
                break
            tokens.append(joined)
            known.add(joined)
        merges.append((a, b))
    tokens.extend(tail)
    result = CLIPBPETokenizer({t: i for i, t in enumerate(tokens)}, merges)
    result.save(out_dir)
    log.info("CLIP BPE vocabulary of %d tokens (%d merges) written to %s", len(tokens), len(merges), out_dir)
    return result


# ---------------------------------------------------------------- common


def load_tokenizer(kind: str, path: str | Path, context_length: int = CONTEXT_LENGTH) -> WordPieceTokenizer | CLIPBPETokenizer:
    """The tokenizer of `kind` ("wordpiece" or "clip_bpe", as `TextEncoderConfig.tokenizer`) read from `path`."""
    if kind == "wordpiece":
        return WordPieceTokenizer.from_dir(path, context_length)
    if kind == "clip_bpe":
        return CLIPBPETokenizer.from_dir(path, context_length)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'wordpiece' or 'clip_bpe'")


def _read_text(file: Path, what: str) -> str:
    if not file.is_file():
        raise UserError(f"{file} is missing: {what}")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{file} is not UTF-8 text: {exc}") from None
