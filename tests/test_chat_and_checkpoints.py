"""The shared encoding (prompt / answer / end-of-turn spans) and checkpoint folders (full, delta, atomic)."""
import copy

import pytest
import torch
from PIL import Image

from training.chat import collate, encode
from training.checkpoints import atomic_dir, is_checkpoint, load_model, load_processor, save_delta, save_full
from training.families import FAMILIES, CheckpointError

from .conftest import FAMILY_NAMES


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_answer_span_holds_exactly_the_answer_tokens(name, tiny_models):
    _, processor = tiny_models(name)
    tok = processor.tokenizer
    ex = encode(processor, Image.new("RGB", (40, 30)), "How many dots?", "there are 12 dots")
    assert tok.decode(ex.input_ids[ex.answer_slice]).strip() == "there are 12 dots"
    assert tok.eos_token in tok.decode(ex.input_ids[ex.eot_slice])
    prompt_only = encode(processor, Image.new("RGB", (40, 30)), "How many dots?")
    assert torch.equal(prompt_only.input_ids, ex.input_ids[:ex.prompt_len])


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_answer_logits(name, side, tiny_models):
    model, processor = tiny_models(name)
    fam = FAMILIES[name]
    exs = [encode(processor, Image.new("RGB", (40, 30), (9, 9, 200)), "Describe the image.", "a red square"),
           encode(processor, Image.new("RGB", (30, 70)), "How many?", "12")]
    pad = processor.tokenizer.pad_token_id
    drop = ("answer_mask", "eot_mask")
    batch = collate(exs, fam, pad, side)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k not in drop}).logits
        for i, ex in enumerate(exs):
            one = collate([ex], fam, pad)
            ref = model(**{k: v for k, v in one.items() if k not in drop}).logits[0][one["answer_mask"][0]]
            torch.testing.assert_close(logits[i][batch["answer_mask"][i]], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_delta_round_trip_equals_the_full_model(name, tiny_models, tmp_path):
    base, processor = tiny_models(name)
    save_full(base, processor, tmp_path / "base")
    tuned = copy.deepcopy(base)
    names = [n for n, _ in tuned.named_parameters() if ".mlp.gate_proj" in n and "language_model" in n]
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if n in names:
                p.add_(0.5)
    save_delta(tuned, processor, tmp_path / "run" / "stage-01", tmp_path / "base", names, FAMILIES[name])
    assert is_checkpoint(tmp_path / "run" / "stage-01")
    loaded = load_model(tmp_path / "run" / "stage-01")
    for (n, a), (_, b) in zip(loaded.state_dict().items(), tuned.state_dict().items()):
        assert torch.equal(a, b), n
    assert load_processor(tmp_path / "run" / "stage-01").tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_delta_with_missing_base_names_both(tiny_models, tmp_path):
    base, processor = tiny_models("qwen2_5_vl")
    save_full(base, processor, tmp_path / "base")
    save_delta(base, processor, tmp_path / "d", tmp_path / "base", ["lm_head.weight"], FAMILIES["qwen2_5_vl"])
    import shutil
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'd'}.*base checkpoint.*does not exist"):
        load_model(tmp_path / "d")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "stage") as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "stage") as tmp:
        (tmp / "ok").write_text("1")
    assert (tmp_path / "stage" / "ok").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]


def test_processor_without_tokenizer_files_is_refused(tiny_models, tmp_path):
    """AutoProcessor would quietly build a one-token tokenizer for such a folder."""
    _, processor = tiny_models("qwen2_5_vl")
    processor.save_pretrained(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).unlink()
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no tokenizer: no tokenizer.json"):
        load_processor(tmp_path)
