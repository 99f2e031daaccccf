"""Caption sets: every supported format gives the same samples and hash; bad input is named clearly."""
import io
import json

import pandas as pd
import pytest
from PIL import Image

from probes.captions import CaptionDataError, load_captions


def lcs_records(n):
    return [{"id": f"{i:09d}", "image": f"00000/{i:09d}.jpg",
             "conversations": [{"from": "human", "value": f"<image>\nWrite a terse but informative summary {i % 2}."},
                               {"from": "gpt", "value": f"a photo of {i} red squares"}]} for i in range(n)]


@pytest.fixture
def lcs(tmp_path):
    """An LCS-558K-shaped folder: the JSON and images/00000/*.jpg."""
    (tmp_path / "images" / "00000").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (10 + i, 12), (i * 40, 0, 0)).save(tmp_path / "images" / "00000" / f"{i:09d}.jpg")
    (tmp_path / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(lcs_records(6)))
    return tmp_path


def png_bytes(i):
    buf = io.BytesIO()
    Image.new("RGB", (10 + i, 12), (i * 40, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_lcs_json_first_n(lcs):
    cs = load_captions(lcs / "blip_laion_cc_sbu_558k.json", lcs / "images", num_samples=4)
    assert [s.id for s in cs.samples] == [f"{i:09d}" for i in range(4)]
    assert cs.samples[1].instruction == "Write a terse but informative summary 1."
    assert cs.samples[2].caption == "a photo of 2 red squares"
    assert cs.samples[3].open_image().size == (13, 12)
    assert cs.name == "blip_laion_cc_sbu_558k.json" and len(cs.hash) == 16


def test_default_is_first_1000_or_all(lcs):
    assert len(load_captions(lcs / "blip_laion_cc_sbu_558k.json", lcs / "images").samples) == 6


def test_random_n_is_seeded_and_hash_tracks_the_subset(lcs):
    f, im = lcs / "blip_laion_cc_sbu_558k.json", lcs / "images"
    a = load_captions(f, im, 3, sample="random", seed=1)
    b = load_captions(f, im, 3, sample="random", seed=1)
    c = load_captions(f, im, 3, sample="random", seed=2)
    assert [s.id for s in a.samples] == [s.id for s in b.samples] and a.hash == b.hash
    assert [s.id for s in a.samples] != [s.id for s in c.samples] and a.hash != c.hash
    first = load_captions(f, im, 3)
    recs = lcs_records(6)
    recs[1]["conversations"][1]["value"] = "a photo of 1 blue square"     # one caption edited
    f.write_text(json.dumps(recs))
    assert load_captions(f, im, 3).hash != first.hash


def test_hash_does_not_depend_on_where_the_data_lies(lcs, tmp_path_factory):
    import shutil

    moved = tmp_path_factory.mktemp("elsewhere") / "lcs"
    shutil.copytree(lcs, moved)
    a = load_captions(lcs / "blip_laion_cc_sbu_558k.json", lcs / "images", 4)
    b = load_captions(moved / "blip_laion_cc_sbu_558k.json", moved / "images", 4)
    assert a.hash == b.hash and a.samples[0].image != b.samples[0].image


def test_jsonl_parquet_and_hf_dataset_give_the_same_samples(lcs, tmp_path):
    import datasets

    ref = load_captions(lcs / "blip_laion_cc_sbu_558k.json", lcs / "images", 5)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in lcs_records(6)) + "\n")
    jl = load_captions(tmp_path / "c.jsonl", lcs / "images", 5)
    assert [(s.id, s.instruction, s.caption, s.image) for s in jl.samples] == \
        [(s.id, s.instruction, s.caption, s.image) for s in ref.samples]
    assert jl.hash == ref.hash

    flat = [{"id": r["id"], "instruction": r["conversations"][0]["value"].replace("<image>\n", ""),
             "caption": r["conversations"][1]["value"], "image": {"bytes": png_bytes(i), "path": None}}
            for i, r in enumerate(lcs_records(6))]
    pd.DataFrame(flat).to_parquet(tmp_path / "c.parquet")
    pq = load_captions(tmp_path / "c.parquet", num_samples=5)
    assert [(s.id, s.instruction, s.caption) for s in pq.samples] == \
        [(s.id, s.instruction, s.caption) for s in ref.samples]
    assert pq.samples[4].open_image().size == (14, 12)

    ds = datasets.Dataset.from_dict({"id": [r["id"] for r in flat], "instruction": [r["instruction"] for r in flat],
                                     "caption": [r["caption"] for r in flat],
                                     "image": [Image.open(io.BytesIO(png_bytes(i))) for i in range(6)]},
                                    features=datasets.Features({"id": datasets.Value("string"),
                                                                "instruction": datasets.Value("string"),
                                                                "caption": datasets.Value("string"),
                                                                "image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "hfds"))
    hf = load_captions(tmp_path / "hfds", num_samples=5)
    assert [(s.id, s.caption) for s in hf.samples] == [(s.id, s.caption) for s in ref.samples]
    assert hf.samples[2].open_image().size == (12, 12)


def test_missing_image_is_named(lcs):
    (lcs / "images" / "00000" / "000000002.jpg").unlink()
    with pytest.raises(CaptionDataError, match=r"record '000000002'.*images/00000/000000002.jpg does not exist"):
        load_captions(lcs / "blip_laion_cc_sbu_558k.json", lcs / "images", 4)
    assert len(load_captions(lcs / "blip_laion_cc_sbu_558k.json", lcs / "images", 2).samples) == 2  # not selected


def test_image_paths_cannot_escape_the_root(lcs):
    for bad in ("../secret.jpg", "/etc/passwd"):
        recs = lcs_records(2)
        recs[1]["image"] = bad
        (lcs / "x.json").write_text(json.dumps(recs))
        with pytest.raises(CaptionDataError, match="must be relative to the images root"):
            load_captions(lcs / "x.json", lcs / "images")
    (lcs / "images" / "link.jpg").symlink_to(lcs / "blip_laion_cc_sbu_558k.json")
    recs = lcs_records(1)
    recs[0]["image"] = "link.jpg"
    (lcs / "x.json").write_text(json.dumps(recs))
    with pytest.raises(CaptionDataError, match="resolves outside the images root"):
        load_captions(lcs / "x.json", lcs / "images")


def test_malformed_json_names_file_and_line(lcs, tmp_path):
    (tmp_path / "bad.json").write_text('[{"id": 1,\n "image": "a.jpg" "conversations": []}]')
    with pytest.raises(CaptionDataError, match=r"bad.json: malformed JSON at line 2"):
        load_captions(tmp_path / "bad.json", lcs / "images")
    (tmp_path / "bad.jsonl").write_text(json.dumps(lcs_records(1)[0]) + "\n{oops\n")
    with pytest.raises(CaptionDataError, match=r"bad.jsonl: malformed JSON on line 2"):
        load_captions(tmp_path / "bad.jsonl", lcs / "images")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(CaptionDataError, match=r"bad.parquet: cannot read"):
        load_captions(tmp_path / "bad.parquet", lcs / "images")


@pytest.mark.parametrize("caption", ["", "   ", None])
def test_empty_caption_is_named(lcs, caption):
    recs = lcs_records(3)
    recs[2]["conversations"][1]["value"] = caption
    (lcs / "x.json").write_text(json.dumps(recs))
    with pytest.raises(CaptionDataError, match=r"x.json: record '000000002' has an empty caption"):
        load_captions(lcs / "x.json", lcs / "images")


def test_more_samples_than_exist(lcs):
    with pytest.raises(CaptionDataError, match=r"asked for 7 samples but it has only 6 records"):
        load_captions(lcs / "blip_laion_cc_sbu_558k.json", lcs / "images", 7)


def test_other_bad_input(lcs, tmp_path):
    with pytest.raises(CaptionDataError, match="does not exist"):
        load_captions(tmp_path / "none.json")
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(CaptionDataError, match="e.json: no records"):
        load_captions(tmp_path / "e.json")
    (tmp_path / "d.json").write_text(json.dumps(lcs_records(2) + lcs_records(1)))
    with pytest.raises(CaptionDataError, match="appears twice"):
        load_captions(tmp_path / "d.json", lcs / "images")
    (tmp_path / "n.json").write_text(json.dumps([{"id": 1, "image": "x.jpg", "caption": "c"}]))
    with pytest.raises(CaptionDataError, match="record '1' has no instruction"):
        load_captions(tmp_path / "n.json", lcs / "images")
