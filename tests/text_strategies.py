"""Hypothesis strategies for text that tokenizers disagree on, shared by the tokenizer tests."""
import unicodedata

import regex
from hypothesis import strategies as st

PIECES = st.sampled_from([" ", "  ", "\t", "\r", "\n", "\n\n", "\r\n", "'", "'s", "'ll", "'S", "'ve", "0", "7",
                          "123456", "é", "ß", "中", "文", "😀", "👍🏽", "<|eot_id|>", "<|begin_of_text|>", "<|", "|>",
                          "word", "Word", "x"])
# unicode, emoji, CJK, CRLF, digits, contractions, whitespace runs, special-token look-alikes
TEXT = st.lists(st.one_of(st.text(st.characters(codec="utf-8"), max_size=8), PIECES), max_size=30).map("".join)


def recently_assigned() -> list[str]:
    """Characters the `regex` module's Unicode tables assign and this Python's unicodedata does
    not (Python 3.11 has Unicode 14.0; `regex` 2026 has 17.0): the characters on which Unicode
    tables of different ages disagree."""
    text = "".join(chr(c) for c in range(0x80, 0x110000) if not 0xD800 <= c < 0xE000)
    return [c for c in regex.findall(r"\p{Assigned}", text) if unicodedata.category(c) == "Cn"]


RECENT = recently_assigned()
# Recently assigned characters among contractions, letters, digits, spaces, and characters from
# planes 4 to 8 and rare controls (bytes a vocabulary trained on text may lack: SmolLM2's does).
RECENT_TEXT = st.lists(st.one_of(st.sampled_from(RECENT), st.characters(min_codepoint=0x40000, max_codepoint=0x8FFFF),
                                 st.sampled_from(["'s", "'t", "'LL", " ", "  ", "\n", "a", "Zz", "7", "123", "!",
                                                  "\x04", "\x1d", "é"])),
                       max_size=12).map("".join)
