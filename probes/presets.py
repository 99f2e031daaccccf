"""The study's 13 benchmarks as lmms-eval defines them: data layout, prompt, generation limit, scorer.

    from probes.presets import get_preset
    p = get_preset("ai2d", profile="lmms-eval")      # or profile="study"
    p.prompt(record)            # the text lmms-eval builds, before the model's chat template
    p.score(prediction, record) # the primary metric's per-item value in [0, 1]; None: the item does not count
    p.aggregate(scores, records)# the benchmark's score in [0, 1] as lmms-eval aggregates it
    p.images(record)            # the record's images, RGB, as the task's doc_to_visual gives them
    p.metric, p.max_new_tokens, p.records(path)

Profiles (../shared/benchmarks/LMMS_EVAL_SPEC.json gives every source location; docs/benchmarks.md the table):
- `study`: LMM_CL's bundled lmms-eval 0.3 fork, as the paper ran it, quirks included: cub200, pixmocount
  and timeclock get the fork's prompt bug (the task's kwargs dict printed in front of the question, the
  post prompt never appended).
- `lmms-eval` (default): current lmms-eval main. The fork-only tasks cub200, pathvqa and timeclock are the
  fork's tasks with the prompt bug fixed; pixmocount is main's `pixmo_count` (prompt, limit, scorer) on
  the study's test set. Where main sets no generation limit (textvqa, seedbench, mmstar) the limit is
  1024, the default of lmms-eval's llava_onevision wrapper, which the study's model runs through.

Predictions are the model's decoded answers; the scorers strip them as lmms-eval does and never cut them
at the tasks' `until` strings (llava_onevision drops `until`).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from training.dataset_files import Rows, open_image, read_rows

from . import lmms_scorers  # noqa: F401  (registers the lmms_* scorers)
from .scorers import get_scorer

PROFILES = ("study", "lmms-eval")
ALIASES = {"docvqa": "docvqa_val", "infovqa": "infovqa_val", "textvqa_val": "textvqa"}
MODEL_DEFAULT_MAX_NEW_TOKENS = 1024   # llava_onevision's, where a task sets none

MC_POST = "\nAnswer with the option's letter from the given choices directly."
MMSTAR_POST = "\nAnswer with the option's letter from the given choices directly"   # sic: no period
SHORT_POST = "\nAnswer the question using a single word or phrase."


@dataclass(frozen=True)
class Preset:
    name: str
    profile: str
    dataset: str                  # the Hub dataset the profile's task loads
    config: str | None
    split: str
    metric: str                   # the primary metric, as lmms-eval names it in its results
    scorer: str                   # the registered scorer computing it per item (probes.lmms_scorers)
    max_new_tokens: int
    prompt_source: str            # where in lmms-eval the prompt is built
    build_prompt: Callable[[dict], str] = field(repr=False)
    references: Callable[[dict], object] = field(repr=False)
    scorer_fields: Callable[[dict], dict] = field(default=lambda r: {}, repr=False)
    counts: Callable[[dict], bool] = field(default=lambda r: True, repr=False)
    by_group: Callable[[dict], str] | None = field(default=None, repr=False)  # macro-average over groups

    def prompt(self, record: dict) -> str:
        return self.build_prompt(record)

    def score(self, prediction: str, record: dict) -> float | None:
        if not self.counts(record):
            return None
        return get_scorer(self.scorer)(prediction, self.references(record), **self.scorer_fields(record))

    def aggregate(self, scores: Iterable[float | None], records: Iterable[dict]) -> float:
        """The mean of the items that count, or (MMStar) the mean of the per-group means."""
        pairs = [(s, r) for s, r in zip(scores, records, strict=True) if s is not None]
        if not pairs:
            raise ValueError(f"{self.name}: no scored items to aggregate")
        if self.by_group is None:
            return sum(s for s, _ in pairs) / len(pairs)
        groups = defaultdict(list)
        for s, r in pairs:
            groups[self.by_group(r)].append(s)
        return sum(sum(g) / len(g) for g in groups.values()) / len(groups)

    def images(self, record: dict) -> list:
        value = record.get("image")
        values = [] if value is None else value if isinstance(value, list) else [value]
        return [(open_image(v) if isinstance(v, (dict, bytes)) else v).convert("RGB") for v in values]

    def records(self, path, strict: bool = False) -> Rows:
        return read_rows(path, self.config, self.split, strict)


def get_preset(name: str, profile: str = "lmms-eval") -> Preset:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; profiles: {', '.join(PROFILES)}")
    key = ALIASES.get(name, name)
    if key not in _BUILDERS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(names())} (aliases: {', '.join(ALIASES)})")
    return _BUILDERS[key](profile)


def names() -> list[str]:
    return list(_BUILDERS)


# -- prompts ---------------------------------------------------------------------------------------
def fork_bug_prefix(pre_prompt: str, post_prompt: str) -> str:
    """What the fork's cub200/pixmocount/timeclock put in front of the question: their doc_to_text takes
    (doc, pre_prompt, post_prompt) but is called with the whole kwargs dict (its 'default' entry merged
    into it) as pre_prompt, so the dict is printed and post_prompt stays ''."""
    return str({"default": {"pre_prompt": pre_prompt, "post_prompt": post_prompt},
                "pre_prompt": pre_prompt, "post_prompt": post_prompt})


def _lettered(options) -> str:
    return "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options))


def _letter(options, index) -> str:
    return [chr(ord("A") + i) for i in range(len(options))][int(index)]


def _sqa_prompt(r: dict) -> str:
    hint = r["hint"]
    context = f"Context: {hint}\n" if hint else hint   # a falsy hint is printed as it is (None -> "None")
    return f"{context}{r['question']}\n{_lettered(r['choices'])}{MC_POST}"


def _seed_prompt(r: dict) -> str:
    options = [r["choice_a"], r["choice_b"], r["choice_c"], r["choice_d"]]
    return f"{r['question']}\n{_lettered(options)}\nAnswer with the option's letter from the given choices directly."


def _mmstar_prompt(r: dict) -> str:
    return r["question"].strip().replace(" Please answer yes or no.", "") + MMSTAR_POST


def _mmstar_l2(r: dict) -> str:
    return r["l2_category"] if "l2_category" in r else r["l2-category"]   # HF parquet / VLMEvalKit TSV


def _answer(r: dict):
    return r["answer"]


# -- the 13 ----------------------------------------------------------------------------------------
def _fork_only(name, dataset, config, split, metric, scorer, max_new_tokens, source, pre, post, question,
               bug=True):
    """A task only the fork has: with the bug, `study` prints the kwargs dict in front of the question
    (`fork_bug_prefix`); otherwise pre_prompt + question + post_prompt, as the task's function builds them
    when called as intended (`lmms-eval`, and pathvqa, whose function takes the kwargs dict)."""
    def build(profile):
        if bug and profile == "study":
            prompt = lambda r: fork_bug_prefix(pre, post) + question(r)   # noqa: E731
        else:
            prompt = lambda r: f"{pre}{question(r)}{post}"                # noqa: E731
        return Preset(name, profile, dataset, config, split, metric, scorer, max_new_tokens, source, prompt, _answer)
    return build


def _pixmocount(profile: str) -> Preset:
    if profile == "study":
        post = "\nAnswer with integer and nothing else. For example, if the answer is 1, you should output 1."
        return Preset("pixmocount", profile, "Jessemel/pixmocount-test", None, "train", "pixmocount_accuracy",
                      "lmms_pixmocount", 16, "LMM_CL lmms-eval/lmms_eval/tasks/pixmocount/utils.py:pixmocount_doc_to_text",
                      lambda r: fork_bug_prefix("", post) + r["question"].replace("\n<image>", ""), _answer)
    return Preset("pixmocount", profile, "Jessemel/pixmocount-test", None, "train", "acc", "lmms_pixmo_count", 32,
                  "lmms_eval/tasks/pixmo_count/utils.py:pixmo_count_doc_to_text",
                  lambda r: r["question"].replace("<image>", "").strip() + "\nAnswer with a single number.", _answer)


def _standard(name, datasets, config, split, metric, scorers, max_new_tokens, source, prompt, references=_answer,
              **extra):
    """A task both versions have: per profile (a pair: study, lmms-eval) its dataset id, scorer, generation
    limit and any per-profile extra field."""
    def build(profile):
        i = PROFILES.index(profile)
        fields = {k: v[i] if isinstance(v, tuple) else v for k, v in extra.items()}
        return Preset(name, profile, datasets[i], config, split, metric, scorers[i], max_new_tokens[i],
                      f"lmms_eval/tasks/{source}", prompt, references, **fields)
    return build


def _both(value):
    return (value, value)


_BUILDERS: dict[str, Callable[[str], Preset]] = {
    "cub200": _fork_only(
        "cub200", "Jessemel/cub200-test", None, "train", "acc", "lmms_cub200", 16,
        "LMM_CL lmms-eval/lmms_eval/tasks/cub200/utils.py:cub200_doc_to_text", "",
        "Answer with the option's letter from the given choices directly.",
        lambda r: r["question"].replace("\n<image>", "").replace("<image>", "")),
    "pixmocount": _pixmocount,
    "pathvqa": _fork_only(
        "pathvqa", "flaviagiammarino/path-vqa", "default", "test", "pathvqa_exact_match", "lmms_pathvqa_em", 64,
        "LMM_CL lmms-eval/lmms_eval/tasks/pathvqa/utils.py:pathvqa_doc_to_text",
        "Look at the medical image and answer the following question: ",
        "\nFor questions that can be answered with a yes or no, just answer yes or no. "
        "Otherwise, provide an answer in the medical domain.",
        lambda r: r["question"], bug=False),
    "textvqa": _standard(
        "textvqa", ("lmms-lab/textvqa", "lmms-lab-encoder/textvqa"), "default", "validation", "exact_match",
        _both("lmms_vqa"), (64, MODEL_DEFAULT_MAX_NEW_TOKENS), "textvqa/utils.py:textvqa_doc_to_text",
        lambda r: r["question"].capitalize() + SHORT_POST, references=lambda r: r.get("answers")),
    "timeclock": _fork_only(
        "timeclock", "AvaXiao/clockreading-time", None, "train", "both_accuracy", "lmms_timeclock", 32,
        "LMM_CL lmms-eval/lmms_eval/tasks/timeclock/utils.py:timeclock_doc_to_text", "",
        "\nAnswer with the time in HH:MM format. For example, if it's 3:45, output 3:45.",
        lambda r: r["question"].replace("\n<image>", "")),
    "ai2d": _standard(
        "ai2d", ("lmms-lab/ai2d", "lmms-lab-encoder/ai2d"), "default", "test", "exact_match", _both("lmms_ai2d"),
        _both(16), "ai2d/utils.py:ai2d_doc_to_text",
        lambda r: f"{r['question']}\n{_lettered(r['options'])}{MC_POST}",
        references=lambda r: _letter(r["options"], r["answer"])),
    "chartqa": _standard(
        "chartqa", ("lmms-lab/ChartQA", "lmms-lab-encoder/ChartQA"), "default", "test", "relaxed_overall",
        _both("lmms_relaxed"), _both(16), "chartqa/utils.py:chartqa_doc_to_text",
        lambda r: r["question"] + "\nAnswer the question with a single word."),
    "docvqa_val": _standard(
        "docvqa_val", ("lmms-lab/DocVQA", "lmms-lab-encoder/DocVQA"), "DocVQA", "validation", "anls",
        _both("lmms_anls"), _both(32), "docvqa/utils.py:docvqa_doc_to_text",
        lambda r: r["question"] + SHORT_POST, references=lambda r: r["answers"]),
    "infovqa_val": _standard(
        "infovqa_val", ("lmms-lab/DocVQA", "lmms-lab-encoder/DocVQA"), "InfographicVQA", "validation", "anls",
        _both("lmms_anls"), _both(32), "infovqa/utils.py:infovqa_doc_to_text",
        lambda r: r["question"] + SHORT_POST, references=lambda r: r["answers"]),
    "realworldqa": _standard(
        "realworldqa", ("lmms-lab/RealWorldQA", "lmms-lab-encoder/RealWorldQA"), "default", "test", "exact_match",
        ("lmms_realworldqa_fork", "lmms_realworldqa"), _both(16), "realworldqa/utils.py:realworldqa_doc_to_text",
        lambda r: r["question"].strip(), scorer_fields=(lambda r: {"question": r["question"]}, lambda r: {})),
    "seedbench": _standard(
        "seedbench", ("lmms-lab/SEED-Bench", "lmms-lab-encoder/SEED-Bench"), "default", "test", "seed_image",
        _both("lmms_seed"), (16, MODEL_DEFAULT_MAX_NEW_TOKENS), "seedbench/utils.py:seed_doc_to_text",
        _seed_prompt, counts=lambda r: r["data_type"] == "image"),
    "scienceqa_img": _standard(
        "scienceqa_img", ("lmms-lab/ScienceQA", "lmms-lab-encoder/ScienceQA"), "ScienceQA-IMG", "test",
        "exact_match", ("lmms_sqa_fork", "lmms_sqa"), _both(16), "scienceqa/utils.py:sqa_doc_to_text",
        _sqa_prompt, references=lambda r: _letter(r["choices"], r["answer"])),
    "mmstar": _standard(
        "mmstar", _both("Lin-Chen/MMStar"), None, "val", "average", ("lmms_mmstar_fork", "lmms_mcq_extract"),
        (32, MODEL_DEFAULT_MAX_NEW_TOKENS), "mmstar/utils.py:mmstar_doc_to_text", _mmstar_prompt,
        by_group=_mmstar_l2),
}
