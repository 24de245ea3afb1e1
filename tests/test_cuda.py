"""CUDA-only checks of the distillation step: AMP student, fp16 (channels_last) teacher, mask built on the GPU from GPU
targets, the sparse adapter path equal to the dense one on the GPU."""

from __future__ import annotations

import pytest
import torch

from distill import Distiller, FeatureAdapters, feature_channels, imitation_loss, imitation_mask, teacher_features
from distill.loss import Adapter
from distill.sparse import SPARSE_MAX_SHARE, gather_cells, masked_cells
from distill.terms import imitation_term
from models.yolo import DetectionModel
from utils.general import yaml_load
from utils.loss import ComputeLoss

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT_HYP = "data/hyps/hyp.scratch-low.yaml"


def _targets(device):
    return torch.tensor(
        [[0, 1, 0.30, 0.40, 0.20, 0.30], [0, 2, 0.70, 0.25, 0.10, 0.10], [2, 0, 0.50, 0.50, 0.60, 0.40]], device=device
    )


def test_amp_distillation_step_on_cuda():
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    student = DetectionModel("yolov5n.yaml", nc=3).to(device).train()
    teacher = DetectionModel("yolov5s.yaml", nc=3).to(device).eval().requires_grad_(False).half()
    layers = student.imitation_points()
    adapters = FeatureAdapters(feature_channels(student, layers), feature_channels(teacher, layers)).to(device)
    hyp = yaml_load(ROOT_HYP)
    compute_loss = ComputeLoss(student, hyp, terms={"imitation": (0.01, imitation_term)})
    optimizer = torch.optim.SGD(list(student.parameters()) + list(adapters.parameters()), lr=0.01)
    scaler = torch.amp.GradScaler("cuda")
    imgs = torch.rand(4, 3, 128, 160, device=device)
    targets = _targets(device)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}

    with torch.autocast("cuda"):
        pred, feat, mask = student(imgs, target=targets)
        t_feats = teacher_features(teacher, imgs, layers)
        loss, items = compute_loss(pred, targets, teacher=t_feats, student=adapters([feat]), mask=[mask])
    assert mask.device.type == "cuda" and mask.shape == (4, 1, 16, 20)
    assert t_feats[0].dtype == torch.float32 and not t_feats[0].requires_grad
    assert items["imitation"].dtype == torch.float32 and torch.isfinite(loss)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k
    assert next(teacher.parameters()).dtype == torch.float16


def test_mask_on_gpu_equals_cpu():
    anchors = torch.tensor([[1.25, 1.625], [2.0, 3.75], [4.125, 2.875]])
    targets = _targets("cpu")
    cpu = imitation_mask(targets, anchors, (3, 16, 20))
    gpu = imitation_mask(targets.cuda(), anchors.cuda(), (3, 16, 20))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)


def test_sparse_equals_dense_on_cuda():
    """The sparse adapter + loss on the GPU: the dense path's value and gradients, and the CPU's."""
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    adapter = Adapter(8, 12, 3).to(device)
    x, t = torch.randn(3, 8, 10, 14, device=device), torch.randn(3, 12, 10, 14, device=device)
    mask = (torch.rand(3, 1, 10, 14, device=device) < 0.3).float()
    mask[0, 0, 0, 0] = mask[2, 0, -1, -1] = 1  # corners: zero padding
    results = []
    for sparse in (False, True):
        adapter.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        if sparse:
            (cells,) = masked_cells([mask], float("inf"))
            loss = imitation_loss(adapter(leaf, cells), gather_cells(t, cells))
        else:
            loss = imitation_loss(adapter(leaf), t, mask)
        loss.backward()
        results.append([loss, leaf.grad, adapter.conv.weight.grad, adapter.conv.bias.grad])
    for d, s in zip(*results):
        torch.testing.assert_close(s, d, rtol=1e-4, atol=1e-5)
    (cpu_cells,) = masked_cells([mask.cpu()], float("inf"))
    assert cells.device.type == "cuda" and cells.cpu().tolist() == cpu_cells.tolist()


def test_distiller_amp_step_on_cuda_dense_by_default(teacher_pt):
    """Distiller on CUDA with AMP and channels_last: fp16 channels_last teacher, the dense conv by default (the sparse
    crossover is not measured on a GPU), finite loss, gradients to the student and adapters only, and the sparse path
    (when asked for) gives the dense path's loss items."""
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    student = DetectionModel("yolov5n.yaml", nc=8).to(device).train().to(memory_format=torch.channels_last)
    distiller = Distiller(student, teacher_pt, device, channels_last=True)
    assert distiller.sparse_max_share == 0.0  # distill.sparse.default_max_share
    param = next(distiller.teacher.parameters())
    assert param.dtype == torch.float16 and not param.requires_grad
    assert any(
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) for p in distiller.teacher.parameters()
    )
    compute_loss = ComputeLoss(student, yaml_load(ROOT_HYP), terms=distiller.loss_terms)
    imgs = torch.rand(4, 3, 128, 160, device=device).contiguous(memory_format=torch.channels_last)
    targets = _targets(device)
    items_by_path = []
    for max_share in (SPARSE_MAX_SHARE, 0.0):
        distiller.sparse_max_share = max_share
        student.zero_grad(set_to_none=True)
        distiller.adapters.zero_grad(set_to_none=True)
        with torch.autocast("cuda"):
            pred, imitation = distiller(student, imgs, targets)
            loss, items = compute_loss(pred, targets, **imitation)
        assert torch.isfinite(loss)
        torch.amp.GradScaler("cuda").scale(loss).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.parameters())
        items_by_path.append((imitation["student"][0].dim(), items))
    (sparse_dim, sparse_items), (dense_dim, dense_items) = items_by_path
    assert sparse_dim == 2 and dense_dim == 4
    for k in dense_items:  # fp16 autocast: the two paths round differently
        torch.testing.assert_close(sparse_items[k], dense_items[k], rtol=2e-3, atol=1e-5)
    assert all(p.grad is None for p in distiller.teacher.parameters())


def test_output_terms_on_cuda_under_amp_without_a_host_sync(teacher_pt):
    """An fp16 teacher's head outputs, AMP student: the output terms are float32, finite, equal to their float64 CPU
    value, and computing them (forward and backward, the top-anchor selection included) never waits for the GPU
    (sync debug mode raises on a sync)."""
    from distill.terms import box_kd_term, kd_term

    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    student = DetectionModel("yolov5n.yaml", nc=8).to(device).train()
    distiller = Distiller(student, teacher_pt, device, imitation_weight=0.0, weights={"kd": 1.0, "box_kd": 0.05})
    assert next(distiller.teacher.parameters()).dtype == torch.float16
    imgs = torch.rand(2, 3, 128, 96, device=device)
    with torch.autocast("cuda"):
        preds, inputs = distiller(student, imgs, _targets(device))
    anchors = student.model[-1].anchors
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda"):
            kd = kd_term(preds=preds, **inputs)
            box = box_kd_term(preds=preds, anchors=anchors, **inputs, min_obj=0.0)
        (kd + box).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert kd.dtype == box.dtype == torch.float32 and torch.isfinite(kd) and torch.isfinite(box)
    cpu = dict(
        preds=[p.detach().double().cpu() for p in preds],
        teacher_preds=[t.double().cpu() for t in inputs["teacher_preds"]],
    )
    # every anchor (top_share 1): the anchors the default share picks can differ between the two where fp16 teacher
    # logits tie at the boundary (topk breaks ties as it likes); the selection itself is tested on CPU in float64
    with torch.autocast("cuda"):
        every = kd_term(preds=preds, **{**inputs, "top_share": 1.0})
    want = kd_term(**cpu, temperature=inputs["temperature"], top_share=1.0)
    assert every.item() == pytest.approx(want.item(), rel=1e-4)
