"""Dataset loading: label verification and cache, rect batches, collate, RAM cache, LoadImages, the synthetic set."""

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from data.synthetic import STYLES, generate_dataset
from data.synthetic import main as synthetic_main
from utils.dataloaders import LoadImages, LoadImagesAndLabels, create_dataloader
from utils.general import LOGGER, UserError
from utils.labels import load_label_cache, verify_image_label

ROOT = Path(__file__).resolve().parents[1]


def write_image(path: Path, w: int = 64, h: int = 48, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = np.full((h, w, 3), 90, np.uint8)
    im[h // 4 : h // 2, w // 4 : w // 2] = (value, 200, 255 - value)
    assert cv2.imwrite(str(path), im)
    return path


def write_label(root: Path, name: str, text: str) -> Path:
    path = root / "labels" / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


GOOD = "0 0.5 0.5 0.2 0.3\n1 0.25 0.4 0.1 0.1\n"


@pytest.fixture
def broken_dataset(tmp_path):
    """One image per failure kind; returns (images dir, {name: expected outcome})."""
    im_dir = tmp_path / "images"
    cases = {}

    def add(name, label=GOOD, outcome="ok", suffix=".jpg"):
        write_image(im_dir / f"{name}{suffix}", value=len(cases) * 10)
        if label is not None:
            write_label(tmp_path, name, label)
        cases[name] = outcome

    add("good_a")
    add("good_b", "2 0.1 0.9 0.05 0.05\n", suffix=".png")
    add("missing", None, "missing")
    add("empty", "", "empty")
    add("duplicates", GOOD + "0 0.5 0.5 0.2 0.3\n", "ok")
    add("wrong_columns", "0 0.5 0.5 0.2\n", "corrupt")
    add("six_columns", "0 0.5 0.5 0.2 0.2 0.9\n", "corrupt")
    add("not_a_number", "0 0.5 abc 0.2 0.2\n", "corrupt")
    add("out_of_range", "0 0.5 0.5 1.2 0.2\n", "corrupt")
    add("negative", "0 -0.5 0.5 0.2 0.2\n", "corrupt")
    add("class_too_big", "3 0.5 0.5 0.2 0.2\n", "ok")  # nc = 3: kept (not corrupt), the dataset then stops
    (im_dir / "garbage.jpg").write_bytes(b"this is not an image at all" * 20)
    write_label(tmp_path, "garbage", GOOD)
    cases["garbage"] = "corrupt"
    data = (im_dir / "good_a.jpg").read_bytes()
    (im_dir / "truncated.jpg").write_bytes(data[: len(data) // 2])
    write_label(tmp_path, "truncated", GOOD)
    cases["truncated"] = "corrupt"
    write_image(im_dir / "tiny.png", w=6, h=6)
    write_label(tmp_path, "tiny", GOOD)
    cases["tiny"] = "corrupt"
    return im_dir, cases


def test_verify_image_label_each_kind(broken_dataset):
    im_dir, cases = broken_dataset
    reasons = {
        "wrong_columns": "5 columns",
        "six_columns": "5 columns",
        "not_a_number": "non-numeric",
        "out_of_range": "out of bounds",
        "negative": "negative",
        "class_too_big": "nc=3",
        "garbage": "unreadable image",
        "truncated": "runcated",  # PIL's verify or the JPEG end-marker check, whichever notices first
        "tiny": "< 10 pixels",
    }
    for name, outcome in cases.items():
        im_file = str(next(im_dir.glob(f"{name}.*")))
        lb_file = str(im_dir.parent / "labels" / f"{name}.txt")
        f, lb, shape, _, nm, nf, ne, nc, msg = verify_image_label((im_file, lb_file, "", 3))
        assert (nm, ne, nc) == (outcome == "missing", outcome == "empty", outcome == "corrupt"), name
        if outcome == "corrupt":
            assert f is None and im_file in msg and reasons[name] in msg, msg
            if name not in ("garbage", "truncated", "tiny"):
                assert lb_file in msg  # label problems name the label file
        else:
            assert f == im_file and lb.shape[1] == 5 and shape == (64, 48)
    *_, msg = verify_image_label((str(im_dir / "duplicates.jpg"), str(im_dir.parent / "labels/duplicates.txt"), ""))
    too_big = (str(im_dir / "class_too_big.jpg"), str(im_dir.parent / "labels/class_too_big.txt"), "", 3)
    assert "class id 3 >= nc=3" in verify_image_label(too_big)[-1]
    assert "1 duplicate labels removed" in msg
    # without nc, a large class id is fine
    assert verify_image_label((str(im_dir / "class_too_big.jpg"), str(im_dir.parent / "labels/class_too_big.txt"), ""))[
        0
    ]


def test_dataset_counts_and_good_images_load(broken_dataset):
    im_dir, cases = broken_dataset
    with pytest.raises(UserError, match=r"class_too_big\.txt: class 3 exceeds nc=3"):
        LoadImagesAndLabels(im_dir, img_size=64, batch_size=4, nc=3)
    ds = LoadImagesAndLabels(im_dir, img_size=64, batch_size=4, nc=4)
    n_corrupt = sum(v == "corrupt" for v in cases.values())
    bad_images = 3  # garbage, truncated, tiny: their label files are never read
    # as in YOLOv5, "found" counts label files read, including the corrupt ones
    assert ds.counts == {"found": len(cases) - 1 - bad_images, "missing": 1, "empty": 1, "corrupt": n_corrupt}
    names = {Path(f).stem for f in ds.im_files}
    assert names == {k for k, v in cases.items() if v != "corrupt"}
    by_name = {Path(f).stem: lb for f, lb in zip(ds.im_files, ds.labels)}
    assert len(by_name["duplicates"]) == 2 and len(by_name["missing"]) == 0 and len(by_name["empty"]) == 0
    np.testing.assert_allclose(by_name["good_a"], np.array([[0, 0.5, 0.5, 0.2, 0.3], [1, 0.25, 0.4, 0.1, 0.1]]), 1e-6)
    for i in range(ds.n):
        img, labels, path, shapes = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 64, 64)
        assert len(labels) == len(by_name[Path(path).stem])
        assert shapes[0] == (48, 64)


def test_label_cache_round_trips_and_never_unpickles(tmp_path):
    for i in range(2):
        write_image(tmp_path / "images" / f"{i}.jpg")
        write_label(tmp_path, str(i), f"{i} 0.5 0.5 0.2 0.{i + 2}\n")
    built = LoadImagesAndLabels(tmp_path / "images", img_size=64)
    cache = tmp_path / "labels.cache"
    reread = LoadImagesAndLabels(tmp_path / "images", img_size=64)  # from the cache
    for a, b in zip(built.labels, reread.labels):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(built.shapes, reread.shapes)

    class Payload:  # unpickling this would create a file
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    import pickle

    cache.write_bytes(pickle.dumps(Payload()))  # a hostile cache file
    ds = LoadImagesAndLabels(tmp_path / "images", img_size=64)
    assert not (tmp_path / "pwned").exists()  # never unpickled: the cache is rebuilt
    assert len(ds.labels) == 2 and load_label_cache(cache)["results"] == (2, 0, 0, 0, 2)


def test_label_cache_reused_and_invalidated(tmp_path):
    for i in range(3):
        write_image(tmp_path / "images" / f"{i}.jpg")
        write_label(tmp_path, str(i), f"{i} 0.5 0.5 0.2 0.2\n")
    cache = tmp_path / "labels.cache"  # beside the labels/ dir, as YOLOv5
    LoadImagesAndLabels(tmp_path / "images", img_size=64)
    assert cache.is_file() and not list(tmp_path.glob("*.tmp*"))
    first = load_label_cache(cache)
    assert first["results"] == (3, 0, 0, 0, 3) and first["version"] == LoadImagesAndLabels.cache_version
    mtime = cache.stat().st_mtime_ns
    LoadImagesAndLabels(tmp_path / "images", img_size=64)
    assert cache.stat().st_mtime_ns == mtime  # reused
    with pytest.raises(UserError, match="class 2 exceeds nc=2"):  # nc changed: rebuilt, class 2 >= nc stops
        LoadImagesAndLabels(tmp_path / "images", img_size=64, nc=2)
    assert load_label_cache(cache)["nc"] == 2
    write_label(tmp_path, "0", "0 0.5 0.5 0.2 0.2\n0 0.1 0.1 0.1 0.1\n")  # edited label: new hash
    ds = LoadImagesAndLabels(tmp_path / "images", img_size=64)
    assert sorted(len(x) for x in ds.labels) == [1, 1, 2]


def test_label_cache_sees_an_edit_to_the_same_size(tmp_path):
    """A label edited in place to the same byte count (class 1 -> 0) must not keep its cached class: the cache key
    holds each file's modification time, not only the total size (YOLOv5's blind spot)."""
    for i in range(2):
        write_image(tmp_path / "images" / f"{i}.jpg")
        write_label(tmp_path, str(i), "1 0.5 0.5 0.2 0.2\n")
    ds = LoadImagesAndLabels(tmp_path / "images", img_size=64)
    assert [x[:, 0].tolist() for x in ds.labels] == [[1.0], [1.0]]
    label = tmp_path / "labels" / "0.txt"
    before = label.stat()
    label.write_text("0 0.5 0.5 0.2 0.2\n")  # same size
    # a later modification time, as an edit a moment later has (the test runs faster than the clock's granularity)
    os.utime(label, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    assert label.stat().st_size == before.st_size
    ds = LoadImagesAndLabels(tmp_path / "images", img_size=64)
    assert [x[:, 0].tolist() for x in ds.labels] == [[0.0], [1.0]]


def test_no_labels_is_a_user_error(tmp_path):
    write_image(tmp_path / "images" / "a.jpg")
    with pytest.raises(UserError, match="No labels found"):
        LoadImagesAndLabels(tmp_path / "images", img_size=64)
    with pytest.raises(UserError, match="does not exist"):
        LoadImagesAndLabels(tmp_path / "nowhere", img_size=64)


def test_txt_list_single_cls_and_min_items(tmp_path):
    for i, text in enumerate(["0 0.5 0.5 0.2 0.2\n", "2 0.5 0.5 0.2 0.2\n1 0.2 0.2 0.1 0.1\n", ""]):
        write_image(tmp_path / "images" / f"{i}.jpg")
        write_label(tmp_path, str(i), text)
    (tmp_path / "list.txt").write_text("./images/0.jpg\n./images/1.jpg\n\n./images/2.jpg\n")
    ds = LoadImagesAndLabels(tmp_path / "list.txt", img_size=64, single_cls=True)
    assert ds.n == 3 and all((x[:, 0] == 0).all() for x in ds.labels)
    assert (tmp_path / "list.cache").is_file()  # a list's cache sits beside the list
    ds = LoadImagesAndLabels([str(tmp_path / "images")], img_size=64, min_items=2)
    assert [Path(f).stem for f in ds.im_files] == ["1"]


def test_rect_batch_shapes_are_minimal_and_used(tmp_path):
    sizes = [(96, 64), (64, 96), (80, 80), (100, 40), (40, 100), (90, 72), (50, 50)]
    for i, (w, h) in enumerate(sizes):
        write_image(tmp_path / "images" / f"{i}.png", w, h)
        write_label(tmp_path, str(i), "0 0.5 0.5 0.2 0.2\n")
    stride, size = 32, 128
    ds = LoadImagesAndLabels(tmp_path / "images", img_size=size, batch_size=2, rect=True, stride=stride)
    ar = ds.shapes[:, 1] / ds.shapes[:, 0]
    assert (np.diff(ar) >= 0).all()  # sorted by aspect ratio
    for b, (bh, bw) in enumerate(ds.batch_shapes):
        assert bh % stride == 0 and bw % stride == 0 and max(bh, bw) <= size
        members = np.nonzero(ds.batch == b)[0]
        fits = []
        for i in members:
            w, h = ds.shapes[i]
            r = size / max(w, h)
            fits.append((h * r, w * r))
            img = ds[i][0]
            assert tuple(img.shape[1:]) == (bh, bw)
        need_h, need_w = max(x[0] for x in fits), max(x[1] for x in fits)
        assert need_h <= bh + 1e-6 and need_w <= bw + 1e-6  # every image fits ...
        assert bh - stride < need_h - 1e-6 and bw - stride < need_w - 1e-6  # ... and no smaller shape would do


def test_collate_puts_image_index(tmp_path):
    counts = [2, 0, 3]
    for i, n in enumerate(counts):
        write_image(tmp_path / "images" / f"{i}.jpg")
        write_label(tmp_path, str(i), "".join(f"{i} 0.5 0.5 0.{k + 1} 0.2\n" for k in range(n)))
    loader, ds = create_dataloader(tmp_path / "images", 64, 3, 32, workers=0, prefix="val: ")
    imgs, targets, paths, shapes = next(iter(loader))
    assert imgs.shape == (3, 3, 64, 64) and imgs.dtype == torch.uint8
    assert targets.shape == (5, 6)
    assert targets[:, 0].tolist() == [0, 0, 2, 2, 2]
    assert targets[:, 1].tolist() == [0, 0, 2, 2, 2]  # class == image number here
    assert [Path(p).stem for p in paths] == ["0", "1", "2"] and len(loader) == 1
    imgs4, targets4, paths4, _ = LoadImagesAndLabels.collate_fn4([ds[i] for i in (0, 1, 2, 0)])
    assert imgs4.shape == (1, 3, 128, 128) and len(paths4) == 1 and (targets4[:, 0] == 0).all()


def test_cache_ram_and_disk_equal_no_cache(tmp_path):
    for i, (w, h) in enumerate([(96, 64), (64, 80)]):
        write_image(tmp_path / "images" / f"{i}.png", w, h, value=40 * i)
        write_label(tmp_path, str(i), "0 0.5 0.5 0.2 0.2\n")
    plain = LoadImagesAndLabels(tmp_path / "images", img_size=64)
    ram = LoadImagesAndLabels(tmp_path / "images", img_size=64, cache_images="ram")
    assert all(x is not None for x in ram.ims)
    disk = LoadImagesAndLabels(tmp_path / "images", img_size=64, cache_images="disk")
    assert len(list((tmp_path / "images").glob("*.npy"))) == 2
    for i in range(2):
        a, b, c = plain[i], ram[i], disk[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0])
        assert torch.equal(a[1], b[1]) and a[3] == b[3] == c[3]


@pytest.fixture
def sources(tmp_path):
    for i in range(3):
        write_image(tmp_path / "imgs" / f"{i}.jpg", 80, 60, value=30 * i)
    (tmp_path / "imgs" / "notes.md").write_text("not an image")
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for k in range(6):
        writer.write(np.full((48, 64, 3), 40 * k, np.uint8))
    writer.release()
    return tmp_path


def test_load_images_sources(sources):
    imgs = sources / "imgs"
    single = list(LoadImages(str(imgs / "1.jpg"), img_size=64, stride=32))
    assert len(single) == 1
    path, im, im0, cap, s = single[0]
    assert im.shape == (3, 64, 64) and im.flags["C_CONTIGUOUS"] and im0.shape == (60, 80, 3) and cap is None
    # pixel (x=30, y=22) of the 80x60 original is inside the rectangle; scaled 0.8 and padded 8 px on top
    np.testing.assert_allclose(im[:, 8 + 22 * 4 // 5, 30 * 4 // 5], im0[22, 30, ::-1], atol=12)  # RGB
    np.testing.assert_allclose(im[:, 25, 24], (225, 200, 30), atol=12)
    assert "image 1/1" in s
    assert len(LoadImages(str(imgs), img_size=64)) == 3
    assert [Path(x[0]).name for x in LoadImages(str(imgs / "*.jpg"), img_size=64)] == ["0.jpg", "1.jpg", "2.jpg"]
    (sources / "list.txt").write_text(f"imgs/2.jpg\n{imgs / '0.jpg'}\n")
    assert sorted(Path(x[0]).name for x in LoadImages(str(sources / "list.txt"))) == ["0.jpg", "2.jpg"]
    assert len(list(LoadImages([str(imgs / "0.jpg"), str(imgs / "1.jpg")]))) == 2
    with pytest.raises(UserError, match="does not exist"):
        LoadImages(str(sources / "missing.jpg"))
    with pytest.raises(UserError, match="no images or videos found in --source"):
        LoadImages(str(sources / "imgs" / "*.md"))


@pytest.mark.parametrize("vid_stride", [1, 2])
def test_load_images_video(sources, vid_stride):
    ds = LoadImages(str(sources / "clip.avi"), img_size=64, vid_stride=vid_stride)
    frames = list(ds)
    assert ds.mode == "video" and len(frames) == 6 // vid_stride and ds.frames == 6 // vid_stride
    means = [f[2].mean() for f in frames]
    expected = [40 * k for k in range(vid_stride - 1, 6, vid_stride)]  # frame k has value 40k
    np.testing.assert_allclose(means, expected, atol=4)
    assert frames[0][3] is not None and "video 1/1 (1/" in frames[0][4]


def test_load_images_skips_unreadable_with_warning(sources):
    (sources / "imgs" / "broken.jpg").write_bytes(b"\x00" * 100)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    LOGGER.addHandler(handler)
    try:
        names = [Path(x[0]).name for x in LoadImages(str(sources / "imgs"), img_size=64)]
    finally:
        LOGGER.removeHandler(handler)
    assert names == ["0.jpg", "1.jpg", "2.jpg"]
    assert any("broken.jpg" in r.getMessage() for r in records)


@pytest.mark.parametrize("style", list(STYLES))
def test_synthetic_deterministic_and_valid(tmp_path, style):
    st = STYLES[style]
    a = generate_dataset(tmp_path / "a", n_train=6, n_val=2, seed=3, style=style)
    synthetic_main(["--root", str(tmp_path / "b"), "--n-train", "6", "--n-val", "2", "--seed", "3", "--style", style])
    c = generate_dataset(tmp_path / "c", n_train=6, n_val=2, seed=4, style=style)
    labels_a = sorted((a / "labels").rglob("*.txt"))
    assert len(labels_a) == 8
    n_boxes = 0
    for f in labels_a:
        rel = f.relative_to(a)
        assert f.read_bytes() == (tmp_path / "b" / rel).read_bytes()
        im = cv2.imread(str(a / "images" / rel.parent.name / f"{f.stem}.jpg"))
        assert im.shape[1::-1] in st.image_sizes
        rows = np.loadtxt(f, ndmin=2).reshape(-1, 5)
        n_boxes += len(rows)
        assert ((rows[:, 0] >= 0) & (rows[:, 0] < len(st.names)) & (rows[:, 0] == rows[:, 0].round())).all()
        xy, wh = rows[:, 1:3], rows[:, 3:5]
        assert (xy - wh / 2 >= 0).all() and (xy + wh / 2 <= 1).all() and (wh > 0).all()
        side = min(im.shape[:2])
        # no trivially tiny objects: the longer box side at least ~2/3 of the smallest extent (a rotated thin bar)
        assert (wh * im.shape[1::-1] >= 0.66 * st.min_size * side).any(1).all()
        assert (wh * im.shape[1::-1] <= st.max_size * side + 2).all()
    assert n_boxes >= 8
    assert any(f.read_bytes() != (c / f.relative_to(a)).read_bytes() for f in labels_a)
    ds = LoadImagesAndLabels(a / "images" / "train", img_size=64, nc=len(st.names))
    assert ds.counts["corrupt"] == 0 and ds.n == 6


def test_glyphs_yaml_names_its_generator():
    """data/glyphs.yaml's classes are the glyph style's, in its order, and its build script asks for that style."""
    data = yaml.safe_load((ROOT / "data/glyphs.yaml").read_text())
    assert list(data["names"].values()) == list(STYLES["glyphs"].names)
    assert 'style="glyphs"' in data["download"]
