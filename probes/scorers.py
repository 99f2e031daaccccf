"""Benchmark scorers: one registered function per answer format (lm-evaluation-harness style).

A benchmark is data plus the name of a scorer. Every scorer has the signature

    scorer(prediction: str, references: str | int | Sequence[str | int]) -> float in [0, 1]

and scores one model answer against the reference answer(s). `probes.evaluate` averages them over a
benchmark and multiplies by 100 (evals.parquet holds scores in 0-100). Definitions, with sources:

- `mc_letter`: the letter the answer chooses ("B", "B.", "(B)", "The answer is B", "B) a sparrow")
  equals the reference letter.
- `exact`: normalised exact match (case, surrounding whitespace and punctuation ignored); max over refs.
- `integer`: the first number in the answer, digits ("1,234") or English words ("twenty-one"), equals
  the reference number.
- `vqa`: the VQA accuracy of Antol et al. 2015 as the official evaluation computes it (normalise the
  answers, then average over the leave-one-out subsets of the references min(#matches / 3, 1)).
- `anls`: ANLS of Biten et al. 2019 (ST-VQA, used by DocVQA/InfoVQA): max over refs of 1 - NL if
  NL < 0.5 else 0, NL = Levenshtein distance / length of the longer string.
- `relaxed`: ChartQA's relaxed accuracy (Masry et al. 2022; pix2struct's implementation): numbers
  within 5% relative of the reference, otherwise case-insensitive exact match.
- `clock`: "H:MM" on a 12-hour dial within +-1 minute, wrapping 12:59 -> 1:00 and 11:59 -> 12:00.
- `yes_no`: the first "yes" or "no" in the answer equals the reference.
"""
from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Sequence

Scorer = Callable[[str, "str | int | Sequence[str | int]"], float]
SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str):
    """Decorator: register `fn(prediction, references) -> float in [0, 1]` under `name`."""
    def wrap(fn: Scorer) -> Scorer:
        if name in SCORERS:
            raise ValueError(f"scorer {name!r} is already registered")
        SCORERS[name] = fn
        return fn
    return wrap


def get_scorer(name: str) -> Scorer:
    try:
        return SCORERS[name]
    except KeyError:
        raise KeyError(f"unknown scorer {name!r}; registered scorers: {', '.join(sorted(SCORERS))}") from None


def _refs(references) -> list[str]:
    """A reference answer or a list of them, as strings; an empty list is an error, not a zero."""
    refs = [references] if isinstance(references, (str, int)) else list(references)
    if not refs:
        raise ValueError("no reference answers given")
    return [str(r) for r in refs]


def _parse_ref(parse, ref: str, scorer: str, what: str):
    """A reference read by `parse`; one it cannot read is a data error, reported before any scoring."""
    value = parse(ref)
    if value is None:
        raise ValueError(f"{scorer} reference {ref!r} is not {what}")
    return value


# --- multiple-choice letter -------------------------------------------------------------------------
# Patterns tried in order; the first that finds a letter decides. Upper-case letters only outside the
# whole-answer case, so that words are not read as choices; "A" and "I" followed by a lower-case word
# are the English words ("A bird", "I think"), not choices.
_MC_WHOLE = re.compile(r"^\s*[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[.:,)]?\s*$")
_MC_STATED = re.compile(r"(?i:answer|option|choice)\s*(?:is|:)?\s*[:\-]?\s*[\(\[]?([A-Z])\b")
_MC_LEADING = re.compile(r"^\s*[\(\[]?([A-Z])(?:[\)\]]|[.:,]|\s*$)")
_MC_ANY = re.compile(r"(?<![A-Za-z0-9'])[\(\[]?([A-Z])[\)\]]?(?![A-Za-z0-9'])")


def extract_choice(text: str) -> str | None:
    """The upper-case letter an answer chooses, or None when it names none (or several)."""
    if m := _MC_WHOLE.match(text):
        return m.group(1).upper()
    if m := _MC_STATED.search(text):
        return m.group(1).upper()
    if m := _MC_LEADING.match(text):
        return m.group(1)
    found = set()
    for m in _MC_ANY.finditer(text):
        rest = text[m.end():]
        if m.group(1) in "AI" and re.match(r"\s+[a-z]", rest) and m.group(0) == m.group(1):
            continue  # the word "A"/"I", not a choice
        found.add(m.group(1))
    return found.pop() if len(found) == 1 else None


@register_scorer("mc_letter")
def mc_letter(prediction: str, references) -> float:
    letters = [_parse_ref(extract_choice, ref, "mc_letter", "a choice letter") for ref in _refs(references)]
    choice = extract_choice(prediction)
    return float(choice is not None and choice in letters)


# --- exact match ------------------------------------------------------------------------------------
_EDGE_PUNCT = string.punctuation + " "


def normalize_exact(text: str) -> str:
    """Lower case, whitespace collapsed, punctuation stripped from both ends ("Paris." == "paris")."""
    return " ".join(str(text).lower().split()).strip(_EDGE_PUNCT)


@register_scorer("exact")
def exact(prediction: str, references) -> float:
    pred = normalize_exact(prediction)
    return float(any(pred == normalize_exact(r) for r in _refs(references)))


# --- integers, digits or words -----------------------------------------------------------------------
_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
_NUM_TOKEN = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|[a-z]+")


def _words_value(tokens: list[str]) -> int | None:
    """Value of the number-word phrase at the start of `tokens`, or None when it starts with none.

    A small grammar, so that "one two" is 1 (then stop), not 3: a unit may follow a ten ("twenty one");
    "hundred" follows a unit or teen; "thousand"/"million"/"billion" close a group; "and" is allowed
    after "hundred" or a scale word when a number word follows ("one hundred and five").
    """
    total, group, last, seen = 0, 0, None, False
    min_scale = float("inf")  # scale words must come in decreasing order ("a million two thousand")
    for i, tok in enumerate(tokens):
        if tok in _UNITS:
            v = _UNITS[tok]
            if last in (None, "hundred", "scale") or (last == "ten" and 1 <= v <= 9):
                group += v
                last = "unit" if 1 <= v <= 9 else "teen"
            else:
                break
        elif tok in _TENS:
            if last not in (None, "hundred", "scale"):
                break
            group += _TENS[tok]
            last = "ten"
        elif tok == "hundred":
            if last not in (None, "unit", "teen"):
                break
            group = max(group, 1) * 100
            last = "hundred"
        elif tok in _SCALES:
            if last == "scale" or _SCALES[tok] >= min_scale:
                break
            total += max(group, 1) * _SCALES[tok]
            min_scale = _SCALES[tok]
            group, last = 0, "scale"
        elif tok == "and" and last in ("hundred", "scale") and i + 1 < len(tokens) and (
                tokens[i + 1] in _UNITS or tokens[i + 1] in _TENS):
            continue
        else:
            break
        seen = True
    return total + group if seen else None


def parse_number(text: str) -> float | None:
    """The first number in `text`: digits (thousands commas allowed) or English number words."""
    tokens = _NUM_TOKEN.findall(str(text).lower())
    for i, tok in enumerate(tokens):
        if tok[0].isdigit():
            return float(tok.replace(",", ""))
        value = _words_value(tokens[i:])
        if value is not None:
            return float(value)
    return None


@register_scorer("integer")
def integer(prediction: str, references) -> float:
    values = [_parse_ref(parse_number, ref, "integer", "a number") for ref in _refs(references)]
    pred = parse_number(prediction)
    return float(pred is not None and pred in values)


# --- VQA accuracy -----------------------------------------------------------------------------------
# Tables and regular expressions of the official VQA evaluation (vqaEval.py, GT-Vision-Lab/VQA).
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern; strips "." not before a digit
_VQA_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
              ",", "?", "!"]


def _vqa_punctuation(text: str) -> str:
    out = text
    for p in _VQA_PUNCT:
        # As the official code: drop the mark when it touches a space (or the text has "1,000"),
        # otherwise replace it by a space ("black/white" -> "black white").
        if (p + " " in text or " " + p in text) or _VQA_COMMA_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _VQA_PERIOD.sub("", out)


def _vqa_digits_articles(text: str) -> str:
    words = [_VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _VQA_ARTICLES]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa(text: str) -> str:
    """An answer as the official VQA evaluation normalises it (newlines, punctuation, number words
    zero..ten to digits, articles dropped, contractions restored), then lower-cased as it compares."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text)).lower()


@register_scorer("vqa")
def vqa(prediction: str, references) -> float:
    """mean over i of min(#{j != i: ref_j == pred} / 3, 1); one reference: exact match.

    The official script normalises only when the references disagree; we always normalise both
    sides (as lmms-eval does for the prediction), so "Two." scores against ten "2"s. With a single
    reference the leave-one-out formula would always give 0, so it reduces to normalised exact match.
    """
    refs = [normalize_vqa(r) for r in _refs(references)]
    pred = normalize_vqa(prediction)
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = sum(r == pred for r in refs)
    # Leaving out a matching reference leaves matches - 1 matches; leaving out another leaves matches.
    per_subset = [min(1.0, (matches - (r == pred)) / 3) for r in refs]
    return sum(per_subset) / len(per_subset)


# --- ANLS -------------------------------------------------------------------------------------------
def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_norm(text: str) -> str:
    return " ".join(str(text).lower().split())


@register_scorer("anls")
def anls(prediction: str, references, threshold: float = 0.5) -> float:
    """max over refs of (1 - NL if NL < threshold else 0); answers lower-cased, whitespace collapsed."""
    pred = _anls_norm(prediction)
    best = 0.0
    for ref in _refs(references):
        ref = _anls_norm(ref)
        longest = max(len(pred), len(ref))
        nl = levenshtein(pred, ref) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


# --- ChartQA relaxed accuracy -----------------------------------------------------------------------
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?%?$")


def _relaxed_float(text: str) -> float | None:
    """pix2struct's _to_float ("45%" is 0.45), after trimming whitespace, one trailing period and
    thousands commas."""
    text = text.strip()
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    try:
        value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None  # "nan", "inf" are words here, not numbers


@register_scorer("relaxed")
def relaxed(prediction: str, references, tolerance: float = 0.05) -> float:
    """|pred - ref| / |ref| <= 5% when both are numbers (and ref != 0), else case-insensitive exact."""
    pred_f = _relaxed_float(prediction)
    for ref in _refs(references):
        ref_f = _relaxed_float(ref)
        if pred_f is not None and ref_f:  # a zero reference falls back to string match, as pix2struct
            ok = abs(pred_f - ref_f) / abs(ref_f) <= tolerance
        else:
            ok = prediction.strip().lower() == ref.strip().lower()
        if ok:
            return 1.0
    return 0.0


# --- analog clock -----------------------------------------------------------------------------------
_CLOCK = re.compile(r"(?<!\d)(\d{1,2})\s*:\s*(\d{2})(?!\d)")


def parse_clock(text: str) -> int | None:
    """Minutes past 12:00 on a 12-hour dial (0..719) of the first "H:MM" in `text`, or None."""
    m = _CLOCK.search(str(text))
    if not m:
        return None
    hour, minute = int(m.group(1)), int(m.group(2))
    if hour > 23 or minute > 59:
        return None
    return (hour % 12) * 60 + minute


@register_scorer("clock")
def clock(prediction: str, references, tolerance_min: int = 1) -> float:
    """1 when the circular distance on the 720-minute dial is at most 1 minute."""
    values = [_parse_ref(parse_clock, ref, "clock", "H:MM") for ref in _refs(references)]
    pred = parse_clock(prediction)
    if pred is None:
        return 0.0
    return float(any(min(abs(pred - v), 720 - abs(pred - v)) <= tolerance_min for v in values))


# --- yes / no ---------------------------------------------------------------------------------------
_YES_NO = re.compile(r"\b(yes|no)\b")


@register_scorer("yes_no")
def yes_no(prediction: str, references) -> float:
    answers = [_parse_ref(_yes_or_no, ref, "yes_no", "yes or no") for ref in _refs(references)]
    return float(_first_yes_no(prediction) in answers)


def _yes_or_no(ref: str) -> str | None:
    r = normalize_exact(ref)
    return r if r in ("yes", "no") else None


def _first_yes_no(text: str) -> str | None:
    m = _YES_NO.search(str(text).lower())
    return m.group(1) if m else None
