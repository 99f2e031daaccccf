"""Each family's tiny model is real: right class, small, processor + chat template, saves and reloads."""
import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from training.families import (
    FAMILIES,
    CheckpointError,
    check_checkpoint_folder,
    family_of_checkpoint,
    get_family,
)

from .conftest import FAMILY_NAMES


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_tiny_model_is_small_and_runs_with_an_image(name, tiny_models):
    model, processor = tiny_models(name)
    fam = FAMILIES[name]
    assert type(model).__name__ == fam.model_class_name
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[prompt], images=[Image.new("RGB", (40, 30), (200, 10, 10))], return_tensors="pt")
    image_token_id = processor.tokenizer.convert_tokens_to_ids(fam.image_token)
    assert (enc["input_ids"] == image_token_id).sum() > 0, "the processor expanded no image tokens"
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_tiny_checkpoint_reloads_with_auto_classes(name, tiny_checkpoints, tiny_models):
    path = tiny_checkpoints(name)
    assert family_of_checkpoint(path).name == name
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    ref, _ = tiny_models(name)
    for (n, p), (n2, p2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert n == n2 and torch.equal(p, p2)
    assert processor.tokenizer.chat_template
    loaded = get_family(name).load(path)
    assert type(loaded).__name__ == FAMILIES[name].model_class_name


def test_unknown_family_names_the_valid_ones():
    with pytest.raises(ValueError, match="qwen2_5_vl.*llava_onevision.*llava_next"):
        get_family("llava-1.5")


def test_folder_without_weights_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(CheckpointError, match=str(tmp_path) + ".*no \\*.safetensors"):
        check_checkpoint_folder(tmp_path)


def test_pickle_only_folder_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=str(tmp_path) + ".*pickle.*--allow-pickle"):
        check_checkpoint_folder(tmp_path)
    check_checkpoint_folder(tmp_path, allow_pickle=True)  # allowed only when asked


def test_missing_folder_and_config_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        check_checkpoint_folder(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        check_checkpoint_folder(tmp_path)


def test_unsupported_model_type_is_named(tmp_path):
    """A model type with no override is discovered from its config; one nothing can read is named."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nonesuch"}))
    with pytest.raises(CheckpointError, match="'nonesuch' is not an overridden family and discovery cannot read it"):
        family_of_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    fam = family_of_checkpoint(tmp_path)
    assert (fam.name, fam.vision, fam.layers) == ("llava", "model.vision_tower", "model.language_model.layers")
