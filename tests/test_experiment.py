"""experiment.py end to end on tiny data (several seeds, the ablation arms, reuse of finished runs), its statistics,
and the shipped teacher with its dataset fingerprint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import experiment
import train
from data.synthetic import NAMES, dataset_fingerprint, generate_dataset
from distill.options import build_distiller, resolve_distill_options
from models.yolo import DetectionModel
from tests.conftest import save_random_model
from utils.checkpoint import load_checkpoint
from utils.general import UserError, check_yaml, load_hyp

pytestmark = pytest.mark.slow
TINY = dict(epochs=1, imgsz=64, batch=8, workers=0, noplots=True)


def test_seeds_train_each_arm_per_seed_with_mean_std_and_gain(tmp_path, tiny_data):
    df = experiment.run_experiment("cpu", project=tmp_path, seeds=[0, 1], data=str(tiny_data), **TINY)
    assert list(zip(df["arm"], df["seed"].fillna(-1))) == [
        ("teacher", -1), ("student", 0), ("default", 0), ("student", 1), ("default", 1)
    ]  # fmt: skip
    for arm in ("student", "default"):
        for seed in (0, 1):
            run = tmp_path / f"{arm}-seed{seed}"
            opt = yaml.safe_load((run / "opt.yaml").read_text())
            assert opt["seed"] == seed and bool(opt["ft_weights"]) == (arm == "default")
            if arm == "default":  # --ft_weights alone: FGFI and the output terms at their defaults
                assert (opt["imitation_weight"], opt["kd_weight"], opt["box_kd_weight"]) == (0.01, 1.0, 0.05)
            assert (run / "weights/best.pt").is_file() and (run / "experiment.json").is_file()
    # the summary's statistics, recomputed here with numpy
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("arm")
    student = df[df["arm"] == "student"]["mAP50_95"].to_numpy()
    default_runs = df[df["arm"] == "default"]["mAP50_95"].to_numpy()
    teacher = float(df.loc[df["arm"] == "teacher", "mAP50_95"].iloc[0])
    assert summary.loc["default", "seeds"] == 2
    assert summary.loc["default", "mAP50_95"] == pytest.approx(default_runs.mean())
    assert summary.loc["default", "mAP50_95_std"] == pytest.approx(np.std(default_runs, ddof=1))
    gain = default_runs.mean() - student.mean()
    assert summary.loc["default", "gain50_95"] == pytest.approx(gain)
    # one epoch on tiny data may leave every run at 0 mAP: no seed-to-seed spread (pooled std 0) and then no ratio,
    # NaN, never inf; likewise gap_closed without a teacher-student gap. Checked either way (test_summarize_* below
    # checks both ratios on values where they exist).
    pooled = math.sqrt((np.var(default_runs, ddof=1) + np.var(student, ddof=1)) / 2)
    expected = gain / pooled if pooled > 0 else math.nan
    assert summary.loc["default", "gain_in_pooled_std"] == pytest.approx(expected, nan_ok=True)
    expected = gain / (teacher - student.mean()) if teacher > student.mean() else math.nan
    assert summary.loc["default", "gap_closed"] == pytest.approx(expected, nan_ok=True)
    assert summary.loc["student", "gain50_95"] == 0
    report = (tmp_path / "results.md").read_text()
    assert "default changes the student's mAP50-95" in report and "teacher-student gap" in report
    assert (tmp_path / "map_curve.png").stat().st_size > 0 and not (tmp_path / "ablation.png").exists()
    # per-seed gains and the epoch-by-epoch comparison with the same seed's student
    default = df[df["arm"] == "default"].set_index("seed")
    for seed in (0, 1):
        want = default.loc[seed, "mAP50_95"] - df[(df["arm"] == "student") & (df["seed"] == seed)]["mAP50_95"].item()
        assert default.loc[seed, "gain_vs_student"] == pytest.approx(want)
    curves = pd.read_csv(tmp_path / "curves.csv")
    assert list(zip(curves["arm"], curves["seed"])) == [("default", 0), ("default", 1)]
    assert (curves["epochs"] == 1).all() and "Per epoch against the student alone" in report

    # a second call with the same settings reuses the finished runs instead of training them again
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*-seed*/weights/best.pt")}
    again = experiment.run_experiment("cpu", project=tmp_path, seeds=[0, 1], data=str(tiny_data), **TINY)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    pd.testing.assert_frame_equal(again.drop(columns="train_min"), df.drop(columns="train_min"))


def _as_trained(settings: dict, student) -> tuple:
    """What train.run(**settings) would train: its options after the distillation defaults, and their Distiller."""
    opt = train.parse_opt(True, args=[])
    for k, v in settings.items():
        if not k.endswith("_sha256"):
            setattr(opt, k, v)
    if not opt.ft_weights:
        return opt, None
    hyp = load_hyp(check_yaml(opt.hyp, "--hyp"))
    explicit = resolve_distill_options(opt, hyp)
    return opt, build_distiller(opt, student, torch.device("cpu"), hyp, explicit)


def test_every_ablation_arm_builds_its_distiller_with_its_settings(tmp_path, tiny_data, monkeypatch):
    student = DetectionModel("yolov5n.yaml", nc=len(NAMES))
    built = {}

    def build_only(arm, seed, settings, cfg, project):  # instead of training: the options and the Distiller
        built[arm] = _as_trained(settings, student)
        run = project / settings["name"]
        run.mkdir(parents=True, exist_ok=True)
        (run / "results.csv").write_text("epoch,metrics/mAP_0.5:0.95,train/box_loss\n0,0.1,0.05\n")
        return {"arm": arm, "seed": seed, "P": 0.0, "R": 0.0, "mAP50": 0.1, "mAP50_95": 0.1, "train_min": 0.0}

    monkeypatch.setattr(experiment, "_train_arm", build_only)
    df = experiment.run_experiment("cpu", project=tmp_path, seeds=[0], ablation=True, data=str(tiny_data), **TINY)
    assert list(df["arm"]) == ["teacher", *experiment.MAIN_ARMS, *experiment.ABLATION_ARMS]
    expected = {
        "fgfi": ("fgfi", "default", 0.5, 0.01),
        "gtbox": ("gtbox", "default", 0.5, 0.01),
        "full": ("full", "default", 0.5, 0.01),
        "fgfi-3levels-sum": ("fgfi", "detect", 0.5, 0.01),
        "fgfi-3levels-mean": ("fgfi", "detect", 0.5, 0.01),
        "fgfi-3levels-channel": ("fgfi", "detect", 0.5, 0.01),
        "fgfi-psi0.3": ("fgfi", "default", 0.3, 0.01),
        "fgfi-psi0.7": ("fgfi", "default", 0.7, 0.01),
        "fgfi-w0.003": ("fgfi", "default", 0.5, 0.003),
        "fgfi-w0.03": ("fgfi", "default", 0.5, 0.03),
    }
    for arm, (region, layers, psi, weight) in expected.items():
        opt, distiller = built[arm]
        assert (opt.imitation_region, opt.imitation_layers, opt.iou_factor) == (region, layers, psi), arm
        assert opt.imitation_weight == pytest.approx(weight) and opt.kd_weight == opt.box_kd_weight == 0, arm
        assert list(distiller.loss_weights) == ["imitation"], arm
    for reduce in ("sum", "mean", "channel"):
        assert built[f"fgfi-3levels-{reduce}"][0].imitation_reduce == reduce
    assert len(built["fgfi-3levels-sum"][1].student_layers) == 3 and len(built["fgfi"][1].student_layers) == 1
    kd, box = experiment.KD["kd_weight"], experiment.KD["box_kd_weight"]
    for arm, weights in {
        "default": (0.01, kd, box), "kd": (0, kd, box), "fgfi+kd": (0.01, kd, box), "kd-cls": (0, kd, 0),
        "kd-box": (0, 0, box), "kd-w3": (0, 3.0, box), "kd-t2": (0, kd, box),
    }.items():  # fmt: skip
        opt, distiller = built[arm]
        assert (opt.imitation_weight, opt.kd_weight, opt.box_kd_weight) == pytest.approx(weights), arm
        names = [n for n, w in zip(("imitation", "kd", "box_kd"), weights) if w]
        assert list(distiller.loss_weights) == names, arm  # each term switched on, and only those
    assert (built["kd"][0].kd_temperature, built["kd-t2"][0].kd_temperature) == (1.0, 2.0)
    assert built["default"][1].gate and not built["coupled"][1].gate and built["default-gate"][1].gate
    assert [built[a][1].decouple is not False for a in ("default", "coupled", "default-decouple")] == [1, 0, 1]
    caps = {a: built[a][0].distill_cap for a in ("default", "default-nocap", "default-gate-decouple", "default-cap2")}
    assert caps == {"default": None, "default-nocap": 0.0, "default-gate-decouple": 0.0, "default-cap2": 2.0}
    assert built["student"][1] is None


def test_ablation_arms_train_each_term_into_its_column_and_the_tables(tmp_path, tiny_data):
    stale = tmp_path / "student-seed0" / "results.csv"  # an unfinished earlier run in the same folder
    stale.parent.mkdir()
    stale.write_text("epoch,train/box_loss\n0,1.0\n1,1.0\n")
    arms = ["student", "fgfi", "kd-cls", "kd-box", "fgfi+kd"]  # every arm's settings: the test above
    df = experiment.run_experiment("cpu", project=tmp_path, seeds=[0], arms=arms, data=str(tiny_data), **TINY)
    assert list(df["arm"]) == ["teacher", *arms]
    assert len(pd.read_csv(stale, skipinitialspace=True)) == 1  # replaced, not appended to
    kd, box = experiment.KD["kd_weight"], experiment.KD["box_kd_weight"]
    for arm, weights in {
        "fgfi": (0.01, 0, 0),
        "kd-cls": (0, kd, 0),
        "kd-box": (0, 0, box),
        "fgfi+kd": (0.01, kd, box),
    }.items():
        opt = yaml.safe_load((tmp_path / f"{arm}-seed0/opt.yaml").read_text())
        assert (opt["imitation_weight"], opt["kd_weight"], opt["box_kd_weight"]) == pytest.approx(weights), arm
        columns = pd.read_csv(tmp_path / f"{arm}-seed0/results.csv", nrows=0).columns.str.strip()
        names = [n for n, w in zip(("imitation", "kd", "box_kd"), weights) if w]
        terms = [c for c in columns if c.startswith("train/") and c != "train/gate"]  # the gate is logged beside them
        assert [c for c in terms if c[6:-5] not in ("box", "obj", "cls")] == [f"train/{n}_loss" for n in names], (
            arm
        )  # each term switched on is its own column, and only those
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary["arm"]) == ["teacher", *arms]
    assert (tmp_path / "ablation.png").stat().st_size > 0


def test_settings_compare_by_the_files_they_name(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "real/t.pt").write_bytes(b"t")
    (tmp_path / "link").symlink_to(tmp_path / "real")  # a worktree whose runs/ links to the main one's
    monkeypatch.chdir(tmp_path)
    a = {"ft_weights": str(tmp_path / "link/t.pt"), "project": "real", "epochs": 3, "hyp": "hyp.short.yaml"}
    b = {"ft_weights": "real/t.pt", "project": str(tmp_path / "real"), "epochs": 3, "hyp": "hyp.short.yaml"}
    assert experiment._same_settings(a, b)
    assert not experiment._same_settings(a, {**b, "epochs": 4})
    assert not experiment._same_settings(a, {**b, "ft_weights": "other.pt"})
    assert not experiment._same_settings(a, {**b, "seed": 0})


def test_a_file_in_another_checkout_is_the_same_setting_when_its_bytes_are(tmp_path):
    for checkout in ("main", "worktree"):  # the shipped teacher and a data YAML, as each checkout has them
        (tmp_path / checkout).mkdir()
        (tmp_path / checkout / "teacher.pt").write_bytes(b"the same teacher")
        (tmp_path / checkout / "data.yaml").write_text("nc: 3\n")
    a, b = ({"ft_weights": str(tmp_path / c / "teacher.pt"), "data": str(tmp_path / c / "data.yaml"), "epochs": 3}
            for c in ("main", "worktree"))  # fmt: skip
    assert experiment._same_settings(a, b)
    (tmp_path / "worktree/data.yaml").write_text("nc: 4\n")  # edited: another setting, even at the same size
    assert not experiment._same_settings(a, b)
    (tmp_path / "worktree/data.yaml").unlink()  # gone: compared by name, which differs
    assert not experiment._same_settings(a, b)
    # the project folder named by a worktree since removed: the run was found in this one, so it is not compared
    gone, here = {**a, "project": str(tmp_path / "gone/runs")}, {**a, "project": str(tmp_path / "main")}
    assert experiment._same_settings(gone, here)
    # a teacher at a path since removed, with the sha256 both runs recorded: the same teacher when the hashes agree
    moved = {**a, "ft_weights": str(tmp_path / "gone/teacher.pt"), "teacher_sha256": "ab"}
    assert experiment._same_settings(moved, {**a, "teacher_sha256": "ab"})
    assert not experiment._same_settings(moved, {**a, "teacher_sha256": "cd"})


def test_a_finished_run_with_other_settings_is_moved_aside_never_deleted(tmp_path, monkeypatch):
    def finished(run, settings, weights):
        (run / "weights").mkdir(parents=True)
        (run / "weights/best.pt").write_bytes(weights)
        (run / "experiment.json").write_text(json.dumps({"settings": settings, "result": {"mAP50_95": 0.5}}))

    trained = []

    def fake_train(**settings):  # what train.run leaves behind, without training
        trained.append(settings)
        (tmp_path / settings["name"] / "weights").mkdir(parents=True)
        (tmp_path / settings["name"] / "weights/best.pt").write_bytes(b"new")

    monkeypatch.setattr(experiment.train, "run", fake_train)
    monkeypatch.setattr(experiment, "_validate", lambda *a, **k: {"mAP50_95": 0.25})
    run = tmp_path / "teacher"
    finished(run, {"name": "teacher", "epochs": 36}, b"first")
    finished(tmp_path / "teacher-old", {"name": "teacher", "epochs": 12}, b"older")
    result = experiment._train_arm("teacher", 0, {"name": "teacher", "epochs": 36}, {}, tmp_path)
    assert result == {"mAP50_95": 0.5} and not trained  # same settings: reused
    result = experiment._train_arm("teacher", 0, {"name": "teacher", "epochs": 30}, {}, tmp_path)
    assert result == {"mAP50_95": 0.25} and [t["epochs"] for t in trained] == [30]
    assert (tmp_path / "teacher-old/weights/best.pt").read_bytes() == b"older"
    assert (tmp_path / "teacher-old2/weights/best.pt").read_bytes() == b"first"  # the next free name
    assert json.loads((run / "experiment.json").read_text())["settings"]["epochs"] == 30
    (run / "weights/best.pt").unlink()  # unfinished: replaced, nothing to keep
    experiment._train_arm("teacher", 0, {"name": "teacher", "epochs": 30}, {}, tmp_path)
    assert len(trained) == 2 and not (tmp_path / "teacher-old3").exists()


def test_summarize_gain_in_pooled_std_and_gap_closed():
    """summarize on known numbers: the ratios where they exist, NaN where there is no spread or no gap."""
    rows = [("teacher", None, 0.6, 0.40), ("student", 0, 0.3, 0.10), ("student", 1, 0.5, 0.20)]
    rows += [("fgfi", 0, 0.4, 0.20), ("fgfi", 1, 0.6, 0.30)]
    df = pd.DataFrame(rows, columns=["arm", "seed", "mAP50", "mAP50_95"])
    stats = experiment.summarize(df).set_index("arm")
    assert list(stats.index) == ["teacher", "student", "fgfi"] and list(stats["seeds"]) == [1, 2, 2]
    fgfi = stats.loc["fgfi"]
    assert (fgfi["mAP50_95"], fgfi["gain50_95"], fgfi["gain50"]) == pytest.approx((0.25, 0.10, 0.10))
    # both arms' std is 0.05 * sqrt(2), so is the pooled std: a gain of 0.1 is sqrt(2) of it
    assert fgfi["mAP50_95_std"] == pytest.approx(0.05 * math.sqrt(2))
    assert fgfi["gain_in_pooled_std"] == pytest.approx(math.sqrt(2))
    assert fgfi["gap_closed"] == pytest.approx(0.10 / (0.40 - 0.15))  # 40% of the teacher-student gap
    assert stats.loc["student", "gain50_95"] == 0 and stats.loc["student", "gap_closed"] == 0
    # no spread over the seeds and a teacher no better than the student: no ratio, NaN (not inf, not 0)
    flat = pd.DataFrame(
        [("teacher", None, 0.1, 0.05), ("student", 0, 0.2, 0.1), ("student", 1, 0.2, 0.1)]
        + [("fgfi", 0, 0.3, 0.2), ("fgfi", 1, 0.3, 0.2)],
        columns=["arm", "seed", "mAP50", "mAP50_95"],
    )
    stats = experiment.summarize(flat).set_index("arm")
    assert stats.loc["fgfi", "gain50_95"] == pytest.approx(0.1)
    assert math.isnan(stats.loc["fgfi", "gain_in_pooled_std"]) and math.isnan(stats.loc["fgfi", "gap_closed"])
    # the report says so in words: two seeds without spread are not "one seed", and no gap is not "nan%"
    cfg = dict(student="yolov5n.yaml", epochs=1, imgsz=64, batch=8, optimizer="AdamW", hyp="hyp.short.yaml", data="x")
    line = experiment._report(flat, experiment.summarize(flat), "cpu", cfg, [0, 1], 60.0).splitlines()[-1]
    assert line.startswith("fgfi changes the student's mAP50-95 by +0.1000 (2 seeds, but no seed-to-seed spread")
    assert "one seed" not in line and "nan" not in line and "no teacher-student gap to close" in line


def test_compare_curves_epochs_ahead_and_the_mean_gain_over_the_last_epochs():
    """compare_curves on hand-made curves: the epochs ahead, the epoch from which the run stays ahead, and the mean
    gain over the last LAST_EPOCHS epochs, against the same seed's student; a seed without a student is skipped."""
    epochs = 8
    student = [0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80]
    run = [0.15, 0.10, 0.35, 0.30, 0.55, 0.65, 0.75, 0.80]  # ahead at 0, 2, 4, 5, 6; level at 7; behind at 1, 3

    def curve(maps, box):
        return pd.DataFrame({experiment.MAP_COLUMN: maps, experiment.BOX_COLUMN: [box] * epochs})

    curves = {("student", 0): curve(student, 0.05), ("fgfi", 0): curve(run, 0.04), ("fgfi", 1): curve(run, 0.04)}
    table = experiment.compare_curves(curves)
    assert len(table) == 1  # seed 1 has no student to compare with
    row = table.iloc[0]
    assert (row["arm"], row["seed"], row["epochs"], row["epochs_ahead"]) == ("fgfi", 0, epochs, 5)
    assert row["ahead_from_epoch"] == 4  # behind last at epoch 3, at or above the student from 4 to the end
    last = experiment.LAST_EPOCHS
    expected = sum(r - s for r, s in zip(run[-last:], student[-last:])) / last  # (-0.1 + 0.05 * 3 + 0) / 5
    assert row["gain_last"] == pytest.approx(expected) and expected == pytest.approx(0.01)
    assert (row["box_loss_last"], row["student_box_loss_last"]) == (0.04, 0.05)


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="--teacher"):
        experiment.run_experiment("cpu", teacher=str(tmp_path / "missing.pt"), project=tmp_path)
    with pytest.raises(UserError, match="--arms"):
        experiment.run_experiment("cpu", project=tmp_path, arms=["student", "fitnets"])
    for bad in ("", "0,a", "1,1"):
        with pytest.raises(UserError, match="--seeds"):
            experiment.parse_seeds(bad)
    assert experiment.parse_seeds("2, 0,1") == [2, 0, 1]


def test_shipped_teacher_is_a_stripped_fp16_yolov5s_for_the_builtin_classes():
    ckpt = load_checkpoint(experiment.TEACHER)
    model = ckpt["model"]
    assert ckpt["optimizer"] is None and ckpt["ema"] is None and ckpt["epoch"] == -1
    assert next(model.parameters()).dtype.is_floating_point and all(p.dtype.itemsize == 2 for p in model.parameters())
    assert model.nc == len(NAMES) and list(dict(model.names).values()) == list(NAMES)
    assert model.yaml["width_multiple"] == 0.50 and experiment.TEACHER.stat().st_size < 16e6
    card = json.loads(experiment.TEACHER_CARD.read_text())
    assert 0 < card["val"]["mAP50_95"] < card["val"]["mAP50"] <= 1 and "train.py" in card["command"]


def test_teacher_fingerprint_matches_the_builtin_generator(tmp_path):
    """Fails when data/synthetic.py no longer makes the labels the shipped teacher was trained on: retrain it with
    `python experiment.py --train-teacher` and commit the new weights/yolov5s-synthetic.{pt,json}."""
    expected = json.loads(experiment.TEACHER_CARD.read_text())["dataset"]
    generate_dataset(tmp_path)  # the built-in dataset's own call (data/synthetic.yaml: generate_dataset(path))
    assert dataset_fingerprint(tmp_path) == expected


def test_fingerprint_sees_a_changed_label_or_setting(tmp_path):
    generate_dataset(tmp_path, n_train=3, n_val=2, seed=4)
    before = dataset_fingerprint(tmp_path, seed=4)
    assert before == dataset_fingerprint(tmp_path, seed=4)  # deterministic
    label = tmp_path / "labels/val/000001.txt"
    label.write_text(label.read_text() + "0 0.5 0.5 0.1 0.1\n")
    assert dataset_fingerprint(tmp_path, seed=4)["labels_sha256"] != before["labels_sha256"]
    assert dataset_fingerprint(tmp_path, seed=5)["generator"] != before["generator"]


def test_own_data_and_a_pretrained_student(tmp_path, tiny_data):
    """--data, --imgsz, --batch-size and --student-weights: the arms fine-tune the given student (its weights in
    opt.yaml, its hash in the record) on the given data; out-of-range values are one-line errors. The student keeps
    the default anchors (--noautoanchor), as the teacher has them: --kd-weight refuses a student with others."""
    student = tmp_path / "pretrained.pt"
    train_dir = tmp_path / "pre"
    import train

    train.run(data=str(tiny_data), cfg="yolov5n.yaml", epochs=1, imgsz=64, batch_size=8, device="cpu", workers=0,
              noplots=True, project=str(tmp_path), name="pre", exist_ok=True, noautoanchor=True)  # fmt: skip
    (train_dir / "weights/last.pt").rename(student)
    project = tmp_path / "exp"
    experiment.run_experiment(
        "cpu", project=project, seeds=[0], arms=["student", "kd"], data=str(tiny_data), student_weights=str(student),
        epochs=1, imgsz=64, batch=4, workers=0, noplots=True,
    )  # fmt: skip
    for arm in ("student", "kd"):
        opt = yaml.safe_load((project / f"{arm}-seed0/opt.yaml").read_text())
        assert (opt["weights"], opt["cfg"], opt["batch_size"], opt["imgsz"]) == (str(student.resolve()), "", 4, 64)
        record = json.loads((project / f"{arm}-seed0/experiment.json").read_text())
        assert record["settings"]["student_sha256"] and record["settings"]["data"] == str(tiny_data)
    other = save_random_model("yolov5n", tmp_path / "coco_teacher.pt", nc=80)  # a teacher of other classes
    with pytest.raises(UserError, match=r"^--teacher .*coco_teacher.pt has 80 classes but --data .* has 8"):
        experiment.run_experiment("cpu", project=project, data=str(tiny_data), teacher=str(other), arms=["kd"])
    for kwargs, flag in ((dict(imgsz=0), "--imgsz"), (dict(batch=0), "--batch-size"), (dict(epochs=0), "--epochs"),
                         (dict(student_weights=str(tmp_path / "none.pt")), "--student-weights")):  # fmt: skip
        with pytest.raises(UserError, match=flag):
            experiment.run_experiment("cpu", project=project, data=str(tiny_data), **kwargs)


def test_student_weights_by_official_name_are_downloaded(tmp_path, tiny_data, monkeypatch):
    """--student-weights yolov5s.pt missing on disk is fetched as train.py --weights fetches it (here from a local
    "release"); a preset whose own student is missing names the flag that fixes it."""
    from tests.test_downloads import Release
    from utils.downloads import RELEASE_URL_ENV

    save_random_model("yolov5n", tmp_path / "s.pt")
    release = Release()
    release.serve("/v7.0/yolov5s.pt", (tmp_path / "s.pt").read_bytes())
    release.thread.start()
    monkeypatch.setenv(RELEASE_URL_ENV, release.url("/v7.0"))
    target = tmp_path / "w/yolov5s.pt"
    try:
        with pytest.raises(UserError, match="--teacher"):  # stops at the missing teacher, after the student
            experiment.run_experiment(
                "cpu", project=tmp_path / "p", data=str(tiny_data), teacher=str(tmp_path / "none.pt"),
                student_weights=str(target),
            )  # fmt: skip
    finally:
        release.server.shutdown()
        release.server.server_close()
    assert release.requests == ["/v7.0/yolov5s.pt"] and target.read_bytes() == (tmp_path / "s.pt").read_bytes()
    monkeypatch.setitem(experiment.PRESETS, "glyphs", {**experiment.PRESETS["glyphs"], "student_weights": "no.pt"})
    with pytest.raises(UserError, match=r"^--student-weights no.pt: file not found; give --student-weights yolov5n"):
        experiment.run_experiment("glyphs", project=tmp_path / "p")


def test_unlabelled_arms_split_the_data_and_match_wall_time(tmp_path, tiny_data):
    """A quarter-labelled split of the tiny data: the labelled and unlabelled images are disjoint and together the
    train split; default+u trains with the stream, upper on every label, and student@time for the minutes default+u
    took."""
    arms = ["student", "default", "default+u", "upper", "student@time"]
    df = experiment.run_experiment(
        "cpu", project=tmp_path, seeds=[0], arms=arms, data=str(tiny_data), unlabeled="quarter", **TINY
    )
    assert list(df["arm"]) == ["teacher", *arms]
    folder = tmp_path / "data"
    labelled = (folder / "labelled.txt").read_text().split()
    unlabeled = (folder / "unlabeled.txt").read_text().split()
    train_images = sorted(str(f) for f in (tiny_data.parent / "images/train").glob("*.jpg"))
    assert len(labelled) == 4 and not set(labelled) & set(unlabeled) and sorted(labelled + unlabeled) == train_images
    opts = {arm: yaml.safe_load((tmp_path / f"{arm}-seed0/opt.yaml").read_text()) for arm in arms}
    assert opts["default+u"]["unlabeled"] == str(folder / "unlabeled.txt") and not opts["default"]["unlabeled"]
    assert yaml.safe_load(Path(opts["upper"]["data"]).read_text())["train"] == str(tiny_data.parent / "images/train")
    assert not opts["upper"]["ft_weights"] and yaml.safe_load(Path(opts["student"]["data"]).read_text())[
        "train"
    ] == str(folder / "labelled.txt")
    minutes = df.set_index("arm")["train_min"]
    want = max(1, round(minutes["default+u"] / minutes["student"]))
    assert opts["student@time"]["epochs"] == want
    columns = pd.read_csv(tmp_path / "default+u-seed0/results.csv", nrows=0).columns.str.strip()
    assert "train/kd_u_loss" in columns


def test_equal_time_epochs():
    rows = [dict(arm="student", seed=0, train_min=2.0), dict(arm="default+u", seed=0, train_min=7.0)]
    assert experiment._equal_time_epochs(rows, "student", 0, 9) == 32  # 9 * 7 / 2 = 31.5
    assert experiment._equal_time_epochs(rows, "default+u", 0, 9) == 9
    with pytest.raises(experiment.UserError, match="student@time needs the student and default\\+u arms of seed 1"):
        experiment._equal_time_epochs(rows, "student", 1, 9)
