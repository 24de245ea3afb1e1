"""Datasets and loaders, as in YOLOv5 v7.0: images + YOLO-format labels for train/val, images/videos for detect.

Label files mirror image paths with `/images/` -> `/labels/` and a `.txt` suffix; each row is
`class x_center y_center width height`, coordinates normalized to the image (0-1). Rows with more than 6 numbers
are polygons `class x1 y1 x2 y2 ...` (normalized), turned into their bounding boxes.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import random
from itertools import repeat
from multiprocessing.pool import Pool, ThreadPool
from pathlib import Path

import cv2
import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from utils.augmentations import augment_hsv, copy_paste, letterbox, mixup, random_perspective
from utils.general import (
    IMG_FORMATS,
    LOCAL_RANK,
    LOGGER,
    NUM_THREADS,
    RANK,
    VID_FORMATS,
    WORLD_SIZE,
    UserError,
    xyn2xy,
    xywhn2xyxy,
    xyxy2xywhn,
)
from utils.labels import (  # noqa: F401
    exif_size,
    get_hash,
    img2label_paths,
    load_label_cache,
    save_label_cache,
    segments2boxes,
    verify_image_label,
)

HELP_URL = "https://docs.ultralytics.com/yolov5/tutorials/train_custom_data"
BAR_FORMAT = "{l_bar}{bar:10}{r_bar}"
PIN_MEMORY = str(os.getenv("PIN_MEMORY", True)).lower() == "true"


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in each DataLoader worker from torch's per-worker seed."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def item_seed(*keys: int) -> int:
    """A 32-bit seed from non-negative integers (seed, epoch, index), well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(k) % 2**32 for k in keys]).generate_state(1)[0])


class EpochSampler(torch.utils.data.Sampler):
    """The training order of each epoch as a function of (seed, epoch) alone, and each image's augmentation too.

    Yields (epoch, index) pairs; LoadImagesAndLabels seeds `random` and `numpy.random` from (seed, epoch, index)
    before augmenting that image. So epoch e's batches are the same whatever ran before: a run resumed at epoch e
    (epoch=e here) sees exactly the images and augmentations the uninterrupted run saw, with any number of loader
    workers. Each pass over the sampler is the next epoch (train.py never calls set_epoch: the DataLoader prefetches
    the next epoch's first batches before the loop reaches it). With world_size > 1 each rank takes every
    world_size-th item of the shared order, padded to equal length, as torch's DistributedSampler.
    """

    def __init__(self, n: int, seed: int = 0, epoch: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.epoch, self.shuffle = n, seed, epoch, shuffle
        self.rank, self.world_size = max(rank, 0), max(world_size, 1)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next pass yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(item_seed(self.seed, epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.world_size > 1:
            order += order[: len(self) * self.world_size - self.n]
            order = order[self.rank :: self.world_size]
        for index in order:
            yield epoch, index


class StreamSampler(torch.utils.data.Sampler):
    """An endless stream of (pass, index) items over n images, each pass a new shuffle drawn from (seed, pass): every
    image is used once before any is repeated, and the stream runs on across epochs.

    Item k of the stream (k = 0, 1, ...) is image order(k // n)[k % n]; the sampler yields from item `start` on, so a
    run resumed after s items (train.py: epoch * batches per epoch * unlabelled batch) continues the same stream.
    LoadImagesAndLabels seeds each image's augmentation from (seed, pass, index), as for EpochSampler. With
    world_size > 1, rank r takes the items k with k % world_size == r (each rank its own share).
    """

    def __init__(self, n: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.start = n, seed, start
        self.rank, self.world_size = max(rank, 0), max(world_size, 1)

    def order(self, p: int) -> list[int]:
        g = torch.Generator()
        g.manual_seed(item_seed(self.seed, p))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        k = self.start * self.world_size + self.rank  # `start` counts this rank's items
        p, order = k // self.n, self.order(k // self.n)
        while True:
            if k // self.n != p:
                p, order = k // self.n, self.order(k // self.n)
            yield p, order[k % self.n]
            k += self.world_size


class LoadImagesAndLabels(Dataset):
    """Images with YOLO labels, for training (mosaic/mixup/perspective/HSV/flip augmentation) and validation.

    Attributes: im_files, label_files, labels (list of [n, 5] float32 (class, xywhn)), segments, shapes ([N, 2]
    float (w, h) of the originals), n, indices (sampling order; train.py resamples it for --image-weights),
    batch (batch index of each image), batch_shapes ([nb, 2] (h, w) letterbox shape per batch, rect only).
    """

    cache_version = "0.7-fgfi-json"  # bump when the cache layout or checks change
    rand_interp_methods = [cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA, cv2.INTER_LANCZOS4]

    def __init__(
        self,
        path: str | Path | list,
        img_size: int = 640,
        batch_size: int = 16,
        augment: bool = False,
        hyp: dict | None = None,
        rect: bool = False,
        image_weights: bool = False,
        cache_images: bool | str = False,
        single_cls: bool = False,
        stride: int = 32,
        pad: float = 0.0,
        min_items: int = 0,
        prefix: str = "",
        nc: int | None = None,
        rank: int = -1,
        seed: int = 0,
        unlabeled: bool = False,
    ):
        if augment and hyp is None:
            raise ValueError("augment=True needs the hyp dict (data/hyps/hyp.scratch-low.yaml)")
        self.img_size = img_size
        self.augment = augment
        self.hyp = hyp
        self.image_weights = image_weights
        self.rect = False if image_weights else rect
        self.mosaic = self.augment and not self.rect
        self.mosaic_border = [-img_size // 2, -img_size // 2]
        self.stride = stride
        self.path = path
        self.seed = seed  # augmentation of (epoch, index) items is seeded from (seed, epoch, index): EpochSampler
        self.unlabeled = unlabeled  # images only: label files are never read, every image has no boxes

        files = []
        for p in path if isinstance(path, (list, tuple)) else [path]:
            p = Path(p)
            if p.is_dir():
                files += glob.glob(str(p / "**" / "*.*"), recursive=True)
            elif any(c in str(p) for c in "*?["):  # a glob pattern, e.g. path/to/images/*.jpg
                files += glob.glob(str(p), recursive=True)
            elif p.is_file():
                parent = p.parent
                for line in p.read_text().strip().splitlines():
                    line = line.strip()
                    if line:
                        x = Path(line)
                        files.append(
                            str(
                                parent / line[2:]
                                if line.startswith("./")
                                else x
                                if x.exists() or x.is_absolute()
                                else parent / x
                            )
                        )
            else:
                raise UserError(f"{prefix}{p} does not exist: check the dataset path in your data YAML")
        self.im_files = sorted(x.replace("/", os.sep) for x in files if x.split(".")[-1].lower() in IMG_FORMATS)
        if not self.im_files:
            raise UserError(f"{prefix}No images found in {path}: supported formats are {', '.join(IMG_FORMATS)}")

        # label cache: built once (checks every image and label), reused while files and nc are unchanged. Unlabelled
        # images: the same checks of the images alone (no label file is read, even where one exists), cached apart
        self.label_files = [""] * len(self.im_files) if unlabeled else img2label_paths(self.im_files)
        if unlabeled:
            cache_path = (p if p.is_file() else Path(self.im_files[0]).parent).with_suffix(".unlabeled.cache")
        else:
            cache_path = (p if p.is_file() else Path(self.label_files[0]).parent).with_suffix(".cache")
        try:
            cache, exists = load_label_cache(cache_path), True
            assert cache["version"] == self.cache_version
            assert cache["hash"] == get_hash(self.label_files + self.im_files)
            assert cache["nc"] == (None if single_cls else nc)
        except Exception:
            cache, exists = self.cache_labels(cache_path, prefix, None if single_cls else nc), False

        nf, nm, ne, nc_bad, n = cache.pop("results")
        if exists and LOCAL_RANK in {-1, 0}:
            d = f"Scanning {cache_path}... {nf} found, {nm} missing, {ne} empty, {nc_bad} corrupt"
            d = f"Scanning {cache_path}... {n - nc_bad} images, {nc_bad} corrupt" if unlabeled else d
            tqdm(None, desc=prefix + d, total=n, initial=n, bar_format=BAR_FORMAT)
            if cache["msgs"]:
                LOGGER.info("\n".join(cache["msgs"]))
        self.counts = {"found": nf, "missing": nm, "empty": ne, "corrupt": nc_bad}
        if nf == 0 and not unlabeled:
            raise UserError(
                f"{prefix}No labels found in {cache_path}: labels go in a labels/ folder beside images/, one .txt "
                f"per image (see {HELP_URL})"
            )
        for k in ("hash", "version", "msgs", "nc"):
            cache.pop(k)
        if not cache:
            raise UserError(f"{prefix}All {n} images in {path} are corrupt: see the warnings above")
        labels, shapes, segments = zip(*cache.values())
        self.labels = [x.copy() for x in labels]
        self.segments = [list(x) for x in segments]
        self.shapes = np.array(shapes, dtype=np.float64)
        self.im_files = list(cache.keys())
        self.label_files = [""] * len(self.im_files) if unlabeled else img2label_paths(self.im_files)
        for lb, lb_file in zip(self.labels, self.label_files) if nc is not None and not single_cls else ():
            if len(lb) and lb[:, 0].max() >= nc:  # as YOLOv5's train.py: stop, rather than drop the images
                raise UserError(
                    f"{prefix}{lb_file}: class {int(lb[:, 0].max())} exceeds nc={nc} of the data YAML (ids 0..{nc - 1}):"
                    " give the YAML a name for every class, or fix the label"
                )

        if min_items:
            include = [i for i, x in enumerate(self.labels) if len(x) >= min_items]
            LOGGER.info(f"{prefix}{len(self.labels) - len(include)}/{len(self.labels)} images filtered from dataset")
            self._subset(include)
        if single_cls:
            for x in self.labels:
                x[:, 0] = 0

        n = len(self.shapes)
        bi = np.floor(np.arange(n) / batch_size).astype(int)
        nb = bi[-1] + 1
        self.batch = bi
        self.n = n
        self.indices = range(n)

        if self.rect:  # batches of similar aspect ratio, each letterboxed to its own (h, w)
            ar = self.shapes[:, 1] / self.shapes[:, 0]  # h / w
            irect = ar.argsort()
            self._subset(irect)
            ar = ar[irect]
            shapes = [[1, 1]] * nb
            for i in range(nb):
                ari = ar[bi == i]
                mini, maxi = ari.min(), ari.max()
                if maxi < 1:
                    shapes[i] = [maxi, 1]
                elif mini > 1:
                    shapes[i] = [1, 1 / mini]
            self.batch_shapes = np.ceil(np.array(shapes) * img_size / stride + pad).astype(int) * stride

        self.ims = [None] * n
        self.npy_files = [Path(f).with_suffix(".npy") for f in self.im_files]
        if cache_images in (True, "ram") and not self.check_cache_ram(prefix=prefix):
            cache_images = False
        if cache_images:
            b = 0
            self.im_hw0, self.im_hw = [None] * n, [None] * n
            fcn = self.cache_images_to_disk if cache_images == "disk" else self.load_image
            results = ThreadPool(NUM_THREADS).imap(fcn, range(n))
            pbar = tqdm(enumerate(results), total=n, bar_format=BAR_FORMAT, disable=LOCAL_RANK > 0)
            for i, x in pbar:
                if cache_images == "disk":
                    b += self.npy_files[i].stat().st_size
                else:
                    self.ims[i], self.im_hw0[i], self.im_hw[i] = x
                    b += self.ims[i].nbytes
                pbar.desc = f"{prefix}Caching images ({b / 1e9:.1f}GB {cache_images})"
            pbar.close()

    def _subset(self, order) -> None:
        """Keep (and reorder) images by index: files, labels, segments and shapes together."""
        self.im_files = [self.im_files[i] for i in order]
        self.label_files = [self.label_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.segments = [self.segments[i] for i in order]
        self.shapes = self.shapes[np.asarray(order, dtype=int)].reshape(-1, 2)

    def check_cache_ram(self, safety_margin: float = 0.1, prefix: str = "") -> bool:
        """Whether the resized images fit in available RAM, estimated from up to 30 of them."""
        b, k = 0, min(self.n, 30)
        for f in self.im_files[:k]:
            im = cv2.imread(f)
            if im is not None:
                b += im.nbytes * (self.img_size / max(im.shape[:2])) ** 2
        required = b * self.n / max(k, 1)
        available = psutil.virtual_memory().available
        ok = required * (1 + safety_margin) < available
        if not ok:
            LOGGER.info(
                f"{prefix}{required / 1e9:.1f}GB RAM required > {available / 1e9:.1f}GB available: not caching images"
            )
        return ok

    def cache_labels(self, path: Path = Path("./labels.cache"), prefix: str = "", nc: int | None = None) -> dict:
        """Verify every image/label pair (in a process pool), then save the results next to the labels."""
        x = {}
        nm, nf, ne, nc_bad, msgs = 0, 0, 0, 0, []
        desc = f"{prefix}Scanning {path.parent / path.stem}..."
        args = zip(self.im_files, self.label_files, repeat(prefix), repeat(nc))
        with Pool(min(NUM_THREADS, len(self.im_files))) as pool:
            pbar = tqdm(pool.imap(verify_image_label, args), desc=desc, total=len(self.im_files), bar_format=BAR_FORMAT)
            for im_file, lb, shape, segments, nm_f, nf_f, ne_f, nc_f, msg in pbar:
                nm += nm_f
                nf += nf_f
                ne += ne_f
                nc_bad += nc_f
                if im_file:
                    x[im_file] = [lb, shape, segments]
                if msg:
                    msgs.append(msg)
                counts = f"{nf} found, {nm} missing, {ne} empty" if not self.unlabeled else f"{nm} images"
                pbar.desc = f"{desc} {counts}, {nc_bad} corrupt"
            pbar.close()
        if msgs:
            LOGGER.info("\n".join(msgs))
        x["hash"] = get_hash(self.label_files + self.im_files)
        x["results"] = nf, nm, ne, nc_bad, len(self.im_files)
        x["msgs"] = msgs
        x["version"] = self.cache_version
        x["nc"] = nc
        try:
            save_label_cache(path, x)
            LOGGER.info(f"{prefix}New cache created: {path}")
        except Exception as e:
            LOGGER.warning(f"{prefix}WARNING ⚠️ Cache directory {path.parent} is not writeable: {e}")
        return x

    def __len__(self) -> int:
        return len(self.im_files)

    def __getitem__(self, index: int | tuple[int, int]):
        """-> (image uint8 [3, H, W] RGB, labels [n, 6] (0, class, xywhn), path, shapes).

        index: an image index, or (epoch, index) from EpochSampler: the augmentation's random draws are then seeded
        from (seed, epoch, index), the same in any worker and after a resume.
        shapes is None for mosaics, else ((h0, w0), ((h / h0, w / w0), (padw, padh))) to map boxes back to the
        original image (val.py's scale_boxes).
        """
        if isinstance(index, tuple):
            epoch, index = index
            s = item_seed(self.seed, epoch, index)
            random.seed(s)
            np.random.seed(s)
        index = self.indices[index]
        hyp = self.hyp
        if self.mosaic and random.random() < hyp["mosaic"]:
            img, labels = self.load_mosaic(index)
            shapes = None
            if random.random() < hyp["mixup"]:
                img, labels = mixup(img, labels, *self.load_mosaic(random.randint(0, self.n - 1)))
        else:
            img, (h0, w0), (h, w) = self.load_image(index)
            shape = self.batch_shapes[self.batch[index]] if self.rect else self.img_size
            img, ratio, pad = letterbox(img, shape, auto=False, scaleup=self.augment)
            shapes = (h0, w0), ((h / h0, w / w0), pad)
            labels = self.labels[index].copy()
            if labels.size:
                labels[:, 1:] = xywhn2xyxy(labels[:, 1:], ratio[0] * w, ratio[1] * h, padw=pad[0], padh=pad[1])
            if self.augment:
                img, labels = random_perspective(
                    img,
                    labels,
                    degrees=hyp["degrees"],
                    translate=hyp["translate"],
                    scale=hyp["scale"],
                    shear=hyp["shear"],
                    perspective=hyp["perspective"],
                )

        nl = len(labels)
        if nl:
            labels[:, 1:5] = xyxy2xywhn(labels[:, 1:5], w=img.shape[1], h=img.shape[0], clip=True, eps=1e-3)
        if self.augment:
            augment_hsv(img, hgain=hyp["hsv_h"], sgain=hyp["hsv_s"], vgain=hyp["hsv_v"])
            if random.random() < hyp["flipud"]:
                img = np.flipud(img)
                if nl:
                    labels[:, 2] = 1 - labels[:, 2]
            if random.random() < hyp["fliplr"]:
                img = np.fliplr(img)
                if nl:
                    labels[:, 1] = 1 - labels[:, 1]

        labels_out = torch.zeros((nl, 6))
        if nl:
            labels_out[:, 1:] = torch.from_numpy(np.asarray(labels, dtype=np.float32))
        img = np.ascontiguousarray(img.transpose((2, 0, 1))[::-1])  # HWC BGR -> CHW RGB
        return torch.from_numpy(img), labels_out, self.im_files[index], shapes

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """Image i resized so its long side is img_size -> (BGR image, (h0, w0) original, (h, w) resized)."""
        if self.ims[i] is not None:
            return self.ims[i], self.im_hw0[i], self.im_hw[i]
        f, fn = self.im_files[i], self.npy_files[i]
        im = np.load(fn) if fn.exists() else cv2.imread(f)
        if im is None:
            raise UserError(f"Image not readable: {f} (it changed after the label cache was built? delete the .cache)")
        h0, w0 = im.shape[:2]
        r = self.img_size / max(h0, w0)
        if r != 1:
            interp = cv2.INTER_LINEAR if (self.augment or r > 1) else cv2.INTER_AREA
            im = cv2.resize(im, (math.ceil(w0 * r), math.ceil(h0 * r)), interpolation=interp)
        return im, (h0, w0), im.shape[:2]

    def cache_images_to_disk(self, i: int) -> None:
        """Save image i as .npy beside it (decoded, not resized) for faster loading."""
        f = self.npy_files[i]
        if not f.exists():
            np.save(f.as_posix(), cv2.imread(self.im_files[i]))

    def load_mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """4-image mosaic around a random centre, then random_perspective back to img_size.

        Returns (image [s, s, 3] BGR, labels [n, 5] (class, x1, y1, x2, y2) in its pixels), s = img_size.
        """
        labels4, segments4 = [], []
        s = self.img_size
        yc, xc = (int(random.uniform(-x, 2 * s + x)) for x in self.mosaic_border)
        indices = [index] + random.choices(self.indices, k=3)
        random.shuffle(indices)
        for i, index in enumerate(indices):
            img, _, (h, w) = self.load_image(index)
            if i == 0:  # top left
                img4 = np.full((s * 2, s * 2, img.shape[2]), 114, dtype=np.uint8)
                x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc  # region in the mosaic
                x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h  # region of the tile
            elif i == 1:  # top right
                x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, s * 2), yc
                x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), min(w, x2a - x1a), h
            elif i == 2:  # bottom left
                x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(s * 2, yc + h)
                x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, min(y2a - y1a, h)
            else:  # bottom right
                x1a, y1a, x2a, y2a = xc, yc, min(xc + w, s * 2), min(s * 2, yc + h)
                x1b, y1b, x2b, y2b = 0, 0, min(w, x2a - x1a), min(y2a - y1a, h)
            img4[y1a:y2a, x1a:x2a] = img[y1b:y2b, x1b:x2b]
            padw, padh = x1a - x1b, y1a - y1b

            labels, segments = self.labels[index].copy(), [x.copy() for x in self.segments[index]]
            if labels.size:
                labels[:, 1:] = xywhn2xyxy(labels[:, 1:], w, h, padw, padh)
                segments = [xyn2xy(x, w, h, padw, padh) for x in segments]
            labels4.append(labels)
            segments4.extend(segments)

        labels4 = np.concatenate(labels4, 0)
        for x in (labels4[:, 1:], *segments4):
            np.clip(x, 0, 2 * s, out=x)
        img4, labels4, segments4 = copy_paste(img4, labels4, segments4, p=self.hyp["copy_paste"])
        return random_perspective(
            img4,
            labels4,
            segments4,
            degrees=self.hyp["degrees"],
            translate=self.hyp["translate"],
            scale=self.hyp["scale"],
            shear=self.hyp["shear"],
            perspective=self.hyp["perspective"],
            border=self.mosaic_border,
        )

    @staticmethod
    def collate_fn(batch):
        """Stack images and concatenate labels, writing each label's image index into column 0."""
        im, label, path, shapes = zip(*batch)
        for i, lb in enumerate(label):
            lb[:, 0] = i
        return torch.stack(im, 0), torch.cat(label, 0), path, shapes

    @staticmethod
    def collate_fn4(batch):
        """--quad: every 4 images become one of twice the size (a 2x2 tile, or image 0 upsampled 2x)."""
        img, label, path, shapes = zip(*batch)
        n = len(shapes) // 4
        im4, label4, path4, shapes4 = [], [], path[:n], shapes[:n]
        ho = torch.tensor([[0.0, 0, 0, 1, 0, 0]])
        wo = torch.tensor([[0.0, 0, 1, 0, 0, 0]])
        s = torch.tensor([[1, 1, 0.5, 0.5, 0.5, 0.5]])
        for i in range(n):
            i *= 4
            if random.random() < 0.5:
                im = F.interpolate(img[i].unsqueeze(0).float(), scale_factor=2.0, mode="bilinear", align_corners=False)
                im = im[0].type(img[i].type())
                lb = label[i]
            else:
                im = torch.cat((torch.cat((img[i], img[i + 1]), 1), torch.cat((img[i + 2], img[i + 3]), 1)), 2)
                lb = torch.cat((label[i], label[i + 1] + ho, label[i + 2] + wo, label[i + 3] + ho + wo), 0) * s
            im4.append(im)
            label4.append(lb)
        for i, lb in enumerate(label4):
            lb[:, 0] = i
        return torch.stack(im4, 0), torch.cat(label4, 0), path4, shapes4


class InfiniteDataLoader(DataLoader):
    """A DataLoader whose workers live across epochs (the batch sampler repeats forever)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "batch_sampler", _RepeatSampler(self.batch_sampler))
        self.iterator = super().__iter__()

    def __len__(self) -> int:
        return len(self.batch_sampler.sampler)

    def __iter__(self):
        for _ in range(len(self)):
            yield next(self.iterator)


class _RepeatSampler:
    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        while True:
            yield from iter(self.sampler)


def _num_workers(batch_size: int, workers: int) -> int:
    """Loader processes: at most --workers, the CPUs per GPU and the batch size (0 for batches of one: no workers)."""
    return min([os.cpu_count() // max(torch.cuda.device_count(), 1), batch_size if batch_size > 1 else 0, workers])


def create_dataloader(
    path,
    imgsz: int,
    batch_size: int,
    stride: int,
    single_cls: bool = False,
    hyp: dict | None = None,
    augment: bool = False,
    cache: bool | str | None = False,
    pad: float = 0.0,
    rect: bool = False,
    rank: int = -1,
    workers: int = 8,
    image_weights: bool = False,
    quad: bool = False,
    prefix: str = "",
    shuffle: bool = False,
    seed: int = 0,
    nc: int | None = None,
    epoch: int = 0,
) -> tuple[DataLoader, LoadImagesAndLabels]:
    """-> (loader, dataset). Batches are (imgs uint8 [B, 3, H, W] RGB, targets [n, 6] (image index, class, xywhn),
    paths, shapes). batch_size is per process (train.py divides by WORLD_SIZE).

    A training loader (augment, shuffle or DDP) draws its order and augmentations from (seed, epoch) through
    EpochSampler, its first pass being `epoch` (the resumed epoch): a resumed run gets the batches it would have had.
    """
    if rect and shuffle:
        LOGGER.warning("WARNING ⚠️ --rect is incompatible with DataLoader shuffle, setting shuffle=False")
        shuffle = False
    try:
        from utils.torch_utils import torch_distributed_zero_first
    except ImportError:  # single-process use only needs a no-op
        torch_distributed_zero_first = contextlib.nullcontext
    with torch_distributed_zero_first(rank):  # rank 0 builds the label cache, the others then read it
        dataset = LoadImagesAndLabels(
            path,
            imgsz,
            batch_size,
            augment=augment,
            hyp=hyp,
            rect=rect,
            cache_images=cache,
            single_cls=single_cls,
            stride=int(stride),
            pad=pad,
            image_weights=image_weights,
            prefix=prefix,
            nc=nc,
            rank=rank,
            seed=seed,
        )
    batch_size = min(batch_size, len(dataset))
    nw = _num_workers(batch_size, workers)
    sampler = None
    if augment or shuffle or rank != -1:
        ddp = rank != -1  # this process's share of each epoch: global rank RANK of WORLD_SIZE
        sampler = EpochSampler(len(dataset), seed, epoch, shuffle, RANK if ddp else 0, WORLD_SIZE if ddp else 1)
    loader = DataLoader if image_weights else InfiniteDataLoader  # train.py reassigns dataset.indices each epoch
    generator = torch.Generator()
    generator.manual_seed(6148914691236517205 + seed + RANK)
    return loader(
        dataset,
        batch_size=batch_size,
        shuffle=False,  # EpochSampler shuffles
        num_workers=nw,
        sampler=sampler,
        pin_memory=PIN_MEMORY and torch.cuda.is_available(),  # pinning without a GPU only warns
        persistent_workers=nw > 0,
        collate_fn=LoadImagesAndLabels.collate_fn4 if quad else LoadImagesAndLabels.collate_fn,
        worker_init_fn=seed_worker,
        generator=generator,
    ), dataset


def create_unlabeled_loader(
    path,
    imgsz: int,
    batch_size: int,
    stride: int,
    hyp: dict,
    cache: bool | str | None = False,
    workers: int = 8,
    seed: int = 0,
    start: int = 0,
    prefix: str = "",
) -> tuple[DataLoader, LoadImagesAndLabels]:
    """-> (loader, dataset) of unlabelled images for distillation: the training augmentations (mosaic and mixup among
    these images alone), every image without boxes, in an endless StreamSampler order from item `start` of this
    rank's share. Iterate it once (iter(loader)) and draw a batch per step; batch_size is per process."""
    dataset = LoadImagesAndLabels(
        path, imgsz, batch_size, augment=True, hyp=hyp, cache_images=cache, stride=int(stride), prefix=prefix,
        seed=item_seed(seed, 1),  # not the labelled set's augmentation draws
        unlabeled=True,
    )  # fmt: skip
    nw = _num_workers(batch_size, workers)
    sampler = StreamSampler(len(dataset), dataset.seed, start, max(RANK, 0), WORLD_SIZE)
    generator = torch.Generator()
    generator.manual_seed(6148914691236517205 + seed + RANK + 1)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=nw, sampler=sampler,
        pin_memory=PIN_MEMORY and torch.cuda.is_available(), collate_fn=LoadImagesAndLabels.collate_fn,
        worker_init_fn=seed_worker, generator=generator,
    )  # fmt: skip
    return loader, dataset


class LoadImages:
    """Images and videos for detect.py: `--source` is a file, directory, glob, .txt list (one path per line) or list.

    Iterating yields (path, letterboxed image [3, H, W] RGB uint8, original BGR image, cv2.VideoCapture or None,
    description). Unreadable images are skipped with a warning; videos advance vid_stride frames per step.
    """

    def __init__(self, path, img_size: int = 640, stride: int = 32, auto: bool = True, vid_stride: int = 1):
        if isinstance(path, (str, Path)) and Path(path).suffix == ".txt" and Path(path).is_file():
            parent = Path(path).parent
            path = [x.strip() for x in Path(path).read_text().splitlines() if x.strip()]
            path = [x if Path(x).exists() or Path(x).is_absolute() else str(parent / x) for x in path]
        files = []
        for p in sorted(str(x) for x in path) if isinstance(path, (list, tuple)) else [str(path)]:
            if "*" in p:
                files.extend(sorted(glob.glob(str(Path(p).absolute()), recursive=True)))
                continue
            p = str(Path(p).resolve())
            if os.path.isdir(p):
                files.extend(sorted(glob.glob(os.path.join(p, "*.*"))))
            elif os.path.isfile(p):
                files.append(p)
            else:
                raise UserError(f"--source {p} does not exist")
        images = [x for x in files if x.split(".")[-1].lower() in IMG_FORMATS]
        videos = [x for x in files if x.split(".")[-1].lower() in VID_FORMATS]
        ni, nv = len(images), len(videos)
        if ni + nv == 0:
            raise UserError(
                f"no images or videos found in --source {path}: give a file, folder, glob or .txt list of "
                f"images ({', '.join(IMG_FORMATS)}) or videos ({', '.join(VID_FORMATS)})"
            )
        self.img_size = img_size
        self.stride = stride
        self.files = images + videos
        self.nf = ni + nv
        self.video_flag = [False] * ni + [True] * nv
        self.mode = "image"
        self.auto = auto
        self.vid_stride = vid_stride
        self.frame, self.frames, self.cap = 0, 0, None
        if nv:
            self._new_video(videos[0])

    def __iter__(self):
        self.count = 0
        return self

    def __next__(self):
        while True:
            if self.count == self.nf:
                raise StopIteration
            path = self.files[self.count]
            if self.video_flag[self.count]:
                self.mode = "video"
                if self.cap is None or self.cap_path != path:
                    self._new_video(path)
                for _ in range(self.vid_stride):
                    self.cap.grab()
                ok, im0 = self.cap.retrieve()
                if not ok:  # video finished (or unreadable): next file
                    self.cap.release()
                    self.cap = None
                    self.count += 1
                    continue
                self.frame += 1
                s = f"video {self.count + 1}/{self.nf} ({self.frame}/{self.frames}) {path}: "
            else:
                self.mode = "image"
                self.count += 1
                im0 = cv2.imread(path)
                if im0 is None:
                    LOGGER.warning(f"WARNING ⚠️ skipping unreadable image {path}")
                    continue
                s = f"image {self.count}/{self.nf} {path}: "
            im = letterbox(im0, self.img_size, stride=self.stride, auto=self.auto)[0]
            im = np.ascontiguousarray(im.transpose((2, 0, 1))[::-1])  # HWC BGR -> CHW RGB
            return path, im, im0, self.cap, s

    def _new_video(self, path: str) -> None:
        self.frame = 0
        self.cap_path = path
        self.cap = cv2.VideoCapture(path)
        if not self.cap.isOpened():
            LOGGER.warning(f"WARNING ⚠️ cannot open video {path}, skipping it")
        self.frames = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) / self.vid_stride)

    def __len__(self) -> int:
        return self.nf
