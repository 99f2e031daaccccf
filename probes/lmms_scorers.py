"""Per-item scorers that reproduce lmms-eval's own scoring exactly, registered beside `probes.scorers`.

The project's generic scorers (`anls`, `vqa`, `relaxed`, `mc_letter`, ...) follow the metrics' published
definitions and are lenient in places; lmms-eval's tasks differ from them in details that change
scores (ANLS lengths taken before normalising and 0.5 itself kept; EvalAI's answer processor; ChartQA
without thousands commas; first-character multiple choice). These reproduce, per item, the value that
lmms-eval's filters + `process_results` + metric give for a prediction, in two versions where the study's
fork (LMM_CL's lmms-eval 0.3) and current lmms-eval main differ. `probes.presets` binds them to data.
Source of each: ../shared/benchmarks/LMMS_EVAL_SPEC.json (file and function in lmms-eval per task).

Every scorer takes `(prediction, references, **record_fields)` like the generic ones and first strips the
prediction, as ConfigurableTask.process_results does (filters, where a task has them, see the raw text).
"""
from __future__ import annotations

import re
import statistics
import string

from .scorers import _VQA_ARTICLES, _VQA_CONTRACTIONS, _VQA_NUMBERS, _VQA_PUNCT, levenshtein, register_scorer


def _one(references) -> str:
    """The single reference of a one-answer task (a one-element list is accepted)."""
    if isinstance(references, (list, tuple)):
        if len(references) != 1:
            raise ValueError(f"expected one reference answer, got {len(references)}")
        references = references[0]
    return str(references)


def _hf_exact_match(prediction: str, reference: str) -> float:
    """api/metrics.py exact_match with ignore_case and ignore_punctuation: lower-case, delete every
    string.punctuation character, compare whole strings (inner and trailing spaces count)."""
    drop = str.maketrans("", "", string.punctuation)
    return float(prediction.lower().translate(drop) == reference.lower().translate(drop))


# --- cub200 (fork-only task): the first standalone letter ------------------------------------------
_LONE_LETTER = re.compile(r"\b([A-Za-z])[.)]?\b")


@register_scorer("lmms_cub200")
def cub200(prediction: str, references) -> float:
    """cub200_process_results: the first one-letter word anywhere ("I think Q" -> "i"), else the first
    character if it is a letter, lower-cased, equals the gold letter lower-cased."""
    pred = str(prediction).strip()
    if m := _LONE_LETTER.search(pred):
        pred = m.group(1).lower()
    elif pred and pred[0].isalpha():
        pred = pred[0].lower()
    else:
        pred = pred.lower()
    return float(_one(references).lower() == pred)


# --- pixmocount -------------------------------------------------------------------------------------
# The fork's parse_count replaces number words by plain substring replacement in this order, so
# "seventeen" becomes "7teen" (7) and "none" becomes "n1" (1), as the study's numbers were scored.
_COUNT_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                "fifteen sixteen seventeen eighteen nineteen twenty").split()


def parse_count_fork(text: str) -> int | None:
    text = text.lower().replace(".", "")
    for value, word in enumerate(_COUNT_WORDS):
        text = text.replace(word, str(value))
    m = re.search(r"\d+", text)  # the fork's two further patterns need digits too: this one decides
    return int(m.group()) if m else None


@register_scorer("lmms_pixmocount")
def pixmocount_fork(prediction: str, references) -> float:
    """The fork's pixmocount_accuracy: parse_count of both sides equal; unparsable -> 0."""
    pred, gold = parse_count_fork(str(prediction).strip()), parse_count_fork(_one(references))
    return float(pred is not None and gold is not None and pred == gold)


@register_scorer("lmms_pixmo_count")
def pixmo_count_main(prediction: str, references) -> float:
    """lmms-eval main's pixmo_count acc: the first digit run of each side, compared as strings ("05" !=
    "5"); a side without digits is compared whole."""
    pred, gold = str(prediction).strip(), _one(references).strip()
    gold = m.group() if (m := re.search(r"\d+", gold)) else gold
    pred = m.group() if (m := re.search(r"\d+", pred)) else pred
    return float(pred == gold)


# --- pathvqa (fork-only task): the "official" precision-like exact match ----------------------------
def _letters_words(text: str) -> list[str]:
    return re.sub("[^a-zA-Z ]", "", text).lower().strip().split()


@register_scorer("lmms_pathvqa_em")
def pathvqa_exact_match(prediction: str, references) -> float:
    """pathvqa_exact_match: (#distinct reference words found among the prediction's words) / (#prediction
    words); words keep letters only. "inflammation" vs "acute inflammation" -> 1.0; empty -> 0."""
    pred = _letters_words(str(prediction).strip())
    found = set(_letters_words(_one(references))) & set(pred)
    return len(found) / len(pred) if pred else 0.0


# --- textvqa: VQA accuracy over EvalAI-processed answers --------------------------------------------
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")   # sic, as EvalAI's pattern


def evalai_normalize(text: str) -> str:
    """EvalAIAnswerProcessor: lower-case and drop "," and "?" and split "'s" first, then the VQA
    punctuation, period, number-word, article and contraction rules. (Its digit-comma rule never fires
    because the commas are already gone.)"""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text) else " ")
    out = _PERIOD.sub("", out, count=re.UNICODE)  # sic: EvalAI passes re.UNICODE (32) as the count
    words = [_VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


@register_scorer("lmms_vqa")
def vqa_evalai(prediction: str, references) -> float:
    """textvqa_process_results: mean over answers i of min(1, #(other answers == prediction) / 3), all
    sides EvalAI-processed; a single answer therefore scores 0; no answers (None) scores 0."""
    if references is None:
        return 0.0
    answers = [evalai_normalize(str(a)) for a in references]
    pred = evalai_normalize(str(prediction).strip())
    per_answer = [min(1, sum(a == pred for j, a in enumerate(answers) if j != i) / 3) for i in range(len(answers))]
    return float(statistics.mean(per_answer))   # statistics.mean as lmms-eval (exact, then rounded once)


# --- timeclock (fork-only task) ---------------------------------------------------------------------
def parse_time_fork(text: str) -> tuple[int, int] | None:
    """parse_time: the first "H:M" (1-2 digits each), else the first two integers; periods removed first.
    (Its "time is ... H:M" pattern can only match where the first one already has.)"""
    text = text.lower().replace(".", "")
    if m := re.search(r"(\d{1,2}):(\d{1,2})", text):
        return int(m.group(1)), int(m.group(2))
    numbers = re.findall(r"\d+", text)
    return (int(numbers[0]), int(numbers[1])) if len(numbers) >= 2 else None


@register_scorer("lmms_timeclock")
def timeclock_both(prediction: str, references) -> float:
    """both_accuracy: hours equal (no 12/24 h folding) and minutes within 1, or exactly 59 apart."""
    pred, gold = parse_time_fork(str(prediction).strip()), parse_time_fork(_one(references))
    if pred is None or gold is None:
        return 0.0
    minutes_apart = abs(pred[1] - gold[1])
    return float(pred[0] == gold[0] and (minutes_apart <= 1 or minutes_apart == 59))


# --- ai2d: MultiChoiceRegexFilter then exact_match ---------------------------------------------------
@register_scorer("lmms_ai2d")
def ai2d(prediction: str, references) -> float:
    """ai2d's filter keeps the letter of a response starting "X." (spaces allowed before), else the whole
    response; then exact_match ignoring case and punctuation: "(C)" -> "c" scores, "The answer is B" not."""
    m = re.match(r"^\s*([A-Z])\.", str(prediction))
    return _hf_exact_match((m.group(1) if m else str(prediction)).strip(), _one(references))


# --- chartqa: relaxed correctness -------------------------------------------------------------------
def _chartqa_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


@register_scorer("lmms_relaxed")
def chartqa_relaxed(prediction: str, references, max_relative_change: float = 0.05) -> float:
    """relaxed_correctness: within 5% when both parse as Python floats ("x%" -> x/100) and the target is
    non-zero, else case-insensitive string equality; no comma or period stripping ("1,234" != "1234")."""
    pred, target = str(prediction).strip(), _one(references)
    pred_f, target_f = _chartqa_float(pred), _chartqa_float(target)
    if pred_f is not None and target_f:
        return float(abs(pred_f - target_f) / abs(target_f) <= max_relative_change)
    return float(pred.lower() == target.lower())


# --- docvqa / infovqa: ANLS -------------------------------------------------------------------------
@register_scorer("lmms_anls")
def anls_lmms(prediction: str, references, threshold: float = 0.5) -> float:
    """api/metrics.py anls: distance between the lower-cased, whitespace-collapsed answers, divided by the
    longer of the UN-normalised lengths (of .upper(), as there); 1 - the smallest over answers, kept when
    >= 0.5 (exactly 0.5 counts), else 0."""
    pred = str(prediction).strip()
    answers = [references] if isinstance(references, str) else list(references)
    if not answers:
        raise ValueError("no reference answers given")
    det = " ".join(pred.lower().split())
    distances = []
    for answer in answers:
        length = max(len(answer.upper()), len(pred.upper()))
        gt = " ".join(answer.strip().lower().split())
        distances.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    score = 1 - min(distances)
    return float(score) if score >= threshold else 0.0


# --- realworldqa ------------------------------------------------------------------------------------
_SMALL_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


@register_scorer("lmms_realworldqa_fork")
def realworldqa_fork(prediction: str, references, question: str = "") -> float:
    """The fork's filter chain, then exact_match ignoring case and punctuation against the answer:
    NumberWordsToDigitsFilter maps a whole response "three" -> "3"; MultiChoiceRegexFilter reads the
    choices "X. text" from the question (lettered A, B, ... in order of appearance), strips the response's
    punctuation, and if a choice's text occurs in it returns that choice's letter, else the stripped text."""
    resp = str(prediction)
    resp = _SMALL_NUMBERS.get(resp.lower(), resp)
    choices = {}
    for i, (_, text) in enumerate(re.findall(r"\b([A-Z])\.\s+([^\n]*)", question)):
        choices[text.strip()] = chr(ord("A") + i)
    cleaned = re.sub(r"[^\w\s]", "", resp).strip()
    m = re.search("|".join(re.escape(t) for t in choices), cleaned) if choices else None  # no question: no choices
    chosen = choices[m.group()] if m and m.group() in choices else cleaned
    return _hf_exact_match(chosen.strip(), _one(references))


@register_scorer("lmms_realworldqa")
def realworldqa_main(prediction: str, references) -> float:
    """lmms-eval main's realworldqa_process_results: a letter answer A-D is compared with
    extract_mcq_answer's letter; any other answer with the response lower-cased, trailing periods dropped."""
    pred, gold = str(prediction).strip(), _one(references).strip()
    if gold.upper() in ("A", "B", "C", "D"):
        return float(extract_mcq_answer(pred, ["A", "B", "C", "D"]) == gold.upper())
    return float(pred.lower().strip().rstrip(".") == gold.lower())


# --- lmms-eval main's shared multiple-choice extractor (tasks/_task_utils/mcq_extract.py) -----------
_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
    "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")
# Each form a letter can take, with its rank; the highest rank wins, then the latest position.
_LETTER_FORMS = (("({})", 6), ("{}.", 5), ("{}:", 4), ("{})", 3), ("{} ", 2))
_RANK_PHRASE, _RANK_START, _RANK_END, _RANK_ANYWHERE = 7, 10, 9, 0


def extract_mcq_answer(response: str, choices=("A", "B", "C", "D", "E", "F", "G", "H")) -> str:
    """The choice letter a free-form answer gives, "" when none; candidates are ranked (start of answer >
    end > after an answer phrase > "(X)" > "X." > "X:" > "X)" > "X "), the last occurrence winning a tie."""
    if not response or not response.strip():
        return ""
    text = response.strip()
    for mark in ",.!?;:'\"":   # one after the other, as there: a mark uncovered later stays
        text = text.strip(mark)
    text = f" {text} "
    found = []   # (letter, position, rank) in the order the extractor collects them
    for form, rank in _LETTER_FORMS:
        found += [(ch, text.rfind(form.format(ch)), rank) for ch in choices if form.format(ch) in text]
    lower = text.lower()
    for phrase in _ANSWER_PHRASES:
        if (at := lower.find(phrase)) != -1:
            after = at + len(phrase)
            found += [(ch, text.find(ch, after), _RANK_PHRASE) for ch in choices if text.find(ch, after) != -1]
    bare = text.strip()
    found += [(ch, 0, _RANK_START) for ch in choices
              if bare.startswith(ch) and (len(bare) == 1 or not bare[1].isalpha())]
    found += [(ch, len(text) - 1, _RANK_END) for ch in choices
              if bare.endswith(ch) and (len(bare) == 1 or not bare[-2].isalpha())]
    if not found:
        found = [(ch, text.rfind(ch), _RANK_ANYWHERE) for ch in choices if ch in text]
    if not found:
        return ""
    return sorted(found, key=lambda c: (c[2], c[1]), reverse=True)[0][0]


# --- seedbench: the first character -----------------------------------------------------------------
@register_scorer("lmms_seed")
def seed_first_char(prediction: str, references) -> float:
    """seed_process_result + seed_aggregation_result: only the first character of the answer counts
    ("Blue" -> "B"), compared case-insensitively."""
    pred = str(prediction).strip()
    pred = pred[0] if len(pred) > 1 else pred
    return float(pred.lower().strip() == _one(references).lower().strip())


# --- scienceqa_img ----------------------------------------------------------------------------------
@register_scorer("lmms_sqa_fork")
def sqa_fork(prediction: str, references) -> float:
    """The fork's sqa_process_results: the whole answer lower-cased equals the letter; its "X. ..." rule
    tests for an upper-case first character after lower-casing, so "C." scores 0."""
    target, pred = _one(references).strip().lower(), str(prediction).strip().lower()
    if pred == target:
        return 1.0
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return float(pred[0] == target)
    return 0.0


@register_scorer("lmms_sqa")
def sqa_main(prediction: str, references) -> float:
    """lmms-eval main's sqa_process_results: the whole answer, or the letter of an answer "X. ...", equals
    the target letter ("C." scores 1; "(C)" and "The answer is C" score 0)."""
    target, pred = _one(references).strip().lower(), str(prediction).strip()
    if pred.lower() == target:
        return 1.0
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return float(pred[0].lower() == target)
    return 0.0


# --- mmstar -----------------------------------------------------------------------------------------
@register_scorer("lmms_mmstar_fork")
def mmstar_fork(prediction: str, references) -> float:
    """The fork's MMStar exact_match: the answer's first character, or the one after "(", "option " or
    "the answer is ", equals the letter ("Answer: B" and "I think B" score 0)."""
    gold = _one(references).lower().strip().replace("\n", " ")
    pred = str(prediction).strip().lower().strip().replace("\n", " ")
    # An answer too short for a rule raised IndexError there, caught as 0: here the rule just fails.
    return float(any(pred.startswith(prefix) and len(pred) > len(prefix) and pred[len(prefix)] == gold
                     for prefix in ("", "(", "option ", "the answer is ")))


@register_scorer("lmms_mcq_extract")
def mcq_extract_abcd(prediction: str, references) -> float:
    """lmms-eval main's MMStar: extract_mcq_answer over A-D equals the letter."""
    return float(extract_mcq_answer(str(prediction).strip(), ["A", "B", "C", "D"]) == _one(references).strip().upper())
