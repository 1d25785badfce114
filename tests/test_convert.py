"""Converters: tiny fixtures in each published layout -> shards -> the training reader.

Every fixture is real files (JPEG, PNG, JSON, XML, TXT, NPY, MAT) written by
``tests/fixtures_layouts.py``; every conversion is read back through ``ShardStream`` /
``make_loader`` / ``decode_sample``, which validate the samples the way training does.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil

import numpy as np
import pytest

from fixtures_layouts import (
    ENTITY_CLEAN,
    captions_for,
    coco_name,
    make_coco,
    make_entities,
    make_flickr30k,
    make_karpathy_coco,
    make_precomp,
    make_salicon,
    size_of,
)
from xray_match.data.convert import (
    ConversionError,
    ConvertOptions,
    convert_coco,
    convert_entities,
    convert_flickr30k,
    convert_salicon,
    convert_scan,
)
from xray_match.data.format import ShardFormatError, read_manifest
from xray_match.data.reader import ShardStream, iter_raw, make_loader, shard_urls
from xray_match.data.verify import verify


def opts(**kw) -> ConvertOptions:
    kw.setdefault("workers", 1)
    kw.setdefault("maxcount", 2)
    kw.setdefault("progress", False)
    return ConvertOptions(**kw)


def read_split(root: str, split: str) -> list[dict]:
    """Every decoded sample of a split, in shard order (the eval stream: each sample once)."""
    return list(ShardStream(shard_urls(root, split), train=False))


def shard_state(root: str, split: str) -> dict[str, tuple[int, int, str]]:
    """Per listed shard (inode, mtime, sha256), also of a folder a crash left incomplete."""
    out = {}
    for s in read_manifest(root, allow_incomplete=True).shards(split):
        p = os.path.join(root, s.name)
        st = os.stat(p)
        out[s.name] = (st.st_ino, st.st_mtime_ns, hashlib.sha256(open(p, "rb").read()).hexdigest())
    return out


@pytest.fixture
def coco(tmp_path):
    return make_coco(str(tmp_path / "coco"), extra_captions={9: 2})


# ----------------------------------------------------------------------------- COCO


def test_coco_official_round_trip(coco, tmp_path):
    out = str(tmp_path / "out")
    m = convert_coco(out, coco["root"], opts=opts())
    assert m.dataset == "coco" and m.count("train") == 3 and m.count("val") == 2
    assert [s.count for s in m.shards("train")] == [2, 1]  # maxcount 2
    info = m.info["convert"]["splits"]
    assert info["train"]["stats"] == {"captions_dropped": 2}  # image 9 has 7 captions, keeps 5
    assert info["train"]["skipped"] == {}
    loader = make_loader(out, "train", None, None, batch_size=2, train=False, num_workers=0)
    samples = [s for batch in loader for s in batch]
    assert [s["meta"]["image_id"] for s in samples] == [9, 25, 30]  # id order
    for s in samples:
        iid = s["meta"]["image_id"]
        # annotation-id order (the fixture lists them reversed in the file), whitespace normalized
        assert s["meta"]["captions"] == captions_for(iid)
        assert s["image"].size == size_of(iid) == (s["meta"]["width"], s["meta"]["height"])
        assert s["meta"]["source_split"] == "train2014"
    # the JPEG is stored byte for byte
    raw = next(iter_raw(shard_urls(out, "train")[0]))
    src = os.path.join(coco["root"], "train2014", coco_name("train2014", 9))
    assert raw["jpg"] == open(src, "rb").read()
    assert [s["meta"]["image_id"] for s in read_split(out, "val")] == [42, 73]


def test_coco_karpathy_restval(coco, tmp_path):
    k = make_karpathy_coco(str(tmp_path / "dataset_coco.json"), coco,
                           {9: "train", 25: "restval", 30: "test", 42: "val", 73: "test"})
    folded = convert_coco(str(tmp_path / "a"), coco["root"], karpathy=k, opts=opts())
    assert folded.dataset == "coco-karpathy"
    assert {s: folded.count(s) for s in folded.splits} == {"train": 2, "val": 1, "test": 2}
    train = read_split(str(tmp_path / "a"), "train")
    assert [(s["meta"]["image_id"], s["meta"]["source_split"]) for s in train] == [(9, "train"), (25, "restval")]
    assert train[0]["meta"]["captions"] == captions_for(9)[:5]
    kept = convert_coco(str(tmp_path / "b"), coco["root"], karpathy=k, keep_restval=True, opts=opts(splits=("restval", "train")))
    assert {s: kept.count(s) for s in kept.splits} == {"train": 1, "restval": 1}


def test_coco_missing_images_listed_then_skipped(tmp_path):
    ids = list(range(1, 31))
    root = str(tmp_path / "coco")
    make_coco(root, train_ids=ids, val_ids=[99], no_file=tuple(ids[:25]))
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError) as e:
        convert_coco(out, root, opts=opts())
    msg = str(e.value)
    assert "train: missing_image: 25 images" in msg and "... and 5 more" in msg
    shown = msg.split("missing_image: 25 images: ")[1]
    assert all(f"{i} (train2014/" in shown for i in ids[:20]) and "21 (train2014" not in shown
    assert "--skip-bad" in msg and not os.path.exists(os.path.join(out, "manifest.json"))  # nothing written

    m = convert_coco(out, root, opts=opts(skip_bad=True))
    assert m.count("train") == 5 and m.count("val") == 1
    rec = m.info["convert"]["splits"]["train"]
    assert rec["skipped"] == {"missing_image": 25} and len(rec["skipped_ids"]["missing_image"]) == 20
    assert [s["meta"]["image_id"] for s in read_split(out, "train")] == ids[25:]


def test_coco_caption_problems(tmp_path):
    root = str(tmp_path / "coco")
    coco = make_coco(root, train_ids=[1, 2], val_ids=[3])
    path = os.path.join(root, "annotations", "captions_train2014.json")
    doc = json.load(open(path))
    doc["annotations"] = [a for a in doc["annotations"] if not (a["image_id"] == 2 and "thing 4" in a["caption"])]
    doc["annotations"].append({"id": 1, "image_id": 777, "caption": "an orphan caption"})
    json.dump(doc, open(path, "w"))
    with pytest.raises(ConversionError) as e:
        convert_coco(str(tmp_path / "out"), root, opts=opts())
    assert "too_few_captions: 1 image: 2 (4 captions, need 5)" in str(e.value)
    assert "caption_for_unknown_image: 1 image: 777" in str(e.value)
    # a Karpathy file with 4 sentences for an image is the same mismatch
    k = make_karpathy_coco(str(tmp_path / "k.json"), coco, {1: "train", 3: "val"})
    kd = json.load(open(k))
    kd["images"][1]["sentences"] = kd["images"][1]["sentences"][:4]
    json.dump(kd, open(k, "w"))
    with pytest.raises(ConversionError, match=r"val: too_few_captions: 1 image: 3 \(4 captions, need 5\)"):
        convert_coco(str(tmp_path / "out2"), root, karpathy=k, opts=opts())


# ----------------------------------------------------------------------------- Flickr30k


def test_flickr30k_token_and_karpathy_agree(tmp_path):
    f = make_flickr30k(str(tmp_path / "f30k"), {"train": [101, 102, 103], "val": [104], "test": [105]})
    a = convert_flickr30k(str(tmp_path / "a"), f["images"], karpathy=f["karpathy"], opts=opts())
    b = convert_flickr30k(str(tmp_path / "b"), f["images"], token=f["token"], split_lists=f["split_lists"], opts=opts())
    assert (a.dataset, b.dataset) == ("flickr30k-karpathy", "flickr30k")
    for split, ids in f["splits"].items():
        sa, sb = read_split(str(tmp_path / "a"), split), read_split(str(tmp_path / "b"), split)
        assert [s["meta"]["image_id"] for s in sa] == [s["meta"]["image_id"] for s in sb] == ids
        # the token file lists caption #4 first: order follows the number after '#'
        assert [s["meta"]["captions"] for s in sb] == [captions_for(i) for i in ids] == [s["meta"]["captions"] for s in sa]
    c = convert_flickr30k(str(tmp_path / "c"), f["images"], token=f["token"], opts=opts())
    assert list(c.splits) == ["all"] and c.count("all") == 5


def test_flickr30k_token_mismatches(tmp_path):
    f = make_flickr30k(str(tmp_path / "f30k"), {"train": [101, 102], "val": [103]}, no_file=(102,))
    with open(os.path.join(f["split_lists"], "test.txt"), "w") as fh:
        fh.write("555\n")  # listed, but no captions
    with open(f["token"], "a") as fh:
        fh.write("not a token line\n")
    with pytest.raises(ConversionError) as e:
        convert_flickr30k(str(tmp_path / "out"), f["images"], token=f["token"], split_lists=f["split_lists"], opts=opts())
    msg = str(e.value)
    assert "train: missing_image: 1 image: 102" in msg
    assert "test: no_captions: 1 image: 555" in msg
    assert "token file: bad_line: 1 image: line 16" in msg
    m = convert_flickr30k(str(tmp_path / "out"), f["images"], token=f["token"], split_lists=f["split_lists"],
                          opts=opts(skip_bad=True, splits=("train", "val")))
    assert m.count("train") == 1 and m.info["convert"]["splits"]["train"]["skipped"] == {"missing_image": 1}
    assert m.info["convert"]["skipped_outside_splits"]["token file"]["skipped"] == {"bad_line": 1}


# ----------------------------------------------------------------------------- Flickr30k Entities


def test_entities_phrase_box_links(tmp_path):
    f = make_flickr30k(str(tmp_path / "f30k"), {"train": [101, 102], "val": [103], "test": [104]})
    make_entities(f["split_lists"], [101, 102, 103, 104])
    m = convert_entities(str(tmp_path / "out"), f["images"], f["split_lists"], opts=opts())
    assert {s: m.count(s) for s in m.splits} == {"train": 2, "val": 1, "test": 1}
    # per image: 3 phrases link to a, 3 to b; 2 of c (scene, no box) + 1 notvisual stay unlinked
    assert m.info["convert"]["splits"]["train"]["stats"] == {"phrases": 12, "phrases_without_box": 6}
    s = read_split(str(tmp_path / "out"), "train")[1]
    assert s["meta"]["image_id"] == 102 and s["meta"]["captions"] == ENTITY_CLEAN
    w, h = size_of(102)
    # hand-computed: XML 1-based inclusive [2,3,10,12] -> [1,2,10,12]; [5,1,20,9] -> [4,0,20,9]; union [1,0,20,12]
    a, b = s["meta"]["objects"]
    assert a == {"box": [1.0, 0.0, 20.0, 12.0], "boxes": [[1.0, 2.0, 10.0, 12.0], [4.0, 0.0, 20.0, 9.0]],
                 "label": "people", "label_id": 0, "entity_id": 1021}
    assert b["box"] == [0.0, 0.0, float(w), float(h)] and b["label"] == "clothing" and b["label_id"] == 1
    p0 = s["meta"]["phrases"][0]
    assert [(p["text"], p["start"], p["end"], p["object"]) for p in p0] == [("A child", 0, 7, 0), ("a pink dress", 11, 23, 1)]
    assert s["meta"]["phrases"][4] == []  # only the scene entity: nothing to link
    assert s["meta"]["phrases"][2][0]["type"] == "people"  # first of /people/other


def test_entities_box_outside_and_size_mismatch(tmp_path):
    f = make_flickr30k(str(tmp_path / "f30k"), {"train": [101, 102, 103]})
    make_entities(f["split_lists"], [101, 102, 103], bad_box=(102,), size_lie=(103,))
    with pytest.raises(ConversionError) as e:
        convert_entities(str(tmp_path / "out"), f["images"], f["split_lists"], opts=opts())
    w, h = size_of(102)
    assert f"train: box_outside_image: 1 image: 102 (entity 1022: box [0.0, 0.0, {w + 5}.0, {h}.0] lies outside the {w}x{h} image)" in str(e.value)
    assert "train: size_mismatch: 1 image: 103" in str(e.value)
    m = convert_entities(str(tmp_path / "out"), f["images"], f["split_lists"], opts=opts(skip_bad=True))
    assert m.count("train") == 1
    assert m.info["convert"]["splits"]["train"]["skipped"] == {"box_outside_image": 1, "size_mismatch": 1}


def test_max_side_scales_boxes(tmp_path):
    f = make_flickr30k(str(tmp_path / "f30k"), {"train": [101]})
    make_entities(f["split_lists"], [101])
    m = convert_entities(str(tmp_path / "out"), f["images"], f["split_lists"], opts=opts(max_side=24))
    s = read_split(str(tmp_path / "out"), "train")[0]
    # 32 x 48 -> 16 x 24 (factor 0.5): union box [1, 0, 20, 12] -> [0.5, 0, 10, 6]
    assert s["image"].size == (16, 24) and s["meta"]["source_size"] == [32, 48]
    assert s["meta"]["objects"][0]["box"] == [0.5, 0.0, 10.0, 6.0]
    assert s["meta"]["objects"][1]["box"] == [0.0, 0.0, 16.0, 24.0]
    assert m.info["convert"]["options"]["max_side"] == 24


# ----------------------------------------------------------------------------- SALICON


def test_salicon_maps_resized_and_fixations(coco, tmp_path):
    make_salicon(str(tmp_path / "sal"), coco, train_ids=[9, 25], val_ids=[42])
    out = str(tmp_path / "out")
    m = convert_salicon(out, str(tmp_path / "sal"), coco["root"], opts=opts())
    assert {s: m.count(s) for s in m.splits} == {"train": 2, "val": 1}
    s = read_split(out, "train")[0]
    assert s["meta"]["image_id"] == 9 and s["meta"]["captions"] == captions_for(9)[:5]
    w, h = size_of(9)  # 30 x 40
    assert s["saliency"].size == s["image"].size == (w, h) and s["meta"]["saliency_source_size"] == [640, 480]
    sal = np.asarray(s["saliency"])
    assert (sal[:, : w // 2 - 1] == 200).all() and (sal[:, w // 2 + 1 :] == 50).all()  # left half bright
    # hand-computed: 1-based (x, y) in 640x480 -> ((x - 0.5) * 30/640, (y - 0.5) * 40/480)
    # (1, 1) -> (0.02, 0.04); (640, 480) -> (29.98, 39.96); (321, 241) -> (15.02, 20.04); (700, 10) dropped
    assert s["meta"]["fixations"] == [[0.02, 0.04, 0], [29.98, 39.96, 0], [15.02, 20.04, 1]]
    assert s["meta"]["fixations_dropped"] == 1


def test_salicon_unknown_map(coco, tmp_path):
    make_salicon(str(tmp_path / "sal"), coco, train_ids=[9], val_ids=[42], unknown=(5555,), fixations=False)
    with pytest.raises(ConversionError, match=r"train: map_for_unknown_image: 1 image: 5555 \(COCO_train2014_000000005555.png"):
        convert_salicon(str(tmp_path / "out"), str(tmp_path / "sal"), coco["root"], opts=opts())
    m = convert_salicon(str(tmp_path / "out"), str(tmp_path / "sal"), coco["root"], opts=opts(skip_bad=True))
    assert m.count("train") == 1 and m.info["convert"]["splits"]["train"]["skipped_ids"] == {
        "map_for_unknown_image": ["5555 (COCO_train2014_000000005555.png: no COCO train2014 image with captions)"]}
    assert "fixations" not in read_split(str(tmp_path / "out"), "train")[0]["meta"]


# ----------------------------------------------------------------------------- SCAN precomputed features


def test_scan_precomp_regions(tmp_path):
    pre = str(tmp_path / "data" / "f30k_precomp")
    t = make_precomp(pre)
    out = str(tmp_path / "out")
    m = convert_scan(out, pre, opts=opts())
    assert m.dataset == "scan-f30k_precomp" and m.info["convert"]["pixels"] is False
    assert {s: m.count(s) for s in m.splits} == {"train": 3, "val": 2, "test": 2}  # dev -> val
    for split, src in (("train", "train"), ("val", "dev")):
        for i, s in enumerate(read_split(out, split)):
            assert s["image"].size == (1, 1) and s["meta"]["pixels"] is False
            assert s["regions"].dtype == np.float32 and np.array_equal(s["regions"], t[src]["feats"][i])
            assert np.array_equal(s["region_boxes"], t[src]["boxes"][i])
            assert s["meta"]["image_id"] == f"{split}-{i:07d}" and s["meta"]["feature_row"] == i
            assert s["meta"]["source_id"] == t[src]["ids"][i]  # the ids file's id (they repeat across splits)
            assert s["meta"]["captions"] == t[src]["caps"][5 * i : 5 * i + 5]
            assert (s["meta"]["width"], s["meta"]["height"]) == tuple(t[src]["sizes"][i])


def test_scan_wrong_caption_count_is_fatal(tmp_path):
    pre = str(tmp_path / "coco_precomp")
    make_precomp(pre, counts={"train": 2, "testall": 2}, d=8, caption_lines={"testall": 9})
    for skip in (False, True):
        with pytest.raises(ConversionError, match=r"testall_caps.txt: 9 captions for 2 images .* exactly 5 per image \(10\)"):
            convert_scan(str(tmp_path / "out"), pre, opts=opts(skip_bad=skip))
    m = convert_scan(str(tmp_path / "out"), pre, opts=opts(splits=("train",)))  # the good split alone converts
    assert list(m.splits) == ["train"]


def test_scan_box_outside_image(tmp_path):
    pre = str(tmp_path / "f30k_precomp")
    make_precomp(pre, counts={"test": 3}, d=8)
    b = np.load(os.path.join(pre, "test_boxes.npy"))
    b[1, 5] = [0, 0, 500, 10]  # image 1 is 101 x 81
    np.save(os.path.join(pre, "test_boxes.npy"), b)
    with pytest.raises(ConversionError, match=r"test: box_outside_image: 1 image: 1007 \(row 1: box"):
        convert_scan(str(tmp_path / "out"), pre, opts=opts())
    m = convert_scan(str(tmp_path / "out"), pre, opts=opts(skip_bad=True))
    assert [s["meta"]["source_id"] for s in read_split(str(tmp_path / "out"), "test")] == [1000, 1014]
    assert m.info["convert"]["splits"]["test"]["skipped"] == {"box_outside_image": 1}


def test_scan_image_ids_unique_across_splits(tmp_path):
    """Without ids files each split's rows count from 0; the data set's image_ids must still be unique."""
    pre = str(tmp_path / "f30k_precomp")
    make_precomp(pre, d=8, ids=False)
    out = str(tmp_path / "out")
    m = convert_scan(out, pre, opts=opts())
    ids = [s["meta"]["image_id"] for split in m.splits for s in read_split(out, split)]
    assert len(ids) == len(set(ids)) == 7 and "val-0000001" in ids
    assert verify(out, progress=False) == []


def test_verify_images_catches_corrupt_files(coco, tmp_path):
    open(os.path.join(coco["root"], "val2014", coco_name("val2014", 73)), "wb").write(b"\xff\xd8 truncated")
    with pytest.raises(ConversionError, match=r"val: unreadable_image: 1 image: 73"):
        convert_coco(str(tmp_path / "out"), coco["root"], opts=opts(verify_images=True))
    m = convert_coco(str(tmp_path / "out"), coco["root"], opts=opts(verify_images=True, skip_bad=True))
    assert m.count("val") == 1 and m.info["convert"]["splits"]["val"]["skipped"] == {"unreadable_image": 1}


def test_refuses_to_mix_data_sets_in_one_folder(coco, tmp_path):
    out = str(tmp_path / "out")
    convert_coco(out, coco["root"], opts=opts())
    f = make_flickr30k(str(tmp_path / "f30k"), {"train": [101]})
    with pytest.raises(ShardFormatError, match="manifest.json: this folder holds 'coco'; write 'flickr30k-karpathy' to another"):
        convert_flickr30k(out, f["images"], karpathy=f["karpathy"], opts=opts())
    assert verify(out, progress=False) == []  # the refusal left the folder as it was


def test_scan_pickled_sizes_need_allow_pickle(tmp_path):
    pre = str(tmp_path / "f30k_precomp")
    make_precomp(pre, counts={"test": 2}, d=8, sizes=False)
    sizes = np.array([{"image_w": 120, "image_h": 90}, {"image_w": 64, "image_h": 48}], dtype=object)
    np.save(os.path.join(pre, "test_ims_size.npy"), sizes, allow_pickle=True)
    with pytest.raises(ConversionError, match="test_ims_size.npy: holds pickled Python objects; pass --allow-pickle"):
        convert_scan(str(tmp_path / "out"), pre, opts=opts())
    convert_scan(str(tmp_path / "out"), pre, allow_pickle=True, opts=opts())
    got = [(s["meta"]["width"], s["meta"]["height"]) for s in read_split(str(tmp_path / "out"), "test")]
    assert got == [(120, 90), (64, 48)]


# ----------------------------------------------------------------------------- resume


def test_resume_after_crash_keeps_complete_shards(coco, tmp_path):
    """A run that dies at the third shard leaves two complete shards; the re-run keeps them
    (same inode, mtime and bytes) and writes the rest."""
    bad = os.path.join(coco["root"], "train2014", coco_name("train2014", 30))
    good = open(bad, "rb").read()
    open(bad, "wb").write(b"not a jpeg")
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError, match=r"image_id 30: .*unreadable image"):
        convert_coco(out, coco["root"], opts=opts(maxcount=1, splits=("train",)))
    before = shard_state(out, "train")
    assert sorted(before) == ["train-000000.tar", "train-000001.tar"]
    open(bad, "wb").write(good)
    m = convert_coco(out, coco["root"], opts=opts(maxcount=1, splits=("train",)))
    after = shard_state(out, "train")
    assert m.count("train") == 3 and len(after) == 3
    assert all(after[name] == state for name, state in before.items())
    assert [s["meta"]["image_id"] for s in read_split(out, "train")] == [9, 25, 30]


def test_resume_rewrites_partial_shard_only(coco, tmp_path):
    out = str(tmp_path / "out")
    convert_coco(out, coco["root"], opts=opts(maxcount=1, splits=("train",)))
    before = shard_state(out, "train")
    partial = os.path.join(out, "train-000001.tar")
    content = [{k: v for k, v in r.items() if k != "__url__"} for r in iter_raw(partial)]
    with open(partial, "r+b") as fh:  # a half-written shard (e.g. a copy cut short)
        fh.truncate(os.path.getsize(partial) // 2)
    convert_coco(out, coco["root"], opts=opts(maxcount=1, splits=("train",)))
    after = shard_state(out, "train")
    assert after["train-000000.tar"] == before["train-000000.tar"] and after["train-000002.tar"] == before["train-000002.tar"]
    assert after["train-000001.tar"] != before["train-000001.tar"]  # a new file ...
    # ... with the same samples (tar headers carry write times, so compare members, not bytes)
    assert [{k: v for k, v in r.items() if k != "__url__"} for r in iter_raw(partial)] == content


def test_changed_input_rewrites_split(coco, tmp_path):
    out = str(tmp_path / "out")
    convert_coco(out, coco["root"], opts=opts())
    before = shard_state(out, "val")
    path = os.path.join(coco["root"], "annotations", "captions_train2014.json")
    doc = json.load(open(path))
    first = min((a for a in doc["annotations"] if a["image_id"] == 9), key=lambda a: a["id"])
    first["caption"] = "a corrected caption"  # the first caption of image 9
    json.dump(doc, open(path, "w"))
    convert_coco(out, coco["root"], opts=opts())
    assert read_split(out, "train")[0]["meta"]["captions"][0] == "a corrected caption"
    assert shard_state(out, "val") == before  # the unchanged split is resumed, not rewritten


# ----------------------------------------------------------------------------- complete or refused


def tars(root: str) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.endswith(".tar"))


def listed(root: str) -> list[str]:
    m = read_manifest(root)
    return sorted(s.name for split in m.splits for s in m.shards(split))


def test_failed_conversion_is_incomplete_until_a_rerun_finishes(coco, tmp_path, capsys):
    bad = os.path.join(coco["root"], "train2014", coco_name("train2014", 30))
    good = open(bad, "rb").read()
    open(bad, "wb").write(good[: len(good) // 2])  # a truncated JPEG: its header reads, its pixels do not
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError, match=r"image_id 30: .*unreadable image"):
        convert_coco(out, coco["root"], opts=opts(maxcount=1))
    assert tars(out) == ["train-000000.tar", "train-000001.tar"]
    manifest = os.path.join(out, "manifest.json")
    assert verify(out, progress=False) == [
        f"{manifest}: incomplete: its writer has not finished (re-run it to resume)",
        f"{manifest}: split 'train' has 2 samples, the plan is 3",
        f"{manifest}: split 'val' has 0 samples, the plan is 2",
    ]
    for read in (read_manifest, lambda root: make_loader(root, "train", None, None, batch_size=1, train=False)):
        with pytest.raises(ShardFormatError, match=f"^{re.escape(manifest)}: incomplete: "):
            read(out)
    from xray_match.cli import main

    assert main(["data", "verify", out, "--no-progress"]) == 1
    assert "incomplete" in capsys.readouterr().err
    open(bad, "wb").write(good)
    m = convert_coco(out, coco["root"], opts=opts(maxcount=1))
    assert m.count("train") == 3 and verify(out, progress=False) == [] and tars(out) == listed(out)


def test_refuses_a_non_empty_folder_without_manifest(coco, tmp_path, capsys):
    """Another data set's shards without their manifest: nothing is overwritten, the error names the folder."""
    from xray_match.cli_data import main

    f = make_flickr30k(str(tmp_path / "f30k"), {"train": [101, 102, 103]})
    out = str(tmp_path / "out")
    convert_flickr30k(out, f["images"], karpathy=f["karpathy"], opts=opts(maxcount=1))
    os.remove(os.path.join(out, "manifest.json"))
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    with pytest.raises(ShardFormatError, match=f"^{re.escape(out)}: not empty and has no manifest.json"):
        convert_coco(out, coco["root"], opts=opts())
    assert main(["coco", "--coco-root", coco["root"], "--out", out, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: not empty") and err.count("\n") == 1
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def test_reconverting_with_fewer_shards_leaves_exactly_the_manifests(coco, tmp_path):
    out = str(tmp_path / "out")
    convert_coco(out, coco["root"], opts=opts(maxcount=1))
    assert len(tars(out)) == 5
    convert_coco(out, coco["root"], opts=opts(maxcount=2))
    assert tars(out) == listed(out) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    convert_coco(out, coco["root"], opts=opts(maxcount=2, limit=1))
    assert tars(out) == listed(out) == ["train-000000.tar", "val-000000.tar"] and verify(out, progress=False) == []
    # a split that the input no longer has (restval folded back into train) goes with its shards
    k = make_karpathy_coco(str(tmp_path / "k.json"), coco, {9: "train", 25: "restval", 42: "val", 73: "test"})
    out = str(tmp_path / "karpathy")
    convert_coco(out, coco["root"], karpathy=k, keep_restval=True, opts=opts())
    assert "restval-000000.tar" in tars(out)
    m = convert_coco(out, coco["root"], karpathy=k, opts=opts())
    assert sorted(m.splits) == ["test", "train", "val"] and tars(out) == listed(out)
    assert verify(out, progress=False) == []  # image 25 is in train only


def test_coco_and_salicon_read_the_images_subfolder_layout(tmp_path, capsys):
    """``<root>/images/train2014`` (LAVIS, Karpathy's tools) as well as ``<root>/train2014``, and
    ``--images`` for image folders kept anywhere else."""
    from xray_match.cli_data import main

    coco = make_coco(str(tmp_path / "coco"), images_under="images")
    m = convert_coco(str(tmp_path / "a"), coco["root"], opts=opts())
    assert {s: m.count(s) for s in m.splits} == {"train": 3, "val": 2}
    k = make_karpathy_coco(str(tmp_path / "k.json"), coco, {9: "train", 42: "val", 73: "test"})
    m = convert_coco(str(tmp_path / "b"), coco["root"], karpathy=k, opts=opts())
    assert {s: m.count(s) for s in m.splits} == {"train": 1, "val": 1, "test": 1}
    make_salicon(str(tmp_path / "sal"), coco, train_ids=[9, 25], val_ids=[42], fixations=False)
    m = convert_salicon(str(tmp_path / "c"), str(tmp_path / "sal"), coco["root"], opts=opts())
    assert {s: m.count(s) for s in m.splits} == {"train": 2, "val": 1}

    elsewhere = str(tmp_path / "disk2" / "coco-images")
    shutil.move(coco["images"], elsewhere)
    train = os.path.join(coco["root"], "train2014")
    with pytest.raises(ConversionError, match=f"^{re.escape(train)}: the train2014 image folder not found "
                                              f"\\(nor {re.escape(os.path.join(coco['root'], 'images', 'train2014'))}\\); pass --images"):
        convert_coco(str(tmp_path / "d"), coco["root"], opts=opts())
    m = convert_coco(str(tmp_path / "d"), coco["root"], images=elsewhere, opts=opts())
    assert m.count("train") == 3 and m.info["convert"]["source"]["images"] == elsewhere
    m = convert_coco(str(tmp_path / "e"), coco["root"], karpathy=k, images=elsewhere, opts=opts())
    assert m.count("test") == 1
    m = convert_salicon(str(tmp_path / "f"), str(tmp_path / "sal"), coco["root"], images=elsewhere, opts=opts())
    assert m.count("train") == 2
    assert main(["coco", "--coco-root", coco["root"], "--images", elsewhere, "--out", str(tmp_path / "g"), "--no-progress"]) == 0
    assert main(["salicon", "--salicon", str(tmp_path / "sal"), "--coco-root", coco["root"], "--images", elsewhere,
                 "--out", str(tmp_path / "h"), "--no-progress"]) == 0
    capsys.readouterr()


def test_entities_without_split_lists_writes_one_split_all(tmp_path):
    f = make_flickr30k(str(tmp_path / "f30k"), {"train": [101, 102], "val": [103]})
    entities = str(tmp_path / "flickr30k_entities")  # Annotations/ and Sentences/ only
    make_entities(entities, [103, 101, 102])
    m = convert_entities(str(tmp_path / "out"), f["images"], entities, opts=opts())
    assert list(m.splits) == ["all"] and m.info["convert"]["split_scheme"] == "none (one split 'all')"
    assert [s["meta"]["image_id"] for s in read_split(str(tmp_path / "out"), "all")] == [101, 102, 103]
    with pytest.raises(ConversionError, match="no train.txt, val.txt or test.txt"):  # asked for lists: still required
        convert_entities(str(tmp_path / "out2"), f["images"], entities, split_lists=entities, opts=opts())


def test_remote_folder_complete_or_refused(coco, tmp_path):
    """The same rules on an fsspec file system that is not local (memory://, no rename)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    base = f"/{tmp_path.name}"
    url = f"memory://{base}/out"
    try:
        convert_coco(url, coco["root"], opts=opts(maxcount=1))
        assert verify(url, progress=False) == []
        convert_coco(url, coco["root"], opts=opts(maxcount=2))
        names = sorted(posixpath.basename(p) for p in fs.ls(f"{base}/out", detail=False))
        assert names == ["manifest.json", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
        fs.pipe(f"{base}/out/stray.tar", fs.cat(f"{base}/out/val-000000.tar"))
        assert verify(url, progress=False) == [f"{url}/stray.tar: a tar the manifest does not list"]
        fs.pipe(f"{base}/foreign/train-000000.tar", b"someone else's")
        with pytest.raises(ShardFormatError, match="foreign: not empty and has no manifest.json"):
            convert_coco(f"memory://{base}/foreign", coco["root"], opts=opts())
        assert fs.cat(f"{base}/foreign/train-000000.tar") == b"someone else's"
    finally:
        fs.rm(base, recursive=True)


# ----------------------------------------------------------------------------- CLI, URLs, Ray


def test_cli_commands(coco, tmp_path, capsys):
    import argparse

    from xray_match.cli_data import add_convert_commands, main

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="data_command")
    add_convert_commands(sub)
    assert set(sub.choices) == {"coco", "flickr30k", "entities", "salicon", "scan"}

    from xray_match.cli import main as xray_match_main  # the installed entry point, which hooks these in

    out = str(tmp_path / "out")
    rc = xray_match_main(["data", "coco", "--coco-root", coco["root"], "--out", out, "--workers", "2", "--maxcount", "1",
                          "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "coco -> " in printed and "train: 3 images in 3 shards, captions_dropped 2" in printed
    assert read_manifest(out).count("val") == 2

    os.remove(os.path.join(coco["root"], "val2014", coco_name("val2014", 42)))
    rc = main(["coco", "--coco-root", coco["root"], "--out", str(tmp_path / "o2"), "--no-progress"])
    assert rc == 2 and "val: missing_image: 1 image: 42" in capsys.readouterr().err


def test_fsspec_url_output_with_process_pool(tmp_path):
    f = make_flickr30k(str(tmp_path / "f30k"), {"train": [101, 102, 103, 104], "val": [105]})
    url = "file://" + str(tmp_path / "out")
    m = convert_flickr30k(url, f["images"], karpathy=f["karpathy"], opts=opts(workers=2, maxcount=1))
    assert m.count("train") == 4 and len(m.shards("train")) == 4
    assert [s["meta"]["image_id"] for s in read_split(url, "train")] == [101, 102, 103, 104]


@pytest.mark.ray
def test_ray_one_task_per_shard_then_local_resume(ray_cluster, tmp_path):
    pre = str(tmp_path / "f30k_precomp")
    t = make_precomp(pre, counts={"train": 5, "test": 2}, d=16)
    url = "file://" + str(tmp_path / "out")
    m = convert_scan(url, pre, opts=opts(use_ray=True, maxcount=2))
    assert [s.count for s in m.shards("train")] == [2, 2, 1]
    root = str(tmp_path / "out")
    before = shard_state(root, "train")
    # the local writer resumes a Ray-written folder: nothing to rewrite
    convert_scan(root, pre, opts=opts(maxcount=2))
    assert shard_state(root, "train") == before
    got = read_split(root, "train")
    assert all(np.array_equal(s["regions"], t["train"]["feats"][i]) for i, s in enumerate(got))
