"""training.prepare: each target's public layout, faked tiny in tmp_path, into a data root training.data reads."""
import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from training.data import resolve_root, resolve_task
from training.prepare import CUB_TEMPLATES, MC_INSTRUCTION, PrepareError, main, prepare
from training.records import load_records, record_turns


def jpeg(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="JPEG")
    return buf.getvalue()


def cub_folder(root):
    """3 classes, 4 images (image 4 is listed but missing), image 3 in the test split."""
    root.mkdir()
    (root / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n3 003.Sooty_Albatross\n")
    rels = {1: "001.Black_footed_Albatross/a.jpg", 2: "002.Laysan_Albatross/b.jpg",
            3: "003.Sooty_Albatross/c.jpg", 4: "003.Sooty_Albatross/gone.jpg"}
    (root / "images.txt").write_text("".join(f"{i} {r}\n" for i, r in rels.items()))
    (root / "image_class_labels.txt").write_text("1 1\n2 2\n3 3\n4 3\n")
    (root / "train_test_split.txt").write_text("1 1\n2 1\n3 0\n4 1\n")
    for i, rel in list(rels.items())[:3]:
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "images" / rel).write_bytes(jpeg((40 * i, 0, 0)))
    return root


def hub_parquet(folder, splits: dict[str, list[dict]]):
    """A Hub snapshot: data/SPLIT-00000-of-00001.parquet, images as datasets' {bytes, path} structs."""
    (folder / "data").mkdir(parents=True)
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder


def img(data=None):
    return {"bytes": data if data is not None else jpeg(), "path": None}


def test_cub_folder_becomes_the_studys_multiple_choice_with_a_seeded_draw(tmp_path, capsys):
    src = cub_folder(tmp_path / "CUB_200_2011")
    splits = {s.name: s for s in prepare("cub200", src, tmp_path / "out", seed=3)}
    assert [len(splits["train"].records), len(splits["test"].records)] == [2, 1]
    assert splits["train"].bad == ["image 4 (003.Sooty_Albatross/gone.jpg): image file "
                                   f"{src}/images/003.Sooty_Albatross/gone.jpg is missing or unreadable"]
    out = capsys.readouterr().out
    assert "cub200 train: 2 records, 1 bad rows: image 4" in out and "cub200 test: 1 records, 0 bad rows" in out

    rec = json.loads((tmp_path / "out/tasks/cub200/train.json").read_text())[0]
    human, letter = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
    template, instruction, *options = human.removeprefix("<image>\n").split("\n")
    assert template in CUB_TEMPLATES and instruction == MC_INSTRUCTION
    assert sorted(o[3:] for o in options) == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert [o[:3] for o in options] == ["A. ", "B. ", "C. "]
    assert options[ord(letter) - 65] == f"{letter}. Black footed Albatross"   # image 1 is class 1

    again = prepare("cub200", src, tmp_path / "again", seed=3, echo=lambda s: None)
    assert again[0].records == splits["train"].records          # the draw depends on the seed only
    other = [prepare("cub200", src, tmp_path / f"s{s}", seed=s, echo=lambda s: None)[0].records for s in range(6)]
    assert len({json.dumps(r) for r in other}) > 1
    summary = json.loads((tmp_path / "out/tasks/cub200/prepare.json").read_text())
    assert summary["seed"] == 3 and summary["splits"]["train"]["bad"] == splits["train"].bad


def test_prepared_root_resolves_as_a_training_data_root_and_records_load(tmp_path):
    src = cub_folder(tmp_path / "CUB_200_2011")
    out = tmp_path / "root"
    prepare("cub200", src, out, echo=lambda s: None)
    hub_parquet(tmp_path / "path-vqa", {
        "train": [{"image": img(), "question": "is this benign?", "answer": "yes"}],
        "test": [{"image": img(), "question": "what is shown?", "answer": "necrosis"}]})
    prepare("pathvqa", tmp_path / "path-vqa", out, echo=lambda s: None)

    from training.config import load_config
    cfg = load_config("toy-tiny", [f"data.root={out}", "tasks=[cub200,pathvqa]"])
    dr = resolve_root(cfg["data"])
    for name in ("cub200", "pathvqa"):
        task = resolve_task(name, cfg["data"], dr)
        assert task.test == out / "tasks" / name / "test.json" and task.test.is_file()
        record = load_records(task.train)[0]
        assert (task.images / record["image"]).is_file()
        Image.open(task.images / record["image"]).verify()
    assert record_turns(load_records(out / "tasks/pathvqa/train.json")[0]) == [("is this benign?", "yes")]


def test_pathvqa_and_textvqa_parquet_with_bad_rows_named(tmp_path, capsys):
    hub_parquet(tmp_path / "path-vqa", {
        "train": [{"image": img(), "question": "q1", "answer": "yes"},
                  {"image": img(b"not an image"), "question": "q2", "answer": "no"},
                  {"image": img(), "question": "q3", "answer": None}],
        "validation": [{"image": img(), "question": "q4", "answer": "no"}],
        "test": [{"image": img(), "question": "q5", "answer": "no"}]})
    splits = {s.name: s for s in prepare("pathvqa", tmp_path / "path-vqa", tmp_path / "out")}
    assert {n: len(s.records) for n, s in splits.items()} == {"train": 1, "validation": 1, "test": 1}
    assert any("row 1: image does not open" in b for b in splits["train"].bad)
    assert "train row 2: no 'answer' text" in splits["train"].bad
    assert "pathvqa train: 1 records, 2 bad rows" in capsys.readouterr().out

    hub_parquet(tmp_path / "textvqa", {
        "train": [{"image": img(), "question": "what brand?", "question_id": 7,
                   "answers": ["nike", "Nike", "nike", "adidas"]}],
        "validation": [{"image": img(), "question": "what year?", "question_id": 8, "answers": ["1990"]}],
        "test": [{"image": img(), "question": "unanswered", "question_id": 9, "answers": None}]})
    splits = {s.name: s for s in prepare("textvqa", tmp_path / "textvqa", tmp_path / "out")}
    assert set(splits) == {"train", "test"}           # test.json is the validation split, the one evaluated
    train = json.loads((tmp_path / "out/tasks/textvqa/train.json").read_text())
    assert train[0]["id"] == "textvqa-train-7" and train[0]["conversations"][1]["value"] == "nike"
    test = json.loads((tmp_path / "out/tasks/textvqa/test.json").read_text())
    assert test[0]["conversations"][1]["value"] == "1990"
    # an image shared by rows is written once (images are named by their bytes)
    assert len(list((tmp_path / "out/images/textvqa").iterdir())) == 1


def test_pixmocount_counts_and_names_the_row_whose_image_was_not_downloaded(tmp_path, capsys):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    data = {k: jpeg((k * 50, 10, 10)) for k in range(3)}
    sha = {k: hashlib.sha256(v).hexdigest() for k, v in data.items()}
    (downloads / f"{sha[0]}.jpg").write_bytes(data[0])
    (downloads / "photo_b.jpg").write_bytes(data[1])              # named as the URL's last part
    rows = [{"image_url": f"https://x/{n}.jpg", "image_sha256": sha[k], "count": c, "label": "dogs"}
            for k, n, c in ((0, "photo_a", 1), (1, "photo_b", 3), (2, "photo_c", 2))]
    hub_parquet(tmp_path / "pixmo-count", {"train": rows, "test": rows[:2]})

    splits = {s.name: s for s in prepare("pixmocount", tmp_path / "pixmo-count", tmp_path / "out",
                                         images=downloads)}
    assert len(splits["train"].records) == 2
    assert splits["train"].bad == [f"train row 2: image {sha[2]} (https://x/photo_c.jpg) is not in the images folder"]
    assert "pixmocount train: 2 records, 1 bad rows: train row 2: image" in capsys.readouterr().out
    turns = [record_turns(r)[0] for r in splits["train"].records]
    assert turns == [("How many dogs are in this image?", "There is 1 dogs in this image."),
                     ("How many dogs are in this image?", "There are 3 dogs in this image.")]

    (downloads / "photo_b.jpg").write_bytes(data[2])              # a placeholder served instead of the photo
    splits = {s.name: s for s in prepare("pixmocount", tmp_path / "pixmo-count", tmp_path / "o2",
                                         images=downloads, verify_sha256=True, echo=lambda s: None)}
    assert len(splits["test"].records) == 1 and "does not have the sha256" in splits["test"].bad[0]
    with pytest.raises(PrepareError, match="--images"):
        prepare("pixmocount", tmp_path / "pixmo-count", tmp_path / "o3")


def test_timeclock_from_json_records_or_parquet_with_hour_and_minute(tmp_path):
    src = tmp_path / "clocks"
    (src / "img").mkdir(parents=True)
    (src / "img/a.jpg").write_bytes(jpeg())
    (src / "train.json").write_text(json.dumps([
        {"image": "img/a.jpg", "time": "3:05"}, {"image": "img/a.jpg", "hour": 14, "minute": 7},
        {"image": "../escape.jpg", "time": "1:00"}, {"image": "img/a.jpg", "time": "25:00"}]))
    (src / "test.jsonl").write_text(json.dumps({"image": "img/a.jpg", "hour": 9, "minute": 30}) + "\n{oops\n")
    splits = {s.name: s for s in prepare("timeclock", src, tmp_path / "out", echo=lambda s: None)}
    answers = [record_turns(r)[0] for r in splits["train"].records]
    assert answers == [("What time does the clock show in this image?", "03:05"),
                       ("What time does the clock show in this image?", "14:07")]
    assert len(splits["train"].bad) == 2 and "out of range" in splits["train"].bad[1]
    assert len(splits["test"].records) == 1 and "malformed JSON" in splits["test"].bad[0]

    hub_parquet(tmp_path / "clock-pq", {"train": [{"image": img(), "hour": 1, "minute": 2}],
                                        "test": [{"image": img(), "time": "10:59"}]})
    splits = {s.name: s for s in prepare("timeclock", tmp_path / "clock-pq", tmp_path / "o2", echo=lambda s: None)}
    assert record_turns(splits["test"].records[0])[0][1] == "10:59"


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["pathvqa", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    hub_parquet(tmp_path / "only-train", {"train": [{"image": img(), "question": "q", "answer": "a"}]})
    assert main(["pathvqa", "--source", str(tmp_path / "only-train"), "--out", str(tmp_path / "o")]) == 2
    assert "no parquet file of split 'test'" in capsys.readouterr().err
