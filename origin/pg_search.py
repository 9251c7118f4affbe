"""Words for PostgreSQL full-text search, normalized in Python the way SQLite's FTS5 does.

The embedded store indexes with FTS5's `unicode61 remove_diacritics 2` tokenizer: a word is a run
of letters and digits, case folded, Latin diacritics removed. PostgreSQL's own parsers differ
(they split on other characters, stem or keep accents, and `unaccent` is an extension we may not
install), so the PostgreSQL store does the normalizing here and hands PostgreSQL finished
lexemes: a message's tsvector is built from `lexemes(text)` and a query is the AND of
`lexemes(query)`, both passed as literals that PostgreSQL takes as they are. Word positions are
not kept, so a query matches every message holding all of its words, anywhere.

A lexeme longer than PostgreSQL's limit (2046 bytes) is left out of the index; such a word is
never found.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

_WORD: Final = re.compile(r"[^\W_]+", re.UNICODE)
_MAX_LEXEME_BYTES: Final = 2046


def lexemes(text: str) -> list[str]:
    """The distinct normalized words of `text`, in a stable order."""
    if text.isascii():
        # No diacritics to remove, and ASCII case folding is lower(): the same words, without
        # the per-character loop (~6 % of a PostgreSQL origin's CPU under load).
        folded = text.lower()
    else:
        decomposed = unicodedata.normalize("NFD", text)
        folded = "".join(c for c in decomposed if unicodedata.category(c) != "Mn").casefold()
    words = dict.fromkeys(w for w in _WORD.findall(folded) if len(w.encode()) <= _MAX_LEXEME_BYTES)
    return list(words)


def _quote(word: str) -> str:
    # The quoting of tsvector and tsquery literals: words hold no quotes or backslashes, but
    # the literal stays correct if the word pattern ever lets one through.
    return "'" + word.replace("\\", "\\\\").replace("'", "''") + "'"


def tsvector_literal(text: str | None) -> str | None:
    """The tsvector of a message's text, or None when it has no words."""
    if not text:
        return None
    words = lexemes(text)
    if not words:
        return None
    if "'" in text or "\\" in text:
        return " ".join(_quote(w) for w in words)
    # No word can hold a quote or backslash the text does not: one join (quoting word by word
    # was about a third of this function's time, which runs for every message stored).
    return "'" + "' '".join(words) + "'"


def tsquery_literal(query: str) -> str | None:
    """Every word of `query` ANDed, or None when it has no words (nothing matches). The
    caller bounds the query's length (the shard: `Limits.search_query_chars`)."""
    words = lexemes(query)
    return " & ".join(_quote(w) for w in words) if words else None
