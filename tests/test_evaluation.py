"""Evaluation: hand-made R@k cases (ties, 5 captions per image), every reader on a tiny layout built in tmp_path,
end-to-end runs through the retrieval interface, FG-OVD region pooling, zero-shot, bad input, and the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_longclip import FineLIPModel
from hf_longclip.evaluation import (
    BenchmarkLayoutError,
    EvalSettings,
    encode_texts,
    evaluate,
    read_coco,
    read_coco_val2017,
    read_dci,
    read_docci,
    read_fgovd,
    read_flickr30k,
    read_sharegpt4v_1k,
    read_urban1k,
    read_zeroshot,
    recall_at_k,
    region_features,
    retrieval_ranks,
    roi_weights,
    topk_accuracy,
)
from hf_longclip.evaluation.fgovd import box_to_crop, processed_geometry

SETTINGS = EvalSettings(batch_size=4, progress=False)


# ----------------------------------------------------------------------------------------------- metrics
def test_recall_hand_made_one_caption_per_image():
    # 3 images x 3 texts; text j describes image j.
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5],  # image 0: own text best
            [0.8, 0.2, 0.1],  # image 1: own text (0.2) second
            [0.0, 0.3, 0.4],  # image 2: own text best
        ]
    )
    r = recall_at_k(scores, [0, 1, 2], ks=(1, 2))
    # text->image columns: t0 -> images (0.9, 0.8, 0.0): rank 0; t1 -> (0.1, 0.2, 0.3): image 2 beats -> rank 1;
    # t2 -> (0.5, 0.1, 0.4): image 0 beats -> rank 1.
    assert r["t2i_R@1"] == pytest.approx(100 / 3)
    assert r["t2i_R@2"] == pytest.approx(100.0)
    # image->text rows: i0 rank 0; i1: t0 beats -> rank 1; i2 rank 0.
    assert r["i2t_R@1"] == pytest.approx(200 / 3)
    assert r["i2t_R@2"] == pytest.approx(100.0)


def test_recall_ties_are_pessimistic_and_order_independent():
    scores = torch.ones(4, 4)  # every score tied
    r = recall_at_k(scores, [0, 1, 2, 3], ks=(1, 3, 4))
    assert r["t2i_R@1"] == 0 and r["t2i_R@3"] == 0 and r["t2i_R@4"] == 100
    assert r["i2t_R@1"] == 0 and r["i2t_R@4"] == 100
    # one tie with a wrong candidate pushes the ground truth down, wherever it is stored
    scores = torch.tensor([[1.0, 1.0], [0.0, 0.5]])
    assert recall_at_k(scores, [0, 1], ks=(1,))["i2t_R@1"] == 50.0
    flipped = scores.flip(0).flip(1)  # same problem, stored in reverse order
    assert recall_at_k(flipped, [0, 1], ks=(1,))["i2t_R@1"] == 50.0


def test_recall_five_captions_per_image():
    # 2 images, 10 texts: texts 0-4 belong to image 0, 5-9 to image 1.
    owner = [0] * 5 + [1] * 5
    scores = torch.zeros(2, 10)
    # image 0: its best own caption (t3, 0.6) is beaten by t5 and t6 of image 1 -> rank 2.
    scores[0] = torch.tensor([0.1, 0.2, 0.3, 0.6, 0.0, 0.9, 0.7, 0.1, 0.1, 0.1])
    # image 1: its own caption t9 scores highest -> rank 0; its other captions do not count against it.
    scores[1] = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2, 0.95])
    text_ranks, image_ranks = retrieval_ranks(scores, owner)
    assert image_ranks.tolist() == [2, 0]
    # text->image: t0..t4 compare image 0 vs image 1 score: (0.1 v 0.5) miss, (0.2 v .5), (.3 v .5), (.6 v .5) hit,
    # (0.0 v .5) miss; t5..t9: (0.2 v .9) miss, (.2 v .7) miss, (.2 v .1) hit, (.2 v .1) hit, (.95 v .1) hit
    assert text_ranks.tolist() == [1, 1, 1, 0, 1, 1, 1, 0, 0, 0]
    r = recall_at_k(scores, owner, ks=(1, 3))
    assert r["i2t_R@1"] == 50.0 and r["i2t_R@3"] == 100.0
    assert r["t2i_R@1"] == 40.0 and r["t2i_R@3"] == 100.0  # 2 images: every text is within the top 2
    # chunking does not change anything
    assert torch.equal(retrieval_ranks(scores, owner, chunk_size=1)[1], image_ranks)


def test_recall_rejects_bad_owner():
    with pytest.raises(ValueError, match="one entry per text"):
        recall_at_k(torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(torch.zeros(2, 2), [0, 2])


def test_topk_accuracy_ties():
    logits = torch.tensor([[0.2, 0.9, 0.1], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    acc = topk_accuracy(logits, [1, 0, 1], ks=(1, 2))
    # row 0 rank 0; row 1 tie with class 1 -> rank 1; row 2: class 0 ties, class 2 beats -> rank 2
    assert acc["top1"] == pytest.approx(100 / 3)
    assert acc["top2"] == pytest.approx(200 / 3)


# ----------------------------------------------------------------------------------------------- fixtures
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
RGB = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20),
       "purple": (150, 20, 150), "orange": (240, 140, 0)}


def _image(path: Path, color: str, size=(40, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[:] = RGB[color]
    array[::4, :, :] = 255 - array[::4, :, :]  # a pattern, so images differ in more than the mean
    Image.fromarray(array).save(path)


def _caption(color, i):
    return f"a {color} square in the middle of the image. the image shows a {color} photo number {i}."


def make_benchmarks(root: Path, n: int = 3) -> Path:
    """Tiny copies of every benchmark layout (n images each)."""
    colors = COLORS[:n]
    # Urban1k
    for i, c in enumerate(colors, 1):
        _image(root / "Urban1k" / "image" / f"{i}.jpg", c)
        (root / "Urban1k" / "caption").mkdir(parents=True, exist_ok=True)
        (root / "Urban1k" / "caption" / f"{i}.txt").write_text(_caption(c, i) + "\n")
    # ShareGPT4V: first 1000 entries used; 3 here plus one extra that must be ignored with count=3
    entries = []
    for i, c in enumerate(colors + ["orange"]):
        rel = f"coco/train2017/{i:012d}.jpg"
        _image(root / "sharegpt4v" / rel, c)
        entries.append({"id": i, "image": rel, "conversations": [{"from": "human", "value": "<image>\nDescribe"},
                                                                    {"from": "gpt", "value": _caption(c, i) + "\nMore."}]})
    (root / "sharegpt4v" / "share-captioner_coco_lcs_sam_1246k_1107.json").write_text(json.dumps(entries))
    # DCI
    base = root / "dci" / "densely_captioned_images"
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(colors):
        _image(base / "photos" / f"sa_{i}.jpg", c)
        (base / "annotations" / f"sa_{i}.json").write_text(
            json.dumps({"image": f"sa_{i}.jpg", "short_caption": c, "extra_caption": _caption(c, i)}))
    (base / "splits.json").write_text(json.dumps({"train": ["sa_0.json"], "test": [f"sa_{i}.json" for i in range(1, n)]}))
    # DOCCI
    lines = []
    for i, c in enumerate(colors + ["orange"]):
        _image(root / "docci" / "images" / f"test_{i}.jpg", c)
        lines.append(json.dumps({"example_id": f"test_{i}", "split": "test" if i < n else "train",
                                 "image_file": f"test_{i}.jpg", "description": _caption(c, i)}))
    (root / "docci" / "docci_descriptions.jsonlines").write_text("\n".join(lines) + "\n")
    # COCO (Karpathy) and Flickr30k: 5 captions per image (6 given for one image: only 5 are used)
    for name, sub, filename in (("coco", "val2014", "dataset_coco.json"), ("flickr30k", None, "dataset_flickr30k.json")):
        images = []
        for i, c in enumerate(colors):
            fname = f"img_{i}.jpg"
            folder = root / name / (sub if sub else "flickr30k-images")
            _image(folder / fname, c)
            sentences = [{"raw": f"a {c} photo {k}."} for k in range(6 if i == 0 else 5)]
            entry = {"filename": fname, "split": "test", "sentences": sentences}
            if sub:
                entry["filepath"] = sub
            images.append(entry)
        images.append({"filename": "train.jpg", "split": "train", "sentences": [{"raw": "x"}], "filepath": sub or ""})
        (root / name / filename).write_text(json.dumps({"images": images, "dataset": name}))
    # COCO val2017
    annotations, imgs = [], []
    for i, c in enumerate(colors):
        _image(root / "coco" / "val2017" / f"{i:012d}.jpg", c)
        imgs.append({"id": 100 + i, "file_name": f"{i:012d}.jpg"})
        annotations += [{"id": 10 * i + k, "image_id": 100 + i, "caption": f"a {c} photo {k}"} for k in range(5)]
    (root / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "coco" / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": imgs, "annotations": annotations}))
    # FG-OVD: one split, two boxes per image
    cats = [{"id": 1 + j, "name": f"a {c} square"} for j, c in enumerate(COLORS)]
    fg_images, fg_anns = [], []
    for i, c in enumerate(colors):
        _image(root / "fgovd" / "images" / f"{i}.jpg", c)
        fg_images.append({"id": i, "file_name": f"{i}.jpg"})
        pos = COLORS.index(c) + 1
        negs = [cid for cid in range(1, len(COLORS) + 1) if cid != pos][:3]
        fg_anns.append({"image_id": i, "bbox": [0, 0, 20, 16], "category_id": pos, "neg_category_ids": negs})
        fg_anns.append({"image_id": i, "bbox": [10, 8, 30, 24], "category_id": pos, "neg_category_ids": negs[:2]})
    (root / "fgovd" / "benchmarks").mkdir(parents=True, exist_ok=True)
    (root / "fgovd" / "benchmarks" / "1_attributes.json").write_text(
        json.dumps({"images": fg_images, "annotations": fg_anns, "categories": cats}))
    # zero-shot
    for c in colors:
        for k in range(2):
            _image(root / "zeroshot" / f"{c}_thing" / f"{k}.png", c)
    return root


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    return make_benchmarks(tmp_path_factory.mktemp("bench"))


# ----------------------------------------------------------------------------------------------- readers
def test_readers_on_tiny_layouts(bench_root):
    urban = read_urban1k(bench_root)
    assert [p.name for p in urban.image_paths] == ["1.jpg", "2.jpg", "3.jpg"]
    assert urban.texts[0] == _caption("red", 1) and urban.text_to_image == [0, 1, 2]

    share = read_sharegpt4v_1k(bench_root, count=3)
    assert len(share.image_paths) == 3 and share.texts[1] == _caption("green", 1) + " More."  # newline -> space
    assert len(read_sharegpt4v_1k(bench_root).image_paths) == 4  # fewer than 1000 entries: all of them

    dci = read_dci(bench_root)
    assert [p.name for p in dci.image_paths] == ["sa_0.jpg", "sa_1.jpg", "sa_2.jpg"]  # all splits
    assert dci.texts[2] == _caption("blue", 2)

    docci = read_docci(bench_root)
    assert len(docci.image_paths) == 3 and docci.split == "test"  # the train line is skipped

    for reader, name in ((read_coco, "coco"), (read_flickr30k, "flickr30k")):
        data = reader(bench_root)
        assert len(data.image_paths) == 3, name  # train image skipped
        assert len(data.texts) == 15 and data.text_to_image == [i for i in range(3) for _ in range(5)]
        assert all(p.is_file() for p in data.image_paths)
    assert read_coco(bench_root).image_paths[0].parent.name == "val2014"

    val = read_coco_val2017(bench_root)
    assert len(val.texts) == 15 and val.image_paths[2].name == "000000000002.jpg"

    (split,) = read_fgovd(bench_root)
    assert split.name == "1_attributes" and len(split.boxes) == 6
    assert split.captions[split.boxes[0].positive] == "a red square" and len(split.boxes[1].negatives) == 2

    zs = read_zeroshot(bench_root)
    assert zs.class_names == ["blue thing", "green thing", "red thing"] and len(zs.image_paths) == 6


@pytest.mark.parametrize(
    "reader, expected",
    [
        (read_urban1k, "Urban1k/image/<id>.jpg"),
        (read_coco, "Karpathy split file"),
        (read_flickr30k, "flickr30k-images"),
        (read_dci, "extra_caption"),
        (read_docci, "docci_descriptions.jsonlines"),
        (read_sharegpt4v_1k, "share-captioner"),
        (read_fgovd, "neg_category_ids"),
        (read_zeroshot, "class name"),
    ],
)
def test_missing_layout_names_the_expected_layout(tmp_path, reader, expected):
    with pytest.raises(BenchmarkLayoutError, match="Expected under data root") as error:
        reader(tmp_path)
    assert expected in str(error.value)


def test_missing_caption_file_is_named(tmp_path):
    _image(tmp_path / "Urban1k" / "image" / "1.jpg", "red")
    (tmp_path / "Urban1k" / "caption").mkdir()
    with pytest.raises(BenchmarkLayoutError, match="1.txt"):
        read_urban1k(tmp_path)


# ----------------------------------------------------------------------------------------------- end to end
def test_evaluate_all_benchmarks_json(bench_root, processor, longclip_model, tmp_path):
    out = tmp_path / "results.json"
    report = evaluate(longclip_model, processor, "all", bench_root, settings=SETTINGS, output=out)
    saved = json.loads(out.read_text())
    assert saved["benchmarks"].keys() == report["benchmarks"].keys()
    coco = saved["benchmarks"]["coco"]
    assert coco["num_images"] == 3 and coco["num_texts"] == 15 and coco["unreadable_images"] == 0
    for key in ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10"):
        assert 0 <= coco[key] <= 100
    assert coco["t2i_R@5"] == 100  # 3 images: every text has its image within the top 5
    assert saved["benchmarks"]["fgovd"]["splits"]["1_attributes"]["num_boxes"] == 6
    assert saved["benchmarks"]["zeroshot"]["num_classes"] == 3


def test_retrieval_matches_direct_computation(bench_root, processor, longclip_model):
    """The batched, length-sorted pipeline gives the same R@k as scoring all features in one go."""
    data = read_coco(bench_root)
    from hf_longclip.evaluation import evaluate_retrieval

    result = evaluate_retrieval(longclip_model, processor, data, settings=EvalSettings(batch_size=2, progress=False))
    images = [Image.open(p).convert("RGB") for p in data.image_paths]
    with torch.no_grad():
        pix = processor(images=images, return_tensors="pt")["pixel_values"]
        tok = processor(text=data.texts, return_tensors="pt")
        scores = longclip_model.encode_image(pix) @ longclip_model.encode_text(tok["input_ids"], tok["attention_mask"]).t()
    expected = recall_at_k(scores, data.text_to_image)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key


def test_text_features_keep_input_order(processor, longclip_model):
    texts = ["a red dog " * 12, "a cat", "a green tree in the sky " * 3, "blue"]
    feats = encode_texts(longclip_model, processor.tokenizer, texts, settings=EvalSettings(batch_size=2, progress=False))
    for i, text in enumerate(texts):
        tok = processor(text=[text], return_tensors="pt")
        with torch.no_grad():
            one = longclip_model.encode_text(tok["input_ids"], tok["attention_mask"])
        torch.testing.assert_close(feats["text_embeds"][i], one[0], atol=1e-5, rtol=1e-5)


def test_unreadable_images_are_counted(tmp_path, processor, longclip_model):
    root = make_benchmarks(tmp_path)
    (root / "Urban1k" / "image" / "2.jpg").write_bytes(b"not an image")
    report = evaluate(longclip_model, processor, "urban1k", root, settings=SETTINGS)
    urban = report["benchmarks"]["urban1k"]
    assert urban["unreadable_images"] == 1 and urban["num_images"] == 2 and urban["num_texts"] == 2
    assert urban["unreadable_examples"][0].startswith(str(root / "Urban1k" / "image" / "2.jpg") + ": corrupt: ")
    assert urban["unreadable_reasons"] == {"corrupt": 1}


def test_unreadable_images_carry_the_training_loaders_reasons(tmp_path, processor, longclip_model, caplog):
    """A good image, a truncated JPEG, a missing path and a 0-byte file: each unreadable one is reported with the
    `BadImageError` reason and detail training gives it, and one WARNING summarises them."""
    from hf_longclip.data.images import BadImageError, load_image
    from hf_longclip.evaluation import RetrievalSet, evaluate_retrieval

    good, truncated, missing, empty = (tmp_path / name for name in ("good.jpg", "trunc.jpg", "gone.jpg", "empty.jpg"))
    _image(good, "red")
    _image(truncated, "green", size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:300])
    empty.write_bytes(b"")
    paths = [good, truncated, missing, empty]
    data = RetrievalSet("mixed", paths, [f"a {c} photo" for c in ("red", "green", "blue", "yellow")], [0, 1, 2, 3])
    with caplog.at_level("WARNING", logger="hf_longclip.evaluation"):
        result = evaluate_retrieval(longclip_model, processor, data, settings=SETTINGS)
    assert result["num_images"] == 1 and result["num_texts"] == 1 and result["unreadable_images"] == 3
    assert result["unreadable_reasons"] == {"missing": 1, "empty": 1, "corrupt": 1}
    expected = []
    for path in paths[1:]:
        with pytest.raises(BadImageError) as error:
            load_image(path)  # what the training loader says about the same file
        detail = error.value.detail
        detail = detail[len(str(path)) + 2 :] if detail.startswith(f"{path}: ") else detail
        expected.append(f"{path}: {error.value.reason}: {detail}")
    assert result["unreadable_examples"] == expected
    assert expected[0].startswith(f"{truncated}: corrupt: ") and "truncated" in expected[0].lower()
    assert expected[1] == f"{missing}: missing: no such file: {missing}"
    assert expected[2] == f"{empty}: empty: {empty} has 0 bytes"
    warnings_logged = [r for r in caplog.records if r.levelname == "WARNING" and "unreadable" in r.getMessage()]
    assert len(warnings_logged) == 1
    assert "3 unreadable" in warnings_logged[0].getMessage() and "corrupt: 1" in warnings_logged[0].getMessage()


def test_zeroshot_and_fgovd_report_unreadable_reasons(tmp_path, processor, longclip_model):
    root = make_benchmarks(tmp_path)
    (root / "zeroshot" / "red_thing" / "1.png").write_bytes(b"")
    (root / "fgovd" / "images" / "1.jpg").unlink()
    report = evaluate(longclip_model, processor, "zeroshot,fgovd", root, settings=SETTINGS)["benchmarks"]
    zeroshot = report["zeroshot"]
    assert zeroshot["unreadable_images"] == 1 and zeroshot["unreadable_reasons"] == {"empty": 1}
    empty = root / "zeroshot" / "red_thing" / "1.png"
    assert zeroshot["unreadable_examples"] == [f"{empty}: empty: {empty} has 0 bytes"]
    split = report["fgovd"]["splits"]["1_attributes"]
    gone = root / "fgovd" / "images" / "1.jpg"
    assert split["unreadable_images"] == 1 and split["unreadable_reasons"] == {"missing": 1}
    assert split["unreadable_examples"] == [f"{gone}: missing: no such file: {gone}"]  # the right image of the split
    assert split["num_boxes"] == 4 and split["skipped_boxes"] == 2


def test_evaluation_converts_images_like_training_but_does_not_rotate(tmp_path, processor):
    """Evaluation converts every mode to RGB as training does (transparency on white, 16-bit grayscale scaled, not
    clipped white) but skips EXIF rotation like the authors' evaluation code; a plain 8-bit RGB JPEG, what the
    benchmarks hold, gives exactly the authors' ``Image.open(p).convert("RGB")``."""
    from hf_longclip.data.images import load_image
    from hf_longclip.evaluation.retrieval import ImageFiles

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(30, 50, 4), dtype=np.uint8)
    rgba[:, :25] = (255, 0, 0, 0)  # a fully transparent red half: white in training, red under a plain convert
    png = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(png)
    gray16 = tmp_path / "gray16.png"
    Image.fromarray(np.full((30, 40), 32768, dtype=np.uint16)).save(gray16)  # mid grey in 16 bits
    photo = np.zeros((24, 64, 3), dtype=np.uint8)
    photo[:, :32] = (220, 20, 20)
    photo[:, 32:] = (20, 20, 220)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when displayed
    rotated = tmp_path / "exif.jpg"
    Image.fromarray(photo).save(rotated, exif=exif, quality=95)
    plain = tmp_path / "plain.jpg"
    Image.fromarray(photo).save(plain, quality=95)
    paths = [png, gray16, rotated, plain]
    files = ImageFiles(paths, processor.image_processor)

    def pixels_of(image):
        return processor.image_processor(image, return_tensors="pt")["pixel_values"][0]

    got = {}
    for index, path in enumerate(paths):
        got_index, pixels, size = files[index]
        assert got_index == index and pixels is not None
        got[path.name] = (pixels, size)
    with Image.open(png) as image:
        assert image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)  # what the old plain convert gave
    for path in (png, gray16):  # training's conversion, pixel for pixel
        assert torch.equal(got[path.name][0], pixels_of(load_image(path))), path
    decoded = load_image(png, reference_decode=True)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert load_image(gray16, reference_decode=True).getpixel((0, 0)) == (128, 128, 128)  # not clipped to white
    with Image.open(rotated) as image:
        stored = image.convert("RGB")
    assert torch.equal(got[rotated.name][0], pixels_of(stored))  # not rotated ...
    assert got[rotated.name][1] == stored.size == (64, 24)  # ... so FG-OVD boxes map in the stored frame
    assert not torch.equal(pixels_of(load_image(rotated)), pixels_of(stored))  # (training does rotate it)
    with Image.open(plain) as image:
        assert torch.equal(got[plain.name][0], pixels_of(image.convert("RGB")))


def test_decompression_bomb_is_a_counted_skip(tmp_path, processor, longclip_model, monkeypatch):
    """An image over PIL's decompression-bomb limit is skipped and counted as ``too_large``; the run goes on."""
    root = make_benchmarks(tmp_path)
    big = root / "Urban1k" / "image" / "2.jpg"
    _image(big, "green", size=(400, 300))  # 120,000 pixels; the others have 1,280
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # bombs are refused above twice this
    report = evaluate(longclip_model, processor, "urban1k", root, settings=SETTINGS)
    urban = report["benchmarks"]["urban1k"]
    assert urban["num_images"] == 2 and urban["num_texts"] == 2
    assert urban["unreadable_images"] == 1 and urban["unreadable_reasons"] == {"too_large": 1}
    assert urban["unreadable_examples"][0].startswith(f"{big}: too_large: ")


def test_fused_scoring_runs_on_finelip_and_is_refused_by_longclip(bench_root, processor, longclip_model):
    from hf_longclip.evaluation import encode_images, score_matrix
    from hf_longclip.testing_utils import tiny_clip

    with pytest.raises(ValueError, match="fused"):
        evaluate(longclip_model, processor, "urban1k", bench_root, scoring="fused", settings=SETTINGS)
    finelip = FineLIPModel.from_clip(tiny_clip(processor=processor))
    report = evaluate(finelip, processor, "urban1k,coco", bench_root, scoring="fused", settings=SETTINGS)
    assert report["scoring"] == "fused" and report["benchmarks"]["coco"]["num_texts"] == 15
    # the batched pipeline's fused matrix is the model's own 0.8 * cosine + 0.2 * CLIM on the same features
    data = read_coco(bench_root)
    settings = EvalSettings(batch_size=2, progress=False, score_chunk=2)
    images, _, _ = encode_images(finelip, processor.image_processor, data.image_paths, "fused", settings)
    texts = encode_texts(finelip, processor.tokenizer, data.texts, "fused", settings)
    fused = score_matrix(finelip, images, texts, "fused", settings)
    with torch.no_grad():
        clim = finelip.retrieval_scores(images, texts, scoring="clim")
        cosine = finelip.retrieval_scores(images, texts, scoring="global")
    torch.testing.assert_close(fused, 0.8 * cosine + 0.2 * clim, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fused, cosine)


def test_unknown_benchmark_and_dtype():
    with pytest.raises(ValueError, match="unknown benchmark"):
        from hf_longclip.evaluation import parse_benchmarks

        parse_benchmarks("urban1k,imagenet-x")
    with pytest.raises(ValueError, match="dtype"):
        EvalSettings(dtype="int8")


def test_bf16_autocast_on_cpu_runs(bench_root, processor, longclip_model):
    report = evaluate(longclip_model, processor, "urban1k", bench_root, settings=EvalSettings(batch_size=4, progress=False, dtype="bf16"))
    assert report["settings"]["dtype"] == "bf16" and report["benchmarks"]["urban1k"]["num_images"] == 3


# ----------------------------------------------------------------------------------------------- FG-OVD pooling
def test_roi_weights_area_by_hand():
    # 2x2 grid of 8-px cells; box covers x in [4, 12), y in [0, 8): half of cell (0,0) and half of cell (0,1)
    w = roi_weights((4, 0, 12, 8), 2, 2, 8.0, 8.0)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    # box entirely outside the crop: nearest cell to its centre
    w = roi_weights((40, 40, 50, 50), 2, 2, 8.0, 8.0)
    assert w[1, 1] == 1 and w.sum() == 1


def test_region_features_pool_the_right_patches():
    tokens = torch.zeros(4, 3)
    tokens[0] = torch.tensor([1.0, 0, 0])  # top-left
    tokens[3] = torch.tensor([0, 0, 1.0])  # bottom-right
    feats = region_features(tokens, [(0, 0, 8, 8), (8, 8, 16, 16), (0, 0, 16, 16)], (16, 16))
    torch.testing.assert_close(feats[0], torch.tensor([1.0, 0, 0]))
    torch.testing.assert_close(feats[1], torch.tensor([0, 0, 1.0]))
    torch.testing.assert_close(feats[2], torch.tensor([1.0, 0, 1.0]) / 2**0.5)


def test_box_mapping_follows_resize_and_center_crop(processor):
    geometry = processed_geometry(processor.image_processor)
    assert geometry == (32, 32, 32)
    # a 64x32 (w x h) image: scale 1, resized to 64x32, crop 32 wide from x=16
    assert box_to_crop((16, 0, 32, 32), (64, 32), geometry) == (0.0, 0.0, 32.0, 32.0)
    # a 32x64 image scaled by 0.5 -> the same 32x32 frame at scale 1/2 after the crop offset 0
    assert box_to_crop((0, 0, 64, 64), (64, 64), geometry) == (0.0, 0.0, 32.0, 32.0)


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_evaluate(bench_root, processor, longclip_model, tmp_path, capsys):
    from hf_longclip.cli import main

    model_dir = tmp_path / "model"
    longclip_model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    out = tmp_path / "cli.json"
    code = main(["evaluate", "--model", str(model_dir), "--benchmarks", "urban1k,zeroshot", "--data-root", str(bench_root),
                 "--output", str(out), "--batch-size", "4", "--no-progress"])
    assert code == 0
    saved = json.loads(out.read_text())
    assert saved["benchmarks"]["urban1k"]["num_images"] == 3 and saved["model_type"] == "longclip"
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model_dir), "--benchmarks", "dci", "--data-root", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "it/s]" not in line]  # transformers' loading bar
    assert len(lines) == 1 and lines[0].startswith("error: ") and "densely_captioned_images" in lines[0], err


def test_tci_scoring_on_betaclip_and_stock_clip_baseline(bench_root, processor, clip_model):
    from hf_longclip import BetaCLIPModel
    from hf_longclip.testing_utils import tiny_clip

    beta = BetaCLIPModel.from_clip(tiny_clip(processor=processor))
    report = evaluate(beta, processor, "urban1k", bench_root, scoring="tci", settings=SETTINGS)
    assert report["benchmarks"]["urban1k"]["scoring"] == "tci" and report["benchmarks"]["urban1k"]["num_texts"] == 3
    # a stock 77-token CLIPModel (no retrieval interface) is scored with its pooled embeddings, captions cut to 77
    stock = evaluate(clip_model, processor, "coco", bench_root, settings=SETTINGS)["benchmarks"]["coco"]
    assert stock["num_texts"] == 15
    with pytest.raises(ValueError, match="no retrieval interface"):
        evaluate(clip_model, processor, "coco", bench_root, scoring="fused", settings=SETTINGS)
    with pytest.raises(TypeError, match="get_image_token_features"):
        evaluate(clip_model, processor, "fgovd", bench_root, settings=SETTINGS)
    long_text = ["red " * 200]
    feats = encode_texts(clip_model, processor.tokenizer, long_text, settings=SETTINGS)
    assert feats["text_embeds"].shape[0] == 1  # no position overflow: truncated to the model's 77 positions


def test_fp16_on_cpu_is_refused(bench_root, processor, longclip_model):
    with pytest.raises(ValueError, match="needs a GPU"):
        evaluate(longclip_model, processor, "urban1k", bench_root, settings=EvalSettings(dtype="fp16", device="cpu", progress=False))


def test_reference_decode_keeps_the_checks_and_copies(tmp_path):
    from hf_longclip.data.images import BadImageError, load_image

    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(6, 5, 4), dtype=np.uint8), "RGBA")
    plain = load_image(rgba, reference_decode=True)
    assert plain is not rgba and plain.mode == "RGB"
    assert np.array_equal(np.asarray(plain), np.asarray(load_image(rgba)))  # training's alpha compositing
    assert not np.array_equal(np.asarray(plain), np.asarray(rgba.convert("RGB")))
    rgb = rgba.convert("RGB")
    assert load_image(rgb, reference_decode=True) is not rgb  # a copy, never the caller's object
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 40)).save(thin)
    with pytest.raises(BadImageError) as error:
        load_image(thin, reference_decode=True)
    assert error.value.reason == "too_small"
    big = tmp_path / "big.png"
    Image.new("RGB", (80, 80)).save(big)
    with pytest.raises(BadImageError) as error:
        load_image(big, max_image_pixels=64 * 64, reference_decode=True)
    assert error.value.reason == "too_large"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_cli_evaluate_refuses_a_bad_output_or_device_before_loading(bench_root, tmp_path, capsys, monkeypatch):
    """A folder or an unwritable path as --output, or a device the machine lacks, is one `error:` line before the
    model is loaded (so before any evaluation runs)."""
    import hf_longclip.cli as cli

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "_load_model_and_processor", must_not_load)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    base = ["evaluate", "--model", str(tmp_path), "--benchmarks", "urban1k", "--data-root", str(bench_root), "--no-progress"]
    for output, expected in ((tmp_path, "is a folder"), (blocker / "results.json", "is a file, not a folder")):
        assert cli.main([*base, "--output", str(output), "--device", "cpu"]) == 1
        line = _one_error_line(capsys)
        assert "--output" in line and expected in line, line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main([*base, "--output", str(tmp_path / "r.json"), "--device", "cuda"]) == 1
    line = _one_error_line(capsys)
    assert "CUDA is not available" in line and "'cuda'" in line, line
    assert cli.main([*base, "--output", str(tmp_path / "r.json"), "--device", "gpu0"]) == 1
    assert "unknown device 'gpu0'" in _one_error_line(capsys)
    assert not (tmp_path / "r.json").exists()


def test_python_evaluate_checks_output_and_device_first(bench_root, tmp_path, monkeypatch):
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"model.{name} was used")

    with pytest.raises(ValueError, match="is a folder"):
        evaluate(Untouchable(), None, "urban1k", bench_root, settings=SETTINGS, output=tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        EvalSettings(device="cuda:0")
    assert EvalSettings(device="cpu").device == "cpu"
