"""How text becomes token ids: byte and character vocabularies, their ``dict.txt`` symbols, and the way back."""

import re
from typing import Dict, List, Optional, Tuple

import numpy as np
from fairseq.data import Dictionary

NEWLINE_MODES = ("eos", "drop")
ENCODING_ERRORS = ("strict", "replace")  # what to do with text that is not valid UTF-8
NEWLINE = 0x0A
# fairseq-preprocess pads the vocabulary to a multiple of 8 (tensor cores); so do we.
PADDING_FACTOR = 8
CODE_POINTS = 0x110000
_ESCAPED = re.compile(r"<U\+([0-9A-F]{4,6})>")


def newline_description(newlines: str) -> str:
    if newlines == "eos":
        return "each newline is the end-of-line token </s>, predicted like any other token"
    return (
        "newlines are removed (the convention of Transformer-XL and the Expire-Span paper's enwik8 numbers)"
    )


def char_symbol(char: str) -> str:
    """The ``dict.txt`` symbol of a character: itself, or ``<U+XXXX>`` where it would break the file's format."""
    if char.isspace() or not char.isprintable():
        return f"<U+{ord(char):04X}>"
    return char


def symbol_char(symbol: str) -> Optional[str]:
    """Inverse of :func:`char_symbol`; None for symbols that are not characters (fairseq's special symbols)."""
    if len(symbol) == 1:
        return symbol
    escaped = _ESCAPED.fullmatch(symbol)
    return chr(int(escaped.group(1), 16)) if escaped else None


def _eos_or_drop(newlines: str):
    if newlines not in NEWLINE_MODES:
        raise ValueError(f"newlines must be one of {NEWLINE_MODES}, not {newlines!r}")


class ByteVocabulary:
    """One token per byte, a symbol for every byte value: no input can give ``<unk>``.

    Symbols are in byte order after fairseq's specials, so every byte corpus shares the same ``dict.txt`` symbols.
    """

    unit = "bytes"

    def __init__(self, newlines: str):
        _eos_or_drop(newlines)
        self.newlines = newlines
        self.dictionary = Dictionary()
        for value in range(256):
            if value != NEWLINE:
                self.dictionary.add_symbol(str(value), n=0)
        self.dictionary.pad_to_multiple_(PADDING_FACTOR)
        self.ids = np.array(
            [self.dictionary.eos() if v == NEWLINE else self.dictionary.index(str(v)) for v in range(256)],
            dtype=np.int32,
        )

    def encode(self, data) -> np.ndarray:
        values = np.frombuffer(data, dtype=np.uint8)
        if self.newlines == "drop":
            values = values[values != NEWLINE]
        return self.ids[values]

    def describe(self) -> dict:
        return {
            "unit": self.unit,
            "symbols": "decimal byte value 0-255 (newline excepted)",
            "newlines": self.newlines,
            "newline_handling": newline_description(self.newlines),
        }


def count_characters(text: str, newlines: str) -> Tuple[np.ndarray, np.ndarray]:
    """Code points of ``text`` and how often each occurs (with ``--newlines drop`` the newline is not counted)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    if newlines == "drop":
        codes = codes[codes != NEWLINE]
    return np.unique(codes, return_counts=True)


class CharVocabulary:
    """One token per Unicode character; the vocabulary is the characters of the train split, most frequent first
    (fairseq-preprocess's order). Characters that train never shows become ``<unk>``."""

    unit = "characters"

    def __init__(self, counts: np.ndarray, newlines: str):
        """``counts[c]``: occurrences of code point c in the train split."""
        _eos_or_drop(newlines)
        self.newlines = newlines
        seen = np.flatnonzero(counts)
        seen = seen[seen != NEWLINE]  # the newline is </s> or gone, never a character symbol
        order = seen[np.lexsort((seen, -counts[seen]))]
        self.dictionary = Dictionary()
        for code in order:
            self.dictionary.add_symbol(char_symbol(chr(code)), n=int(counts[code]))
        self.num_characters = len(order)
        self.dictionary.pad_to_multiple_(PADDING_FACTOR)
        self.ids = np.full(CODE_POINTS, self.dictionary.unk(), dtype=np.int32)
        self.ids[order] = np.arange(self.dictionary.nspecial, self.dictionary.nspecial + len(order))
        self.ids[NEWLINE] = self.dictionary.eos()

    def encode(self, text: str) -> Tuple[np.ndarray, Dict[int, int]]:
        """Token ids of ``text``, and the characters that became ``<unk>`` with their counts."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        if self.newlines == "drop":
            codes = codes[codes != NEWLINE]
        ids = self.ids[codes]
        unknown = codes[ids == self.dictionary.unk()]
        return ids, dict(zip(*(part.tolist() for part in np.unique(unknown, return_counts=True))))

    def describe(self) -> dict:
        return {
            "unit": self.unit,
            "symbols": "the character itself, <U+XXXX> for whitespace and unprintable characters",
            "characters": self.num_characters,
            "newlines": self.newlines,
            "newline_handling": newline_description(self.newlines),
        }


def unknown_report(unknown: Dict[int, int], limit: int = 50) -> Dict[str, int]:
    """The most frequent unknown characters, readable in JSON: ``{"U+00E9 é": count}``."""
    top = sorted(unknown.items(), key=lambda item: (-item[1], item[0]))[:limit]
    return {f"U+{code:04X} {char_symbol(chr(code))}": count for code, count in top}


def symbol_bytes(dictionary: Dictionary, unit: str) -> List[Optional[bytes]]:
    """What each token id stands for in the source text (None for pad, bos, unk and padding symbols)."""
    table: List[Optional[bytes]] = []
    for index, symbol in enumerate(dictionary.symbols):
        if index == dictionary.eos():
            table.append(b"\n")
        elif index < dictionary.nspecial or symbol.startswith("madeupword"):
            table.append(None)
        elif unit == "bytes":
            table.append(bytes([int(symbol)]))
        elif unit == "characters":
            table.append(symbol_char(symbol).encode("utf-8"))
        else:
            raise ValueError(f"cannot map {unit} tokens back to text")
    return table


def decode(
    ids, dictionary: Dictionary, unit: str, unknown: bytes = "\N{REPLACEMENT CHARACTER}".encode()
) -> bytes:
    """Token ids back to the text they came from (``<unk>`` as ``unknown``): the inverse of the encoding."""
    table = [unknown if part is None else part for part in symbol_bytes(dictionary, unit)]
    return b"".join(table[i] for i in np.asarray(ids).tolist())
