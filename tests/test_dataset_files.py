"""training.dataset_files on tiny folders built here in each layout the Hub and `datasets` leave on disk."""
import base64
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from training.dataset_files import DatasetFileError, find_files, read_rows

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(color=(255, 0, 0), size=(4, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def image_table(questions, images):
    return pa.table({"question": questions,
                     "image": pa.array([{"bytes": b, "path": None} for b in images], type=IMAGE)})


def test_hub_snapshot_shards_by_split_and_lazy_images(tmp_path):
    (tmp_path / "data").mkdir()
    pq.write_table(image_table(["q0", "q1"], [png(), png((0, 255, 0))]),
                   tmp_path / "data/test-00000-of-00002-abc123.parquet")
    pq.write_table(image_table(["q2"], [png(size=(7, 5))]), tmp_path / "data/test-00001-of-00002-def456.parquet")
    pq.write_table(image_table(["train q"], [png()]), tmp_path / "data/train-00000-of-00001.parquet")
    rows = list(read_rows(tmp_path, split="test"))
    assert [r["question"] for r in rows] == ["q0", "q1", "q2"]
    assert isinstance(rows[2]["image"], Image.Image) and rows[2]["image"].size == (7, 5)
    assert rows[1]["image"].convert("RGB").getpixel((0, 0)) == (0, 255, 0)
    with pytest.raises(DatasetFileError, match="no parquet file of split 'validation'; found: test, train"):
        find_files(tmp_path, split="validation")


def test_configs_as_sub_folders(tmp_path):
    for config, q in (("DocVQA", "doc q"), ("InfographicVQA", "info q")):
        (tmp_path / config).mkdir()
        table = image_table([q], [png()]).append_column("answers", pa.array([["a", "b"]]))
        pq.write_table(table, tmp_path / config / "validation-00000-of-00001.parquet")
    rows = list(read_rows(tmp_path, config="InfographicVQA", split="validation"))
    assert [(r["question"], r["answers"]) for r in rows] == [("info q", ["a", "b"])]
    assert [r["question"] for r in read_rows(tmp_path / "DocVQA", config="DocVQA", split="validation")] == ["doc q"]
    with pytest.raises(DatasetFileError, match="configs DocVQA, InfographicVQA; none is 'ScienceQA-IMG'"):
        read_rows(tmp_path, config="ScienceQA-IMG", split="validation")


def test_image_lists_null_images_and_path_images(tmp_path):
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames/f.png").write_bytes(png(size=(2, 2)))
    table = pa.table({
        "question_id": ["v1", "i1"],
        "image": pa.array([[{"bytes": png(), "path": None}, {"bytes": None, "path": "frames/f.png"}],
                           [{"bytes": png(), "path": None}]], type=pa.list_(IMAGE)),
        "maybe": pa.array([None, {"bytes": png(), "path": None}], type=IMAGE),
    })
    pq.write_table(table, tmp_path / "test-00000-of-00001.parquet")
    first, second = read_rows(tmp_path, split="test")
    assert [im.size for im in first["image"]] == [(4, 3), (2, 2)] and first["maybe"] is None
    assert len(second["image"]) == 1 and isinstance(second["maybe"], Image.Image)


def test_single_unsplit_file_is_the_split_asked_for(tmp_path):
    pq.write_table(image_table(["m"], [png()]).append_column("l2_category", pa.array(["math"])),
                   tmp_path / "mmstar.parquet")
    assert [r["question"] for r in read_rows(tmp_path, split="val")] == ["m"]


def test_bad_rows_are_counted_and_named_or_raise_when_strict(tmp_path):
    pq.write_table(image_table(["ok", "broken", "ok too"], [png(), b"not an image", png()]),
                   tmp_path / "test-00000-of-00001.parquet")
    rows = read_rows(tmp_path, split="test")
    with pytest.warns(UserWarning, match=r"skipped 1 bad rows: .*test-00000-of-00001.parquet row 1: image"):
        assert [r["question"] for r in rows] == ["ok", "ok too"]
    assert rows.n_bad == 1 and rows.bad[0].row == 1
    with pytest.raises(DatasetFileError, match="row 1: image does not open"):
        list(read_rows(tmp_path, split="test", strict=True))


def _write_stream(table, path):
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def test_save_to_disk_layouts_built_by_hand(tmp_path):
    """The layout `datasets` writes (arrow IPC streams named in state.json), without needing `datasets`."""
    for split, qs in (("test", ["t0", "t1"]), ("train", ["x"])):
        folder = tmp_path / split
        folder.mkdir()
        _write_stream(image_table(qs, [png()] * len(qs)), folder / "data-00000-of-00001.arrow")
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "train"]}))
    assert [r["question"] for r in read_rows(tmp_path, split="test")] == ["t0", "t1"]
    assert [r["question"] for r in read_rows(tmp_path / "train")] == ["x"]
    with pytest.raises(DatasetFileError, match="splits are test, train; asked for 'validation'"):
        read_rows(tmp_path, split="validation")


def test_save_to_disk_from_datasets_reads_as_datasets_yields_it(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("int8"),
                                  "image": datasets.Image(), "frames": datasets.Sequence(datasets.Image())})
    data = {"question": ["a", "b"], "answer": [1, 2],
            "image": [{"bytes": png(), "path": None}, {"bytes": png(size=(9, 9)), "path": None}],
            "frames": [[{"bytes": png(), "path": None}], []]}
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_dict(data, features=features)})
    dd.save_to_disk(str(tmp_path / "saved"))
    dd["test"].to_parquet(str(tmp_path / "hub/test-00000-of-00001.parquet"))
    expected = list(dd["test"])
    for got in (list(read_rows(tmp_path / "saved", split="test")), list(read_rows(tmp_path / "hub", split="test"))):
        assert [(r["question"], r["answer"]) for r in got] == [(r["question"], r["answer"]) for r in expected]
        assert [r["image"].size for r in got] == [r["image"].size for r in expected]
        assert [len(r["frames"]) for r in got] == [len(r["frames"]) for r in expected]


def test_mmstar_tsv_with_base64_images_and_shared_image_references(tmp_path):
    b64 = base64.b64encode(png(size=(5, 5))).decode()
    lines = ["index\tquestion\tanswer\tcategory\tl2-category\timage",
             f'0\t"Which?\nOptions: A: x, B: y"\tA\tmath\tgeometry\t{b64}',
             "1\tSame picture?\tB\tmath\tgeometry\t0",           # VLMEvalKit: the image of row index 0
             "2\tBroken\tC\tmath\tgeometry\t!!notbase64!!" + "x" * 70,
             "3\ttoo few fields"]
    (tmp_path / "MMStar.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = read_rows(tmp_path / "MMStar.tsv")
    with pytest.warns(UserWarning, match="skipped 2 bad rows"):
        got = list(rows)
    assert [r["index"] for r in got] == ["0", "1"]
    assert got[0]["question"] == "Which?\nOptions: A: x, B: y" and got[0]["l2-category"] == "geometry"
    assert got[0]["image"].size == got[1]["image"].size == (5, 5)
    assert [(b.row, b.reason.split(" (")[0]) for b in rows.bad] == [(2, "image does not open"),
                                                                    (3, "wrong number of fields")]
    assert find_files(tmp_path, split="val") == [tmp_path / "MMStar.tsv"]
