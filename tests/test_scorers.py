"""Benchmark scorers on hand-made cases whose expected values are worked out (in the comment beside
each) from the metric's published definition, plus property tests."""
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.scorers import SCORERS, get_scorer, levenshtein, parse_number


def s(name, pred, refs):
    return get_scorer(name)(pred, refs)


def test_registry_names_the_valid_scorers():
    assert set(SCORERS) >= {"mc_letter", "exact", "integer", "vqa", "anls", "relaxed", "clock", "yes_no"}
    with pytest.raises(KeyError, match="anls.*clock.*vqa"):
        get_scorer("no_such_metric")
    with pytest.raises(ValueError, match="no reference"):
        s("exact", "x", [])


@pytest.mark.parametrize("pred,ref,expected", [
    ("B", "B", 1.0), ("B.", "B", 1.0), ("(B)", "B", 1.0), ("b", "B", 1.0),
    ("The answer is B", "B", 1.0), ("The answer is B.", "C", 0.0), ("Answer: (C)", "C", 1.0),
    ("B) a sparrow", "B", 1.0), ("I think it is D.", "D", 1.0), ("option (D)", "(D)", 1.0),
    ("B and C", "B", 0.0),                # two letters named: no single choice
    ("The answer is a bird", "A", 0.0),   # the article "a" is not choice A
    ("A bird", "A", 0.0),                 # nor is a capitalised article
    ("", "A", 0.0),
])
def test_mc_letter(pred, ref, expected):
    assert s("mc_letter", pred, ref) == expected


@pytest.mark.parametrize("pred,refs,expected", [
    ("Paris.", "paris", 1.0),                 # case and trailing period ignored
    ("  Paris  ", ["Lyon", "paris"], 1.0),    # max over references
    ("Paris, France", "paris", 0.0),          # inner text must match
    ("red car", "red  car", 1.0),             # whitespace collapsed
])
def test_exact(pred, refs, expected):
    assert s("exact", pred, refs) == expected


@pytest.mark.parametrize("pred,ref,expected", [
    ("seventeen", 17, 1.0), ("Seventeen.", "17", 1.0), ("twenty-one", 21, 1.0), ("twenty one", "21", 1.0),
    ("1,234", 1234, 1.0), ("There are 5 dogs.", 5, 1.0), ("5", 6, 0.0), ("twelve", 20, 0.0),
    ("one hundred and five", 105, 1.0), ("two thousand three hundred forty-five", 2345, 1.0),
    ("3.5", 3, 0.0), ("3.0", 3, 1.0), ("none", 0, 0.0), ("I see 4 cats and 2 dogs", 4, 1.0),
    ("one two", 1, 1.0),  # "one two" is the number one followed by another: the first is 1, not 3
])
def test_integer(pred, ref, expected):
    assert s("integer", pred, ref) == expected


@pytest.mark.parametrize("pred,refs,expected", [
    # matches = 10: every leave-one-out subset has 9 matches -> min(9/3, 1) = 1 -> mean 1
    ("two", ["2"] * 10, 1.0),
    # 3 "red" of 10: leaving out a red -> 2 matches -> 2/3 (3 subsets); leaving out a blue -> 3 -> 1 (7 subsets)
    # mean = (3 * 2/3 + 7 * 1) / 10 = 9 / 10
    ("red", ["red"] * 3 + ["blue"] * 7, 0.9),
    # 2 "red": (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10
    ("red", ["red"] * 2 + ["blue"] * 8, 0.6),
    # 1 "red": (1 * 0 + 9 * 1/3) / 10 = 3 / 10
    ("red", ["red"] + ["blue"] * 9, 0.3),
    # 4 "red": leaving out a red still leaves 3 -> 1; others 4/3 -> 1; mean 1
    ("red", ["red"] * 4 + ["blue"] * 6, 1.0),
    # "The Dog." -> period stripped -> "the dog" -> article dropped -> "dog"
    ("The Dog.", ["dog"] * 10, 1.0),
    # "dont" -> contraction table -> "don't"
    ("dont", ["don't"] * 10, 1.0),
    # "/" touching no space is replaced by a space
    ("black/white", ["black white"] * 10, 1.0),
    # a comma between digits removes every punctuation mark instead: "1,000" -> "1000"
    ("1,000", ["1000"] * 10, 1.0),
    # "3.5": a period before a digit is kept, so it is not "35"
    ("3.5", ["35"] * 10, 0.0),
    # one reference: normalised exact match
    ("A cat", ["cat"], 1.0), ("cats", "cat", 0.0),
])
def test_vqa(pred, refs, expected):
    assert s("vqa", pred, refs) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("pred,refs,expected", [
    ("hello", "hello", 1.0),
    ("helo", "hello", 0.8),                 # distance 1, longer length 5: NL = 0.2 -> 1 - 0.2
    ("abc", "abcd", 0.75),                  # 1 / 4 = 0.25 -> 0.75
    ("kitten", "sitting", 4 / 7),           # distance 3, length 7: NL = 3/7 < 0.5 -> 1 - 3/7
    ("ab", "abcd", 0.0),                    # 2 / 4 = 0.5 is not below the 0.5 threshold -> 0
    ("abc", "xyz", 0.0),                    # 3 / 3 = 1 -> 0
    (" The  Cat ", "the cat", 1.0),         # lower case, whitespace collapsed
    ("Paris", ["paris france", "PARIS"], 1.0),  # max over references
    ("", "", 1.0),                          # two empty strings are identical
])
def test_anls(pred, refs, expected):
    assert s("anls", pred, refs) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("pred,refs,expected", [
    ("105", "100", 1.0),       # |105 - 100| / 100 = 0.05 <= 0.05
    ("95", "100", 1.0),        # 5 / 100 = 0.05
    ("105.1", "100", 0.0),     # 5.1 / 100 = 0.051 > 0.05
    ("1,050", "1000", 1.0),    # thousands comma: 50 / 1000 = 0.05
    ("45%", "0.45", 1.0),      # "45%" reads as 0.45
    ("45", "45%", 0.0),        # 45 against 0.45: 99 / 1 relative change
    ("12.5.", "12.5", 1.0),    # one trailing period trimmed
    ("Yes", "yes", 1.0),       # not numbers: case-insensitive exact match
    ("0.0", "0", 0.0),         # a zero reference falls back to string match, as in pix2struct
    ("0", "0", 1.0),
])
def test_relaxed(pred, refs, expected):
    assert s("relaxed", pred, refs) == expected


@pytest.mark.parametrize("pred,ref,expected", [
    ("3:15", "3:16", 1.0), ("3:15", "3:17", 0.0),
    ("12:59", "1:00", 1.0),    # 12 -> 0 on the dial: 59 and 60 minutes, 1 apart
    ("11:59", "12:00", 1.0),   # 719 and 0: circular distance min(719, 720 - 719) = 1
    ("12:00", "12:02", 0.0),   # 2 minutes
    ("1:59", "2:00", 1.0),     # 119 and 120
    ("The time is 4:30.", "4:30", 1.0), ("13:05", "1:05", 1.0),  # 24-hour reading of the same dial
    ("4 o'clock", "4:00", 0.0), ("3:60", "4:00", 0.0),          # no H:MM / no such minute
])
def test_clock(pred, ref, expected):
    assert s("clock", pred, ref) == expected


@pytest.mark.parametrize("pred,ref,expected", [
    ("Yes, it is.", "yes", 1.0), ("No.", "yes", 0.0), ("no", "No", 1.0),
    ("Not sure", "no", 0.0), ("I know", "no", 0.0),  # "not" and "know" are not "no"
])
def test_yes_no(pred, ref, expected):
    assert s("yes_no", pred, ref) == expected


def test_bad_references_are_named():
    for name, ref in [("mc_letter", "sparrow"), ("integer", "many"), ("clock", "noon"), ("yes_no", "maybe")]:
        with pytest.raises(ValueError, match=repr(ref)):
            s(name, "x", ref)


# --- properties -------------------------------------------------------------------------------------
text = st.text(max_size=40)
VALID_REF = {
    "mc_letter": st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    "exact": text, "vqa": text, "anls": text, "relaxed": text,
    "integer": st.integers(0, 10**6).map(str),
    "clock": st.tuples(st.integers(1, 12), st.integers(0, 59)).map(lambda t: f"{t[0]}:{t[1]:02d}"),
    "yes_no": st.sampled_from(["yes", "no"]),
}


@settings(max_examples=60, deadline=None)
@given(data=st.data(), pred=text)
def test_scores_in_unit_interval_and_self_match_is_one(data, pred):
    for name, ref_strategy in VALID_REF.items():
        refs = data.draw(st.lists(ref_strategy, min_size=1, max_size=10), label=name)
        score = s(name, pred, refs)
        assert 0.0 <= score <= 1.0, name
        # an answer identical to a (lone) reference scores 1
        assert s(name, refs[0], refs[:1]) == 1.0, (name, refs[0])


@settings(max_examples=60, deadline=None)
@given(pred=st.text(alphabet="abc .", max_size=6), other=st.text(alphabet="abc .", max_size=6),
       k=st.integers(0, 10))
def test_vqa_k_matching_of_ten(pred, other, k):
    from probes.scorers import normalize_vqa
    if normalize_vqa(pred) == normalize_vqa(other):
        other = other + " xyz"
    got = s("vqa", pred, [pred] * k + [other] * (10 - k))
    # the k matching references each leave k-1 matches; the 10-k others leave k
    expected = (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10
    assert got == pytest.approx(max(expected, 0.0))
    assert s("vqa", pred, [pred] * 10) == 1.0


_W = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
     "sixteen seventeen eighteen nineteen".split()
_T = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _words(n: int) -> str:
    """Independent number-to-words writer (the inverse the parser must undo)."""
    if n < 20:
        return _W[n]
    if n < 100:
        return _T[n // 10] + ("" if n % 10 == 0 else "-" + _W[n % 10])
    if n < 1000:
        return _W[n // 100] + " hundred" + ("" if n % 100 == 0 else " and " + _words(n % 100))
    for scale, word in [(10**9, "billion"), (10**6, "million"), (10**3, "thousand")]:
        if n >= scale:
            return _words(n // scale) + " " + word + ("" if n % scale == 0 else " " + _words(n % scale))
    raise AssertionError(n)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 10**10 - 1))
def test_number_words_round_trip(n):
    assert parse_number(_words(n)) == n
    assert parse_number(f"I count {_words(n)} birds.") == n
    assert s("integer", _words(n).capitalize(), n) == 1.0
    assert parse_number(f"{n:,}") == n


@settings(max_examples=100, deadline=None)
@given(h=st.integers(1, 12), m=st.integers(0, 59), delta=st.integers(-720, 720))
def test_clock_circular_distance(h, m, delta):
    t = ((h % 12) * 60 + m + delta) % 720
    other = f"{(t // 60) or 12}:{t % 60:02d}"
    expected = 1.0 if min(abs(delta) % 720, 720 - abs(delta) % 720) <= 1 else 0.0
    assert s("clock", f"{h}:{m:02d}", other) == expected
    assert s("clock", other, f"{h}:{m:02d}") == expected  # symmetric


@cache
def _lev_ref(a: str, b: str) -> int:
    """The textbook recursion, an independent reference for the two-row programme."""
    if not a or not b:
        return len(a) + len(b)
    return min(_lev_ref(a[1:], b) + 1, _lev_ref(a, b[1:]) + 1, _lev_ref(a[1:], b[1:]) + (a[0] != b[0]))


@settings(max_examples=200, deadline=None)
@given(a=st.text(alphabet="abcd", max_size=8), b=st.text(alphabet="abcd", max_size=8))
def test_levenshtein_and_anls(a, b):
    d = _lev_ref(a, b)
    assert levenshtein(a, b) == d
    nl = d / max(len(a), len(b), 1)
    assert s("anls", a, b) == pytest.approx(1 - nl if nl < 0.5 else 0.0)
    assert s("anls", a, b) == s("anls", b, a)
