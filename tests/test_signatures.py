"""Task signatures: the log-odds formula by hand, planted signatures recovered, the counting task's signature
made of number tokens (synthetic, and the embedded world's pixmocount when the world is present)."""
import json
import math

import numpy as np
import pytest

from probes.signatures import (
    SignatureError,
    assistant_tokens,
    derive,
    log_odds,
    read_answers,
    set_name,
    task_files,
)
from probes.tokensets import is_number_token
from training.chat import encode
from training.families.qwen2_5_vl import make_processor, tiny_tokenizer

CAPTIONS = ["a red square and two blue circles on a white background", "the image shows three green triangles",
            "a close up view of a cat sitting on a wooden table", "a large purple hexagon at the top left corner",
            "there are small dots in the picture", "a yellow star next to a blue circle"] * 4


def test_log_odds_by_hand():
    # token 0: 6 of 10 task tokens, 1 of 20 caption tokens; token 1: 4 / 10 and 19 / 20
    y_t, y_c = np.array([6.0, 4.0, 0.0]), np.array([1.0, 19.0, 0.0])
    delta, z = log_odds(y_t, y_c, prior=0.1)
    a0 = 0.1 * 30
    a = a0 * np.array([7, 23]) / 30
    d0 = math.log((6 + a[0]) / (10 + a0 - 6 - a[0])) - math.log((1 + a[0]) / (20 + a0 - 1 - a[0]))
    z0 = d0 / math.sqrt(1 / (6 + a[0]) + 1 / (1 + a[0]))
    assert delta[0] == pytest.approx(d0, rel=1e-12) and z[0] == pytest.approx(z0, rel=1e-12)
    assert z[0] > 0 > z[1] and np.isnan(z[2])
    with pytest.raises(SignatureError, match="tokens in both corpora"):
        log_odds(np.zeros(3), y_c)


def test_assistant_tokens_are_the_tokens_the_probes_score(tiny_models):
    _, processor = tiny_models("qwen2_5_vl")
    texts = ["12", "yes", "there are 12 small dots", "B"]
    for text, ids in zip(texts, assistant_tokens(processor, texts)):
        ex = encode(processor, None, "x", text)
        assert ids == ex.input_ids[ex.answer_slice].tolist()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next"])
def test_counting_signature_is_number_tokens_and_yes_no_is_not(family, tiny_models):
    _, processor = tiny_models(family)
    counts = [str(n) for n in [2, 3, 5, 7, 12, 4, 9, 1, 3, 5, 7, 2] * 3]
    sig = derive("pixmocount", counts, CAPTIONS, processor)
    assert sig.tokens and sig.number_share() == 1.0, sig.tokens
    assert all(t["z"] >= 1.96 and t["count"] >= 2 for t in sig.tokens)
    assert [t["z"] for t in sig.tokens] == sorted((t["z"] for t in sig.tokens), reverse=True)
    yn = derive("pathvqa", ["yes", "no", "Yes", "no", "yes"] * 5, CAPTIONS, processor)
    assert yn.tokens and yn.number_share() == 0.0
    pieces = {t["token"].strip().lower() for t in yn.tokens}      # the tiny tokenizer may split the words
    assert all(p in "yes" or p in "no" for p in pieces), pieces
    # answers = captions with a count appended: the caption words are not over-represented; the digits are
    # (and the space before them, a token of its own in these vocabularies)
    mixed = derive("mixed", [f"{c} {n}" for c, n in zip(CAPTIONS, [3, 5] * 12)], CAPTIONS, processor)
    assert sum(is_number_token(t["token"]) for t in mixed.tokens) == 2, mixed.tokens
    assert all(is_number_token(t["token"]) or not t["token"].strip() for t in mixed.tokens), mixed.tokens
    assert set_name("TextVQA-val") == "sig_textvqa_val"


def test_planted_signature_recovered_exactly():
    """Answers = the captions with one of three planted words appended (three times): exactly the planted words come out
    (single tokens in a vocabulary trained on these texts), top_k respected; answers distributed as the
    captions give no signature."""
    planted = [" cat", " star", " table"]
    processor = make_processor(tiny_tokenizer(CAPTIONS + ["a cat a star a table"] * 20, vocab_size=600))
    tok = processor.tokenizer
    assert all(len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in planted)
    answers = [c + planted[i % 3] * 3 for i, c in enumerate(CAPTIONS)]
    sig = derive("planted", answers, CAPTIONS, processor, top_k=10)
    assert sorted(t["token"] for t in sig.tokens) == sorted(planted)
    assert len(derive("planted", answers, CAPTIONS, processor, top_k=2).tokens) == 2
    assert derive("none", CAPTIONS[:6], CAPTIONS, processor).tokens == []


def test_task_files_from_the_run_data_and_errors(tmp_path):
    from .llava_fixture import write_llava_root

    root = write_llava_root(tmp_path / "d", n=4)
    man = {"tasks": ["pixmocount", "pathvqa"], "config": {"data": {"root": str(root), "tasks": {}}}}
    files = task_files(man)
    assert files["pixmocount"] == (root / "tasks" / "pixmocount" / "train.json").resolve()
    assert task_files(man, files={"pixmocount": "/x.json"})["pixmocount"].as_posix() == "/x.json"
    with pytest.raises(SignatureError, match="'nosuch'"):
        task_files(man, ["nosuch"])
    with pytest.raises(SignatureError, match="no tasks"):
        task_files({"tasks": []})


def test_world_pixmocount_signature_is_dominated_by_number_tokens(tmp_path):
    from training.world.build import write_world
    from training.world.tokenizers import world_tokenizer

    root = write_world(tmp_path / "world", size="tiny")
    info = json.loads((root / "world.json").read_text())
    processor = make_processor(world_tokenizer("qwen2_5_vl", root))
    captions = [r["conversations"][1]["value"] for r in json.loads((root / info["captions"]).read_text())]
    man = {"tasks": ["pixmocount", "pathvqa"], "config": {"data": {"root": str(root), "tasks": {}}}}
    sig = derive("pixmocount", read_answers(task_files(man)["pixmocount"]), captions, processor)
    assert sig.tokens and sig.number_share() >= 0.8, sig.tokens
    assert is_number_token(sig.tokens[0]["token"])
