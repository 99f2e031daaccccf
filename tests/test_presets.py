"""probes.presets against lmms-eval: prompts byte for byte and per-item scores, for every preset and both
profiles, on hand-made records. Every expected value was worked out by reading lmms-eval's task code (the
fork LMM_CL@0affbdc = profile `study`, main@75571cf = profile `lmms-eval`; file and function per task in
../shared/benchmarks/LMMS_EVAL_SPEC.json); the comment beside a case says why where it is not obvious."""
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from probes.presets import get_preset, names

CUB = {"question": "Which bird is this?\nA. Laysan Albatross\nB. Sooty Albatross\n<image>", "answer": "B"}
PIXMO = {"question": "How many dogs are in this image?\n<image>", "answer": "There are 5 dogs in this image."}
PIXMO17 = {"question": "How many people are in this image?\n<image>", "answer": "There are 17 people in this image."}
TIME = {"question": "What time does the clock show in this image?\n<image>", "answer": "03:45"}
TIME59 = {"question": "What time does the clock show in this image?\n<image>", "answer": "03:59"}
PATH = {"question": "What is present?", "answer": "acute inflammation"}
PATH_YN = {"question": "Is this inflammation?", "answer": "yes"}
TEXT = {"question": "what is the NASA logo color?", "answers": ["red"] * 2 + ["Red."] + ["blue"] * 7}
TEXT2 = {"question": "what's written?", "answers": ["it's ok"] * 2 + ["a?b"] * 8}
TEXT_ONE = {"question": "how many?", "answers": ["two"]}
TEXT_NONE = {"question": "how many?", "answers": None}
AI2D = {"question": "What eats grass?", "options": ["cow", "lion", "snake"], "answer": "0"}
CHART = {"question": "What is the value?", "answer": "61", "type": "human_test"}
CHART_WORD = {"question": "Which country?", "answer": "Japan", "type": "augmented_test"}
CHART_BIG = {"question": "How many?", "answer": "1234", "type": "human_test"}
CHART_PCT = {"question": "What share?", "answer": "45%", "type": "human_test"}
CHART_ZERO = {"question": "How many?", "answer": "0", "type": "human_test"}
DOC = {"question": "What is the date?", "answers": ["May 5, 1998", "5/5/98"]}
DOC_HALF = {"question": "What is the code?", "answers": ["abcd"]}
DOC_SZ = {"question": "Which street?", "answers": ["Straße"]}
INFO = {"question": "How many?", "answers": ["25%", "25"]}
RWQA = {"question": "How many cars are there?\nA. 2\nB. 3\nC. 4\n"
                    "Please answer directly with only the letter of the correct option and nothing else.", "answer": "B"}
RWQA_OPEN = {"question": "  Is the road wet? Please answer directly with a single word or number.  ", "answer": "No"}
SEED = {"question": "What is shown?", "choice_a": "a dog", "choice_b": "a cat", "choice_c": "a car",
        "choice_d": "a tree", "answer": "B", "data_type": "image", "question_id": "1"}
SEED_VIDEO = dict(SEED, data_type="video", question_id="2")
SQA = {"question": "Which is a mammal?", "choices": ["frog", "whale", "shark"], "answer": 1,
       "hint": "Look at the animals."}
SQA_NO_HINT = dict(SQA, hint="")
MMSTAR = {"question": "Which option is right?\nOptions: A: x, B: y, C: z, D: w", "answer": "A",
          "category": "math", "l2_category": "geometry", "index": 0}
MMSTAR_YN = {"question": " Is it red? Please answer yes or no.\nOptions: A: yes, B: no ", "answer": "B",
             "category": "math", "l2_category": "geometry", "index": 1}

MC_POST = "\nAnswer with the option's letter from the given choices directly."
CUB_KWARGS = ("{'default': {'pre_prompt': '', 'post_prompt': \"Answer with the option's letter from the given "
              "choices directly.\"}, 'pre_prompt': '', 'post_prompt': \"Answer with the option's letter from the "
              "given choices directly.\"}")
PIXMO_KWARGS = ("{'default': {'pre_prompt': '', 'post_prompt': '\\nAnswer with integer and nothing else. For example, "
                "if the answer is 1, you should output 1.'}, 'pre_prompt': '', 'post_prompt': '\\nAnswer with integer "
                "and nothing else. For example, if the answer is 1, you should output 1.'}")
TIME_KWARGS = ("{'default': {'pre_prompt': '', 'post_prompt': \"\\nAnswer with the time in HH:MM format. For example, "
               "if it's 3:45, output 3:45.\"}, 'pre_prompt': '', 'post_prompt': \"\\nAnswer with the time in HH:MM "
               "format. For example, if it's 3:45, output 3:45.\"}")
PATH_PROMPT = ("Look at the medical image and answer the following question: What is present?\nFor questions that "
               "can be answered with a yes or no, just answer yes or no. Otherwise, provide an answer in the medical domain.")

PROMPTS = [
    # the fork's bug: the kwargs dict printed before the question, post_prompt never appended
    ("cub200", "study", CUB, CUB_KWARGS + "Which bird is this?\nA. Laysan Albatross\nB. Sooty Albatross"),
    # fixed: pre + question + post, and the task's own function puts no separator before post_prompt
    ("cub200", "lmms-eval", CUB, "Which bird is this?\nA. Laysan Albatross\nB. Sooty Albatross"
                                 "Answer with the option's letter from the given choices directly."),
    ("pixmocount", "study", PIXMO, PIXMO_KWARGS + "How many dogs are in this image?"),
    ("pixmocount", "lmms-eval", PIXMO, "How many dogs are in this image?\nAnswer with a single number."),
    ("timeclock", "study", TIME, TIME_KWARGS + "What time does the clock show in this image?"),
    ("timeclock", "lmms-eval", TIME, "What time does the clock show in this image?\nAnswer with the time in HH:MM "
                                     "format. For example, if it's 3:45, output 3:45."),
    ("pathvqa", "study", PATH, PATH_PROMPT),
    ("pathvqa", "lmms-eval", PATH, PATH_PROMPT),
    # str.capitalize lower-cases the rest: NASA -> nasa
    ("textvqa", "study", TEXT, "What is the nasa logo color?\nAnswer the question using a single word or phrase."),
    ("textvqa", "lmms-eval", TEXT, "What is the nasa logo color?\nAnswer the question using a single word or phrase."),
    ("ai2d", "study", AI2D, "What eats grass?\nA. cow\nB. lion\nC. snake" + MC_POST),
    ("ai2d", "lmms-eval", AI2D, "What eats grass?\nA. cow\nB. lion\nC. snake" + MC_POST),
    ("chartqa", "study", CHART, "What is the value?\nAnswer the question with a single word."),
    ("chartqa", "lmms-eval", CHART, "What is the value?\nAnswer the question with a single word."),
    ("docvqa_val", "study", DOC, "What is the date?\nAnswer the question using a single word or phrase."),
    ("docvqa_val", "lmms-eval", DOC, "What is the date?\nAnswer the question using a single word or phrase."),
    ("infovqa_val", "study", INFO, "How many?\nAnswer the question using a single word or phrase."),
    ("infovqa_val", "lmms-eval", INFO, "How many?\nAnswer the question using a single word or phrase."),
    # empty pre/post prompts: the question's own instruction stays, only stripped
    ("realworldqa", "study", RWQA_OPEN, "Is the road wet? Please answer directly with a single word or number."),
    ("realworldqa", "lmms-eval", RWQA, RWQA["question"]),
    ("seedbench", "study", SEED, "What is shown?\nA. a dog\nB. a cat\nC. a car\nD. a tree" + MC_POST),
    ("seedbench", "lmms-eval", SEED, "What is shown?\nA. a dog\nB. a cat\nC. a car\nD. a tree" + MC_POST),
    ("scienceqa_img", "study", SQA, "Context: Look at the animals.\nWhich is a mammal?\nA. frog\nB. whale\nC. shark"
                                    + MC_POST),
    ("scienceqa_img", "lmms-eval", SQA_NO_HINT, "Which is a mammal?\nA. frog\nB. whale\nC. shark" + MC_POST),
    # post_prompt without a final period; " Please answer yes or no." removed because post_prompt is set
    ("mmstar", "study", MMSTAR, "Which option is right?\nOptions: A: x, B: y, C: z, D: w\n"
                                "Answer with the option's letter from the given choices directly"),
    ("mmstar", "lmms-eval", MMSTAR_YN, "Is it red?\nOptions: A: yes, B: no\n"
                                       "Answer with the option's letter from the given choices directly"),
]


@pytest.mark.parametrize("name,profile,record,expected", PROMPTS, ids=[f"{n}-{p}" for n, p, _, _ in PROMPTS])
def test_prompt_is_byte_identical_to_lmms_eval(name, profile, record, expected):
    assert get_preset(name, profile).prompt(record) == expected


def test_every_preset_and_profile_has_a_prompt_case():
    assert {(n, p) for n, p, _, _ in PROMPTS} == {(n, p) for n in names() for p in ("study", "lmms-eval")}
    assert len(names()) == 13


BOTH = ("study", "lmms-eval")
SCORES = [
    # cub200: the first one-letter word anywhere, lower-cased
    ("cub200", BOTH, CUB, "B", 1.0), ("cub200", BOTH, CUB, "b.", 1.0), ("cub200", BOTH, CUB, "The answer is B", 1.0),
    ("cub200", BOTH, CUB, "A Laysan Albatross", 0.0), ("cub200", BOTH, CUB, "I think B", 0.0),
    ("cub200", BOTH, CUB, "Sooty Albatross", 0.0),   # no one-letter word: first character "s"
    # pixmocount, fork: number words replaced as substrings; main: first digit run compared as a string
    ("pixmocount", ("study",), PIXMO, "5", 1.0), ("pixmocount", ("study",), PIXMO, "five", 1.0),
    ("pixmocount", ("study",), PIXMO, "05", 1.0), ("pixmocount", ("study",), PIXMO, "none", 0.0),  # "n1"
    ("pixmocount", ("study",), PIXMO17, "seventeen", 0.0),                                          # "7teen"
    ("pixmocount", ("study",), PIXMO, "", 0.0),
    ("pixmocount", ("lmms-eval",), PIXMO, "5", 1.0), ("pixmocount", ("lmms-eval",), PIXMO, "05", 0.0),
    ("pixmocount", ("lmms-eval",), PIXMO, "five", 0.0), ("pixmocount", ("lmms-eval",), PIXMO, "There are 5 dogs.", 1.0),
    # timeclock: hour equal, minutes within 1 or exactly 59 apart; no 12/24 h folding
    ("timeclock", BOTH, TIME, "3:45", 1.0), ("timeclock", BOTH, TIME, "03:46", 1.0), ("timeclock", BOTH, TIME, "3:44", 1.0),
    ("timeclock", BOTH, TIME, "3:47", 0.0), ("timeclock", BOTH, TIME, "4:45", 0.0), ("timeclock", BOTH, TIME, "15:45", 0.0),
    ("timeclock", BOTH, TIME59, "3:00", 1.0),
    ("timeclock", BOTH, TIME, "3.45", 0.0),         # periods removed first: "345", one number
    ("timeclock", BOTH, TIME, "It is 3 45", 1.0),   # the first two integers
    # pathvqa: distinct reference words found / prediction words, letters only
    ("pathvqa", BOTH, PATH, "inflammation", 1.0), ("pathvqa", BOTH, PATH, "Acute inflammation.", 1.0),
    ("pathvqa", BOTH, PATH, "chronic inflammation", 0.5), ("pathvqa", BOTH, PATH, "inflammation inflammation", 0.5),
    ("pathvqa", BOTH, PATH, "", 0.0), ("pathvqa", BOTH, PATH_YN, "Yes.", 1.0),
    # textvqa: 3 of 10 answers "red" after processing -> (3 * 2/3 + 7 * 1) / 10
    ("textvqa", BOTH, TEXT, "red", 0.9), ("textvqa", BOTH, TEXT, "The red.", 0.9), ("textvqa", BOTH, TEXT, "green", 0.0),
    ("textvqa", BOTH, TEXT2, "ab", 1.0),        # "a?b": "?" deleted first -> "ab" (the generic vqa gives "b")
    ("textvqa", BOTH, TEXT2, "It's ok", 0.6),   # 2 matches: (2 * 1/3 + 8 * 2/3) / 10
    ("textvqa", BOTH, TEXT_ONE, "2", 0.0),      # one answer: no other answer can match
    ("textvqa", BOTH, TEXT_NONE, "2", 0.0),
    # ai2d: "X." at the start -> X, else the whole answer; exact match without case and punctuation
    ("ai2d", BOTH, AI2D, "A", 1.0), ("ai2d", BOTH, AI2D, "A. cow", 1.0), ("ai2d", BOTH, AI2D, "(A)", 1.0),
    ("ai2d", BOTH, AI2D, " a", 1.0), ("ai2d", BOTH, AI2D, "The answer is A", 0.0), ("ai2d", BOTH, AI2D, "A cow", 0.0),
    ("ai2d", BOTH, AI2D, "cow", 0.0),
    # chartqa: 5% on Python floats, else case-insensitive equality
    ("chartqa", BOTH, CHART, "61", 1.0), ("chartqa", BOTH, CHART, "62", 1.0), ("chartqa", BOTH, CHART, "64.1", 0.0),
    ("chartqa", BOTH, CHART, "61%", 0.0), ("chartqa", BOTH, CHART, " 61.0 ", 1.0),
    ("chartqa", BOTH, CHART_WORD, "japan", 1.0), ("chartqa", BOTH, CHART_WORD, "Japan.", 0.0),
    ("chartqa", BOTH, CHART_BIG, "1,234", 0.0), ("chartqa", BOTH, CHART_PCT, "0.45", 1.0),
    ("chartqa", BOTH, CHART_PCT, "45", 0.0), ("chartqa", BOTH, CHART_ZERO, "0.0", 0.0),   # zero target: strings
    # ANLS: distance of the normalised strings over the longer UN-normalised length (of .upper())
    ("docvqa_val", BOTH, DOC, "May 5, 1998", 1.0), ("docvqa_val", BOTH, DOC, "may 5 1998", 1 - 1 / 11),
    ("docvqa_val", BOTH, DOC_HALF, "abxx", 0.5),     # exactly 0.5 is kept (the generic anls gives 0)
    ("docvqa_val", BOTH, DOC_HALF, "abxxx", 0.0),    # 1 - 3/5 < 0.5
    ("docvqa_val", BOTH, DOC_SZ, "strase", 1 - 1 / 7),   # "Straße".upper() == "STRASSE": length 7, not 6
    ("infovqa_val", BOTH, INFO, "25", 1.0), ("infovqa_val", BOTH, INFO, "25 %", 0.75),
    # realworldqa, fork: whole-answer number words, choice text -> letter, punctuation dropped
    ("realworldqa", ("study",), RWQA, "B", 1.0), ("realworldqa", ("study",), RWQA, "three", 1.0),
    ("realworldqa", ("study",), RWQA, "I see 3 cars", 1.0), ("realworldqa", ("study",), RWQA, "(B)", 1.0),
    ("realworldqa", ("study",), RWQA, "The answer is B.", 0.0), ("realworldqa", ("study",), RWQA, "12", 0.0),  # "2"
    ("realworldqa", ("study",), RWQA_OPEN, "no.", 1.0), ("realworldqa", ("study",), RWQA_OPEN, "No!", 1.0),
    # realworldqa, main: extract_mcq_answer for A-D answers, else lower-case without trailing periods
    ("realworldqa", ("lmms-eval",), RWQA, "B", 1.0), ("realworldqa", ("lmms-eval",), RWQA, "three", 0.0),
    ("realworldqa", ("lmms-eval",), RWQA, "I see 3 cars", 0.0), ("realworldqa", ("lmms-eval",), RWQA, "(B)", 1.0),
    ("realworldqa", ("lmms-eval",), RWQA, "The answer is B.", 1.0),
    ("realworldqa", ("lmms-eval",), RWQA_OPEN, "no.", 1.0), ("realworldqa", ("lmms-eval",), RWQA_OPEN, "No!", 0.0),
    # seedbench: the first character only; video items do not count for seed_image
    ("seedbench", BOTH, SEED, "B", 1.0), ("seedbench", BOTH, SEED, "b", 1.0), ("seedbench", BOTH, SEED, "Blue", 1.0),
    ("seedbench", BOTH, SEED, "The answer is B", 0.0), ("seedbench", BOTH, SEED, "", 0.0),
    ("seedbench", BOTH, SEED_VIDEO, "A", None),
    # scienceqa_img: "B." scores in main only (the fork lower-cases before testing for an upper-case letter)
    ("scienceqa_img", BOTH, SQA, "B", 1.0), ("scienceqa_img", BOTH, SQA, "b", 1.0),
    ("scienceqa_img", ("study",), SQA, "B.", 0.0), ("scienceqa_img", ("study",), SQA, "B. whale", 0.0),
    ("scienceqa_img", ("lmms-eval",), SQA, "B.", 1.0), ("scienceqa_img", ("lmms-eval",), SQA, "B. whale", 1.0),
    ("scienceqa_img", BOTH, SQA, "(B)", 0.0), ("scienceqa_img", BOTH, SQA, "The answer is B", 0.0),
    # mmstar, fork: the first character, or after "(", "option ", "the answer is "
    ("mmstar", ("study",), MMSTAR, "A", 1.0), ("mmstar", ("study",), MMSTAR, "a bird", 1.0),
    ("mmstar", ("study",), MMSTAR, "(A)", 1.0), ("mmstar", ("study",), MMSTAR, "Option A", 1.0),
    ("mmstar", ("study",), MMSTAR, "The answer is A", 1.0), ("mmstar", ("study",), MMSTAR_YN, "Answer: B", 0.0),
    ("mmstar", ("study",), MMSTAR, "Answer: A", 1.0),   # the "a" of "Answer" is the first character
    ("mmstar", ("study",), MMSTAR, "I think A", 0.0), ("mmstar", ("study",), MMSTAR, "", 0.0),
    # mmstar, main: extract_mcq_answer over A-D
    ("mmstar", ("lmms-eval",), MMSTAR, "A", 1.0), ("mmstar", ("lmms-eval",), MMSTAR, "a bird", 0.0),
    ("mmstar", ("lmms-eval",), MMSTAR, "(A)", 1.0), ("mmstar", ("lmms-eval",), MMSTAR, "Answer: A", 1.0),
    ("mmstar", ("lmms-eval",), MMSTAR, "I think A", 1.0), ("mmstar", ("lmms-eval",), MMSTAR, "B", 0.0),
    ("mmstar", ("lmms-eval",), MMSTAR, "", 0.0),
]
SCORE_CASES = [(n, p, r, pred, e) for n, profiles, r, pred, e in SCORES for p in profiles]


@pytest.mark.parametrize("name,profile,record,prediction,expected", SCORE_CASES,
                         ids=[f"{n}-{p}-{pred!r}" for n, p, _, pred, _ in SCORE_CASES])
def test_score_equals_lmms_eval(name, profile, record, prediction, expected):
    assert get_preset(name, profile).score(prediction, record) == expected


def test_every_preset_and_profile_has_score_cases():
    assert {(n, p) for n, p, *_ in SCORE_CASES} == {(n, p) for n in names() for p in ("study", "lmms-eval")}


@pytest.mark.parametrize("name,study,main", [
    ("cub200", ("acc", 16), ("acc", 16)),
    ("pixmocount", ("pixmocount_accuracy", 16), ("acc", 32)),
    ("pathvqa", ("pathvqa_exact_match", 64), ("pathvqa_exact_match", 64)),
    ("textvqa", ("exact_match", 64), ("exact_match", 1024)),        # main sets no limit: llava_onevision's
    ("timeclock", ("both_accuracy", 32), ("both_accuracy", 32)),
    ("ai2d", ("exact_match", 16), ("exact_match", 16)),
    ("chartqa", ("relaxed_overall", 16), ("relaxed_overall", 16)),
    ("docvqa_val", ("anls", 32), ("anls", 32)),
    ("infovqa_val", ("anls", 32), ("anls", 32)),
    ("realworldqa", ("exact_match", 16), ("exact_match", 16)),
    ("seedbench", ("seed_image", 16), ("seed_image", 1024)),
    ("scienceqa_img", ("exact_match", 16), ("exact_match", 16)),
    ("mmstar", ("average", 32), ("average", 1024)),
])
def test_metric_and_generation_limit(name, study, main):
    for profile, (metric, limit) in (("study", study), ("lmms-eval", main)):
        p = get_preset(name, profile)
        assert (p.metric, p.max_new_tokens) == (metric, limit)


def test_default_profile_aliases_and_unknown_names():
    assert get_preset("ai2d").profile == "lmms-eval"
    assert get_preset("docvqa").name == "docvqa_val" and get_preset("infovqa", "study").name == "infovqa_val"
    with pytest.raises(KeyError, match="unknown preset 'ai2d_test'.*mmstar"):
        get_preset("ai2d_test")
    with pytest.raises(ValueError, match="unknown profile 'fork'"):
        get_preset("ai2d", "fork")


def test_mmstar_aggregates_the_mean_of_sub_category_means():
    p = get_preset("mmstar", "study")
    records = [MMSTAR, MMSTAR_YN, dict(MMSTAR, l2_category="image emotion", index=2)]
    scores = [p.score(x, r) for x, r in zip(["A", "A", "A"], records)]
    assert scores == [1.0, 0.0, 1.0]
    assert p.aggregate(scores, records) == 0.75          # (geometry 0.5 + image emotion 1.0) / 2, not 2/3
    tsv_records = [{**r, "l2-category": r["l2_category"]} for r in records]
    for r in tsv_records:
        del r["l2_category"]
    assert p.aggregate(scores, tsv_records) == 0.75      # VLMEvalKit's TSV spells it "l2-category"


def test_seedbench_aggregates_image_items_only():
    p = get_preset("seedbench")
    records = [SEED, SEED_VIDEO, dict(SEED, answer="C")]
    scores = [p.score("B", r) for r in records]
    assert scores == [1.0, None, 0.0] and p.aggregate(scores, records) == 0.5


def _png(size):
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


def test_records_from_a_config_snapshot_feed_prompt_score_and_images(tmp_path):
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for config, question in (("DocVQA", "What is the date?"), ("InfographicVQA", "How many?")):
        (tmp_path / config).mkdir()
        pq.write_table(pa.table({"questionId": ["7"], "question": [question], "answers": [["25%", "25"]],
                                 "image": pa.array([{"bytes": _png((6, 4)), "path": None}], type=image)}),
                       tmp_path / config / "validation-00000-of-00001.parquet")
    p = get_preset("infovqa")
    (record,) = p.records(tmp_path)
    assert p.prompt(record) == "How many?\nAnswer the question using a single word or phrase."
    assert p.score("25", record) == 1.0
    (img,) = p.images(record)
    assert img.mode == "RGB" and img.size == (6, 4)
    (doc,) = get_preset("docvqa_val").records(tmp_path)
    assert doc["question"] == "What is the date?"


def test_images_of_image_lists_and_missing_images():
    frames = [Image.new("L", (2, 2)), Image.new("RGB", (3, 3))]
    assert [im.mode for im in get_preset("seedbench").images(dict(SEED, image=frames))] == ["RGB", "RGB"]
    assert get_preset("scienceqa_img").images(dict(SQA, image=None)) == []
    assert get_preset("cub200").images(dict(CUB, image={"bytes": _png((5, 5)), "path": None}))[0].size == (5, 5)
