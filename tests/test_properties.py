"""Property tests (hypothesis) of the number-token rule (probes.tokensets) and of scorer laws that the
example tests in test_probe_tokensets.py / test_scorers.py check only at points."""
import unicodedata

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from probes.scorers import SCORERS, get_scorer
from probes.tokensets import NUMBER_WORDS, is_number_token, normalize

DIGITS = st.text(alphabet="0123456789", min_size=1, max_size=12)
MARKER = st.sampled_from(["", " ", "Ġ", "▁", "\t"])
TRAIL = st.sampled_from(["", " ", "\n"])
WORD_FORMS = set(NUMBER_WORDS) | {w.capitalize() for w in NUMBER_WORDS}


@settings(max_examples=300, deadline=None)
@given(d=DIGITS, m=MARKER, t=TRAIL)
def test_any_digit_string_with_an_optional_marker_is_a_number(d, m, t):
    assert is_number_token(m + d + t)


@settings(max_examples=200, deadline=None)
@given(d=DIGITS, suffix=st.sampled_from(["st", "nd", "rd", "th"]), m=MARKER)
def test_digits_with_an_ordinal_suffix_are_numbers(d, suffix, m):
    assert is_number_token(m + d + suffix)
    assert not is_number_token(m + d + suffix.upper())        # "1ST" is not the study's ordinal


@settings(max_examples=300, deadline=None)
@given(a=st.text(alphabet="0123456789", max_size=6), b=st.text(alphabet="0123456789", max_size=6),
       sep=st.sampled_from([".", ","]), m=MARKER)
def test_one_dot_or_one_comma_between_digits_is_a_number_two_are_not(a, b, sep, m):
    assume(a + b)
    assert is_number_token(m + a + sep + b)
    assert not is_number_token(m + a + sep + b + sep + "5")    # 1.2.5, 1,000,5
    assert not is_number_token(m + a + "." + b + "," + "5")    # mixed separators


@settings(max_examples=100, deadline=None)
@given(w=st.sampled_from(sorted(WORD_FORMS)), m=MARKER)
def test_number_words_lower_and_capitalised_are_numbers_upper_case_is_not(w, m):
    assert is_number_token(m + w)
    if len(w) > 1:
        assert not is_number_token(m + w.upper())


@settings(max_examples=500, deadline=None)
@given(s=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12))
def test_a_token_with_a_letter_is_a_number_only_as_a_number_word_or_ordinal(s):
    core = normalize(s)
    assume(any(c.isalpha() for c in core))
    is_ordinal = (len(core) > 2 and core[:-2].isascii() and core[:-2].isdigit() and core[-2:] in ("st", "nd", "rd", "th"))
    assert is_number_token(s) == (core in WORD_FORMS or is_ordinal)


@settings(max_examples=300, deadline=None)
@given(s=st.text(max_size=10), m=st.sampled_from(["Ġ", "▁", " "]))
def test_space_markers_never_change_the_answer(s, m):
    assert is_number_token(m + s) == is_number_token(s) == is_number_token(s + " ")


@settings(max_examples=300, deadline=None)
@given(s=st.text(max_size=10))
def test_non_ascii_digits_signs_and_empty_tokens_are_not_numbers(s):
    if any(unicodedata.category(c) == "Nd" and not c.isascii() for c in s):   # Arabic-Indic, full-width, ...
        assert not is_number_token(s)
    if is_number_token(s):
        assert not is_number_token("-" + normalize(s)) and not is_number_token("+" + normalize(s))
    if not normalize(s):
        assert not is_number_token(s)


# --- scorers ----------------------------------------------------------------------------------------------
ANSWER = st.text(alphabet="abcdefghij0123456789 ", min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(ref=ANSWER, pad=st.sampled_from(["", " ", "  ", "\n"]), punct=st.sampled_from(["", ".", "!", "?"]))
def test_exact_ignores_case_surrounding_whitespace_and_punctuation(ref, pad, punct):
    assume(ref.strip())
    assert get_scorer("exact")(pad + ref.upper() + punct + pad, ref) == 1.0


MAX_OVER_REFS = ["mc_letter", "exact", "integer", "anls", "relaxed", "clock", "yes_no"]
REF = {"mc_letter": st.sampled_from("ABCD"), "exact": ANSWER, "anls": ANSWER, "relaxed": ANSWER,
       "integer": st.integers(0, 50).map(str),
       "clock": st.tuples(st.integers(1, 12), st.integers(0, 59)).map(lambda t: f"{t[0]}:{t[1]:02d}"),
       "yes_no": st.sampled_from(["yes", "no"])}


@pytest.mark.parametrize("name", MAX_OVER_REFS)
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_several_references_score_the_best_match(name, data):
    """Every scorer but vqa (which averages leave-one-out subsets) takes the best reference."""
    refs = data.draw(st.lists(REF[name], min_size=1, max_size=5))
    pred = data.draw(st.one_of(REF[name], st.text(max_size=15)))
    s = get_scorer(name)
    assert s(pred, refs) == max(s(pred, [r]) for r in refs)
    assert s(pred, refs) == s(pred, list(reversed(refs)))


@settings(max_examples=200, deadline=None)
@given(ref=st.floats(0.01, 1e6), rel=st.floats(-0.2, 0.2))
def test_relaxed_accepts_numbers_within_five_percent(ref, rel):
    assume(abs(abs(rel) - 0.05) > 1e-6)
    pred = ref * (1 + rel)
    assert get_scorer("relaxed")(repr(pred), repr(ref)) == (1.0 if abs(rel) < 0.05 else 0.0)


@pytest.mark.parametrize("name", sorted(SCORERS))
@settings(max_examples=50, deadline=None)
@given(pred=st.text(max_size=30))
def test_scorers_are_pure_functions_of_their_inputs(name, pred):
    """The same inputs give the same score, whatever was scored before (no state between calls)."""
    ref = {"mc_letter": "B", "integer": "3", "clock": "3:15", "yes_no": "yes"}.get(name, "a cat")
    s = get_scorer(name)
    first = s(pred, [ref])
    s("B 3 3:15 yes a cat", [ref])
    assert s(pred, [ref]) == first and 0.0 <= first <= 1.0
