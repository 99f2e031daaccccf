"""Named token sets: which vocabulary ids a probe sums probability over.

Every set is a function of the decoded vocabulary, so any tokenizer (byte-level "Ġ", SentencePiece "▁",
tiktoken bytes) is handled the same way: each token is decoded on its own, the space markers and
whitespace are stripped, and the set's rule looks at what is left.

    ids = token_set(tokenizer, "number")          # sorted list of ids
    is_number_token("Ġ1,000")                     # True
    register_token_set("yesno", words_rule(["yes", "no"]))

Number tokens follow the study (docs/paper_notes.md): all ASCII digits, an ordinal (1st, 22nd, 3rd, 4th),
a decimal with one dot, a thousands form with one comma, or one of 32 English number words in lower case
or capitalised. Special/added tokens (chat markers, image placeholders) never belong to a set.

`number_study` is the rule as the study's probe script computes it, for comparing with its published numbers:
it looks at the RAW vocabulary strings ("Ġtwo", "▁two": what `get_vocab()` stores), and it lower-cases a token
before stripping the space markers, so a byte-level space-prefixed word ("Ġtwo" -> "ġtwo") never matches
(docs/probes.md has both rules and their counts). Sets registered with raw=True see raw strings.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence

from training.records import NUMBER_WORDS

MARKERS = ("Ġ", "▁")  # byte-level and SentencePiece space markers

_NUMBER_WORD_FORMS = frozenset(NUMBER_WORDS) | {w.capitalize() for w in NUMBER_WORDS}
_DIGITS = re.compile(r"[0-9]+")
_ORDINAL = re.compile(r"[0-9]+(st|nd|rd|th)")


def normalize(token: str) -> str:
    """A decoded token without space markers and surrounding whitespace."""
    for m in MARKERS:
        token = token.replace(m, "")
    return token.strip()


def _digits_after_removing_one(s: str, sep: str) -> bool:
    return s.count(sep) == 1 and _DIGITS.fullmatch(s.replace(sep, "")) is not None


def is_number_token(token: str) -> bool:
    """The study's rule as its paper describes it, applied to one decoded token string (markers and whitespace
    are stripped here)."""
    s = normalize(token)
    return bool(s) and (_DIGITS.fullmatch(s) is not None or _ORDINAL.fullmatch(s) is not None
                        or _digits_after_removing_one(s, ".") or _digits_after_removing_one(s, ",")
                        or s in _NUMBER_WORD_FORMS)


_ORDINAL_SUFFIXES = frozenset({"st", "nd", "rd", "th"})
_LOWER_WORDS = frozenset(NUMBER_WORDS)
_DECIMAL_OR_THOUSANDS = re.compile(r"[0-9]+[.,][0-9]+")


def is_study_number_token(raw: str) -> bool:
    """The study script's number rule on one RAW vocabulary string, with its quirks kept: whitespace, then
    "▁"/"Ġ" characters at either end are stripped; the digit forms are tested on that (all ASCII digits;
    an ordinal whose digits may be any Unicode digit, suffix in any case; one dot or one comma between ASCII
    digits); the word test lower-cases BEFORE stripping the markers ('Ġ'.lower() is 'ġ', which is not
    stripped), so words match in any case but never after a byte-level space marker."""
    if raw in ("", "\ufffd"):
        return False
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    s = raw.strip().strip("▁Ġ")
    low = s.lower()
    if s and (_DIGITS.fullmatch(s) or _DECIMAL_OR_THOUSANDS.fullmatch(s)
              or (len(low) >= 3 and low[:-2].isdigit() and low[-2:] in _ORDINAL_SUFFIXES)):
        return True
    return raw.strip().lower().strip("▁Ġ") in _LOWER_WORDS


def words_rule(words: Iterable[str], capitalised: bool = True) -> Callable[[str], bool]:
    """A rule matching tokens whose stripped form is one of `words` (and their capitalised forms)."""
    forms = set(words) | ({w.capitalize() for w in words} if capitalised else set())
    return lambda token: normalize(token) in forms


def _is_letter(token: str) -> bool:
    s = normalize(token)
    return len(s) == 1 and "A" <= s <= "Z"


# name -> rule over one decoded token. Probes are named f"{name}_mass" and f"{name}_max_prob".
TOKEN_SETS: dict[str, Callable[[str], bool]] = {
    "number": is_number_token,
    "yesno": words_rule(["yes", "no"]),
    "letter": _is_letter,  # single capital letters: multiple-choice answers
    "number_study": is_study_number_token,
}
RAW_SETS = {"number_study"}  # sets whose rule reads raw vocabulary strings, not decoded text


def register_token_set(name: str, rule: Callable[[str], bool], raw: bool = False) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"token set name {name!r}: use lower-case letters, digits and underscores")
    TOKEN_SETS[name] = rule
    (RAW_SETS.add if raw else RAW_SETS.discard)(name)


def decoded_vocab(tokenizer) -> list[str | None]:
    """Each id's text as the tokenizer would print it alone; None for special/added tokens."""
    n = len(tokenizer)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    raw = tokenizer.convert_ids_to_tokens(list(range(n)))
    out: list[str | None] = []
    for i, tok in enumerate(raw):
        if i in special or tok is None:
            out.append(None)
            continue
        try:  # the tokenizer's own decoder: byte-level bytes -> text, "▁" -> space, <0x..> byte pieces
            out.append(tokenizer.convert_tokens_to_string([tok]))
        except Exception:  # a token the decoder rejects alone (e.g. half a UTF-8 sequence in some backends)
            out.append(tok)
    return out


def raw_vocab(tokenizer) -> list[str | None]:
    """Each id's string as the vocabulary stores it (get_vocab()'s keys); None for special/added tokens and
    for tokens that are not strings (tiktoken bytes)."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    raw = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [None if i in special or not isinstance(t, str) else t for i, t in enumerate(raw)]


def ids_matching(vocab: Sequence[str | None], rule: Callable[[str], bool]) -> list[int]:
    return [i for i, t in enumerate(vocab) if t is not None and rule(t)]


def vocab_fingerprint(tokenizer) -> str:
    """A short hash of the id -> token mapping: two tokenizers with the same one score the same sets."""
    h = hashlib.sha256()
    for tok in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        h.update(str(tok).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


def token_set(tokenizer, name: str, vocab: Sequence[str | None] | None = None) -> list[int]:
    """The sorted ids of set `name` in this tokenizer's vocabulary; an unknown name lists the known ones.
    `vocab` is the decoded vocabulary when the caller has it; raw-string sets read the raw one instead."""
    if name not in TOKEN_SETS:
        raise KeyError(f"unknown token set {name!r}; known: {', '.join(sorted(TOKEN_SETS))}")
    if name in RAW_SETS:
        vocab = raw_vocab(tokenizer)
    ids = ids_matching(vocab if vocab is not None else decoded_vocab(tokenizer), TOKEN_SETS[name])
    if not ids:
        raise ValueError(f"token set {name!r} is empty in this tokenizer's vocabulary ({len(tokenizer)} tokens)")
    return ids


def token_sets(tokenizer, names: Iterable[str]) -> dict[str, list[int]]:
    vocab = decoded_vocab(tokenizer)
    return {n: token_set(tokenizer, n, vocab) for n in names}
