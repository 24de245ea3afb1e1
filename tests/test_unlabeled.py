"""Unlabelled images (train.py --unlabeled): the detection losses never see them, the pseudo-box mask is FGFI's mask of
the same boxes given as labels, the stream's order (every image before any repeats, resumable, split across ranks),
the data source forms, and the one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import train
from distill import Distiller
from distill.pseudo import decode_outputs, pseudo_targets
from models.yolo import DetectionModel
from utils.dataloaders import LoadImagesAndLabels, StreamSampler, create_dataloader
from utils.general import UserError, check_dataset, non_max_suppression, yaml_load
from utils.loss import ComputeLoss

ROOT = Path(__file__).resolve().parents[1]
HYP = ROOT / "data/hyps/hyp.scratch-low.yaml"
SHIPPED = ROOT / "weights/yolov5s-synthetic.pt"  # a trained teacher: confident boxes on the built-in images


def _images(data: Path, n: int = 4, size: int = 128) -> torch.Tensor:
    """n letterboxed val images of the built-in data as a float batch in 0..1."""
    loader = create_dataloader(check_dataset(data)["val"], size, n, 32, rect=False)[0]
    return next(iter(loader))[0].float() / 255


def _student_and_distiller(teacher: Path, **kwargs) -> tuple[DetectionModel, Distiller]:
    torch.manual_seed(0)
    student = DetectionModel("yolov5n.yaml", nc=8).train()
    distiller = Distiller(student, teacher, "cpu", weights={"kd": 1.0, "box_kd": 0.05}, precision="fp32", **kwargs)
    distiller.check_student(student, adopt_anchors=True)
    return student, distiller


def test_unlabelled_images_give_no_detection_loss_and_nonzero_output_terms(teacher_pt):
    """YOLOv5's own loss on an image without labels is not 0: its objectness loss teaches "no object anywhere". The
    unlabelled loss gives exactly 0 for box, objectness and class, and its gradient is the output terms' alone."""
    student, distiller = _student_and_distiller(teacher_pt, imitation_weight=0.0)
    compute_loss = ComputeLoss(student, yaml_load(HYP), terms=distiller.loss_terms, unlabeled=distiller.unlabeled_terms)
    assert compute_loss.names == ("box", "obj", "cls", "kd", "box_kd", "kd_u", "box_kd_u")
    imgs = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))  # non-square
    preds, inputs = distiller(student, imgs, None)

    _, plain = compute_loss(preds, torch.zeros((0, 6)), **inputs)  # as if the images were labelled "empty"
    assert plain["obj"] > 0  # what the unlabelled path must never add

    loss, items = compute_loss.unlabeled_loss(preds, **inputs)
    assert set(items) == set(compute_loss.names)
    assert all(items[k].item() == 0.0 for k in ("box", "obj", "cls", "kd", "box_kd"))
    assert items["kd_u"] > 0 and items["box_kd_u"] >= 0
    grads = torch.autograd.grad(loss, preds, retain_graph=True)
    want = torch.autograd.grad(
        (compute_loss.terms["kd"][0] * compute_loss.terms["kd"][1](preds=preds, balance=compute_loss.balance, **inputs)
         + compute_loss.terms["box_kd"][0] * compute_loss.terms["box_kd"][1](
             preds=preds, anchors=compute_loss.anchors, **inputs)) * len(imgs),
        preds,
    )  # fmt: skip
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


def test_unlabelled_output_terms_are_balanced_against_the_labelled_detection_gradient(teacher_pt):
    """A balanced run holds each stream's output terms to the detection loss's gradient norm of the same step."""
    student, distiller = _student_and_distiller(teacher_pt, imitation_weight=0.0)
    terms = {k: (100.0, loss) for k, (_, loss) in distiller.loss_terms.items()}  # far above the detection loss
    compute_loss = ComputeLoss(student, yaml_load(HYP), terms=terms, balanced=terms, unlabeled=terms)
    imgs = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3], [1, 2, 0.4, 0.6, 0.2, 0.4]])
    preds, inputs = distiller(student, imgs, targets)
    compute_loss(preds, targets, **inputs)
    norm_det = compute_loss.detection_norm
    preds_u, inputs_u = distiller(student, imgs.flip(-1), None)
    loss_u, items = compute_loss.unlabeled_loss(preds_u, **inputs_u)
    assert items["kd_u"] > 0
    grads = torch.autograd.grad(loss_u / len(imgs), preds_u)  # loss = items' sum * batch size
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    torch.testing.assert_close(norm, norm_det, rtol=1e-4, atol=1e-6)


def test_decode_outputs_equals_detect_inference():
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=3).eval()
    imgs = torch.rand(2, 3, 96, 160)
    inference, raw = model(imgs)
    torch.testing.assert_close(decode_outputs(model.model[-1], raw), inference)


def test_pseudo_targets_are_the_teachers_nms_boxes_as_labels(tiny_data):
    from utils.checkpoint import attempt_load

    teacher = attempt_load(SHIPPED, device="cpu").float().eval()
    imgs = _images(tiny_data)
    inference, raw = teacher(imgs)
    got = pseudo_targets(teacher.model[-1], raw, imgs.shape[2:], conf=0.25)
    assert len(got)  # a trained teacher finds objects
    dets = non_max_suppression(inference, conf_thres=0.25, iou_thres=0.45)
    h, w = imgs.shape[2:]
    want = []
    for i, d in enumerate(dets):  # independent conversion: clip, then centre and size over the image side
        for x1, y1, x2, y2, _, c in d.tolist():
            x1, x2 = (min(max(v, 0.0), w) for v in (x1, x2))
            y1, y2 = (min(max(v, 0.0), h) for v in (y1, y2))
            want.append([i, c, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h])
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert len(pseudo_targets(teacher.model[-1], raw, imgs.shape[2:], conf=1.0)) == 0


@pytest.mark.parametrize("layers", [None, "detect"])
def test_pseudo_box_mask_equals_fgfi_mask_of_the_same_boxes_as_labels(tiny_data, layers):
    student, distiller = _student_and_distiller(SHIPPED, imitation_layers=layers, pseudo_conf=0.25)
    imgs = _images(tiny_data)
    _, inputs = distiller(student, imgs, None)
    pseudo = inputs["pseudo"]
    assert len(pseudo) and pseudo[:, 0].unique().numel() > 1
    _, _, masks = student(
        imgs, target=pseudo, imitation_layers=distiller.student_layers, iou_factor=distiller.iou_factor,
        region=distiller.imitation_region, anchor_t=distiller.anchor_t if distiller.matched else None,
    )  # fmt: skip
    masks = masks if isinstance(masks, list) else [masks]
    got = inputs["mask"] if isinstance(inputs["mask"], list) else [inputs["mask"]]
    assert len(got) == len(masks)
    assert all(torch.equal(a, b) for a, b in zip(got, masks))
    assert sum(a.sum() for a in got) > 0


def test_pseudo_conf_one_keeps_fgfi_on_labelled_images_only(teacher_pt):
    student, distiller = _student_and_distiller(teacher_pt, pseudo_conf=1.0)
    assert distiller.unlabeled_terms == ["kd", "box_kd"]
    _, inputs = distiller(student, torch.rand(1, 3, 64, 64), None)
    assert "mask" not in inputs and "pseudo" not in inputs and "teacher_preds" in inputs
    _, with_pseudo = _student_and_distiller(teacher_pt, pseudo_conf=0.5)
    assert with_pseudo.unlabeled_terms == ["imitation", "kd", "box_kd"]


def test_stream_uses_every_image_before_any_repeats_and_resumes_where_it_was():
    n, seed = 7, 3
    stream = iter(StreamSampler(n, seed))
    items = [next(stream) for _ in range(3 * n + 2)]
    for p in range(3):  # each pass: every image once, in a shuffle of its own
        indices = [i for q, i in items[p * n : (p + 1) * n]]
        assert sorted(indices) == list(range(n)) and {q for q, _ in items[p * n : (p + 1) * n]} == {p}
    assert [i for _, i in items[:n]] != [i for _, i in items[n : 2 * n]]
    resumed = iter(StreamSampler(n, seed, start=10))
    assert [next(resumed) for _ in range(len(items) - 10)] == items[10:]
    # two ranks, each 2 items in: disjoint shares that interleave into the single-process stream from item 4
    ranks = [iter(StreamSampler(n, seed, start=2, rank=r, world_size=2)) for r in range(2)]
    shares = [[next(s) for _ in range(5)] for s in ranks]
    single = iter(StreamSampler(n, seed, start=4))
    assert [x for pair in zip(*shares) for x in pair] == [next(single) for _ in range(10)]


def test_unlabelled_dataset_never_reads_labels_and_takes_globs(tiny_data, tmp_path):
    train_dir = Path(check_dataset(tiny_data)["train"])  # labels exist beside these images: never read
    hyp = yaml_load(HYP)
    data = LoadImagesAndLabels(train_dir, 64, augment=True, hyp=hyp, unlabeled=True)
    assert data.n == 16 and all(len(lb) == 0 for lb in data.labels)
    img, labels, _, _ = data[(0, 3)]
    assert labels.shape == (0, 6) and img.shape == (3, 64, 64)
    by_glob = LoadImagesAndLabels(str(train_dir / "*.jpg"), 64, unlabeled=True)
    assert by_glob.im_files == data.im_files
    listing = tmp_path / "u.txt"
    listing.write_text("\n".join(data.im_files[:5]) + "\n")
    assert LoadImagesAndLabels(listing, 64, unlabeled=True).n == 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="unlabeled: No images found in"):
        LoadImagesAndLabels(tmp_path / "empty", 64, unlabeled=True, prefix="unlabeled: ")


def test_data_yaml_unlabeled_key_resolves_against_path(tiny_data, tmp_path):
    data = yaml_load(tiny_data)
    data["unlabeled"] = "images/train"
    file = tmp_path / "u.yaml"
    file.write_text(yaml.safe_dump(data))
    assert check_dataset(file)["unlabeled"] == str((Path(data["path"]) / "images/train").resolve())


def test_unlabelled_refusals_one_line_each(tiny_data, teacher_pt, tmp_path):
    images = str(Path(check_dataset(tiny_data)["train"]))
    common = dict(data=str(tiny_data), cfg="yolov5n.yaml", epochs=1, imgsz=64, batch_size=4, project=str(tmp_path),
                  device="cpu", workers=0, noplots=True)  # fmt: skip
    teacher = dict(ft_weights=str(teacher_pt))
    (tmp_path / "none").mkdir()
    for kwargs, message in (
        (dict(unlabeled=images), "--unlabeled .*: images without labels are learnt from a teacher: add --ft_weights"),
        (dict(**teacher, unlabeled=str(tmp_path / "none")), "unlabeled: .*No images found in"),
        (dict(**teacher, unlabeled=images, rect=True), "--rect is not supported with unlabelled images"),
        (dict(**teacher, unlabeled=images, quad=True), "--quad is not supported with unlabelled images"),
        (dict(**teacher, unlabeled=images, unlabeled_batch_size=0), "--unlabeled-batch-size 0: must be >= 1"),
        (dict(**teacher, unlabeled=images, pseudo_conf=2.0), r"--pseudo-conf 2.0: must be in \[0, 1\]"),
        (dict(**teacher, unlabeled=images, kd_weight=0.0, box_kd_weight=0.0, pseudo_conf=1.0),
         "no distillation term reads unlabelled images"),
    ):  # fmt: skip
        with pytest.raises(UserError, match=message):
            train.run(**common, **kwargs)
    assert not list(tmp_path.glob("exp*/weights/*.pt"))


def test_training_with_unlabelled_images_logs_each_stream(tiny_data, teacher_pt, tmp_path, log_lines):
    """End to end: one epoch with a labelled and an unlabelled stream; results.csv has a column per term and stream,
    and the data YAML's unlabeled: key is used only with a teacher."""
    import pandas as pd

    data = yaml_load(tiny_data)
    data["unlabeled"] = str(Path(check_dataset(tiny_data)["val"]))
    file = tmp_path / "u.yaml"
    file.write_text(yaml.safe_dump(data))
    common = dict(data=str(file), cfg="yolov5n.yaml", epochs=1, imgsz=64, batch_size=4, project=str(tmp_path),
                  device="cpu", workers=0, noplots=True, unlabeled_batch_size=2)  # fmt: skip
    train.run(**common, name="student")
    assert any("not used without a teacher" in line for line in log_lines)
    train.run(**common, name="distilled", ft_weights=str(teacher_pt))
    df = pd.read_csv(tmp_path / "distilled/results.csv", skipinitialspace=True)
    columns = [c.strip() for c in df.columns]
    for name in ("imitation", "kd", "box_kd", "imitation_u", "kd_u", "box_kd_u"):
        assert f"train/{name}_loss" in columns
    assert df.iloc[0][[c for c in df.columns if c.strip() == "train/kd_u_loss"][0]] > 0
    assert "train/kd_u_loss" not in pd.read_csv(tmp_path / "student/results.csv").columns.str.strip()
