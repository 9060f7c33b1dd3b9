"""Training samples: one case -> one training sample (crop, pooling, augmentation, box), and the torch
datasets that feed the trainer. The cases themselves: cases.py.

Per sample (``make_sample``): one labelled instance at random; a random crop around it with a
margin of 1-64 voxels on each side of each axis, at most the object's size (``margin_range``;
clipped to the volume); pooling by integer
factors when the padded crop exceeds the voxel budget (the axis with the largest size is
reduced first; the image by max, as the inference session does, the mask by majority, which
keeps the object's volume); intensities to [0, 1]; with probability 0.5 one of MONAI's
RandBiasField / RandGaussianSmooth / RandHistogramShift; zero padding to multiples of 8;
with probability ``other_object_probability`` the target becomes another structure that reaches into
that crop, the crop grown to hold it (``other_object``: the crop is no longer centred on the target,
so only the box says which object is meant; without such samples a model learns "the object in the
middle of the crop" and ignores the box); the initial box (``training_box``): half the time the
challenge's (z range x the extent of the middle slice), else the tight 3D box, each widened by 0-5
voxels; with probability ``no_box_probability`` no box (the interaction then starts with a click, as
for challenge cases without boxes).

Determinism: the sample of (epoch, index) depends only on (seed, epoch, index), never on the
worker process or on what ran before, so resuming mid-epoch reproduces the data exactly.

Bad cases during training are skipped: ``TrainingDataset`` moves on to the next case in
the list and reports the skipped one in ``Sample.skipped``; when no case of the list can be
used it raises ``NoCasesError`` (training stops with that message).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .cases import Case, CaseError, CaseRef, NoCasesError, load_case

DEFAULT_VOXEL_BUDGET = 4_194_304
MARGIN_RANGE = (1, 64)
SMALLEST_MARGIN_CAP = 8  # margin_range: a small object's crop margin may still reach 8 voxels
AUGMENT_PROBABILITY = 0.5
NO_BOX_PROBABILITY = 0.1
CHALLENGE_BOX_PROBABILITY = 0.5  # share of boxes drawn the challenge's way (training_box)
OTHER_OBJECT_PROBABILITY = 0.25  # share of samples whose target is another object in the crop (other_object)
SMALLEST_SHARE_OF_CROP = 0.005  # other_object: the other structure fills at least this share of the first crop
MULTIPLE = 8


@dataclass
class Sample:
    """One training sample (one object of one case), ready for the model."""

    image: torch.Tensor  # [1, 1, D, H, W] float32 in [0, 1], D, H, W multiples of 8
    target: torch.Tensor  # [1, 1, D, H, W] float32 0/1
    box: tuple[tuple[int, int, int], tuple[int, int, int]] | None  # inclusive (z,y,x) corners
    spacing: tuple[float, float, float]  # mm per voxel of ``image`` (after pooling)
    shape: tuple[int, int, int]  # the crop's shape before the padding to multiples of 8
    case: str
    label: int
    click_seed: int  # seeds the click simulation of this sample
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (case, reason) passed over
    crop: tuple = ()  # the crop's slices in the case's voxels (z, y, x)
    factors: tuple = (1, 1, 1)  # pooling factors from the case's voxels to the sample's


# ---------------------------------------------------------------------------- sampling


def bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of the non-zero voxels, hi exclusive. mask: [D, H, W] with at least one voxel."""
    lo, hi = [], []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        lo.append(present[0])
        hi.append(present[-1] + 1)
    return np.array(lo), np.array(hi)


def margin_range(lo, hi, margin=MARGIN_RANGE, smallest: int = SMALLEST_MARGIN_CAP) -> tuple[int, int]:
    """The margins a crop around the object [lo, hi) draws from: `margin`, its top capped at the object's
    size (the geometric mean of its extents, at least `smallest`). The paper's 1-64 voxels per side left a
    small object (a lesion, a vessel, a brain parcel) at 0.1-0.5 % of its crop, and a model early in
    training then learnt to predict nothing at all (all logits -2 to -5 on the development cases);
    capped, such an object fills a few % of its crop, and a large organ still gets up to 64 voxels."""
    size = float(np.prod(np.asarray(hi) - np.asarray(lo))) ** (1 / 3)
    return margin[0], int(np.clip(round(size), max(smallest, margin[0]), margin[1]))


def random_crop(lo, hi, shape, rng: np.random.Generator, margin=MARGIN_RANGE) -> tuple[slice, ...]:
    """Slices around [lo, hi) with a random margin per side and axis drawn from `margin_range`."""
    low, high = margin_range(lo, hi, margin)
    before = rng.integers(low, high + 1, size=3)
    after = rng.integers(low, high + 1, size=3)
    start = np.maximum(np.asarray(lo) - before, 0)
    stop = np.minimum(np.asarray(hi) + after, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def round_up(n: int, multiple: int = MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def pool_factors(shape, budget: int, multiple: int = MULTIPLE) -> tuple[int, int, int]:
    """Integer max-pool factors per axis so the pooled, padded volume fits in ``budget`` voxels."""
    if budget < multiple**3:
        raise ValueError(f"voxel budget {budget} is below one {multiple}^3 block")
    factors = [1, 1, 1]

    def padded(axis):
        return round_up(math.ceil(shape[axis] / factors[axis]), multiple)

    while math.prod(padded(a) for a in range(3)) > budget:
        axis = max(range(3), key=lambda a: (math.ceil(shape[a] / factors[a]), -a))
        factors[axis] += 1
    return tuple(factors)


def max_pool(array: np.ndarray, factors) -> np.ndarray:
    """Max pooling of a [D, H, W] array by integer factors (ceil mode: edges kept)."""
    if tuple(factors) == (1, 1, 1):
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    return F.max_pool3d(tensor, factors, factors, ceil_mode=True)[0, 0].numpy()


def majority_pool(mask: np.ndarray, factors) -> np.ndarray:
    """Pool a [D, H, W] boolean mask by integer factors (ceil mode), keeping a cell when at least half of
    its voxels are inside: the object keeps its volume (max pooling inflated phantom organs by 8-29 %).
    An object that would vanish (thinner than half a cell everywhere) is max-pooled instead."""
    mask = np.asarray(mask, dtype=bool)
    if tuple(factors) == (1, 1, 1):
        return mask
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    share = F.avg_pool3d(tensor, factors, factors, ceil_mode=True, count_include_pad=False)[0, 0].numpy()
    pooled = share >= 0.5
    return pooled if pooled.any() else share > 0


def pad_to_multiple(array: np.ndarray, multiple: int = MULTIPLE) -> np.ndarray:
    """Zero padding at the end of each axis up to a multiple of ``multiple``."""
    pad = [(0, round_up(s, multiple) - s) for s in array.shape]
    return np.pad(array, pad) if any(p for _, p in pad) else array


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 0-255 -> float32 0-1; other dtypes are min-max rescaled to [0, 1]."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    image = image.astype(np.float32)
    low, high = float(image.min()), float(image.max())
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def augment_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """With probability 0.5 one of MONAI's bias field, Gaussian smoothing, histogram shift; in [0, 1]."""
    from monai.transforms import RandBiasField, RandGaussianSmooth, RandHistogramShift

    if rng.random() >= AUGMENT_PROBABILITY:
        return image
    choice = int(rng.integers(3))
    transform = [RandBiasField(prob=1.0), RandGaussianSmooth(prob=1.0), RandHistogramShift(prob=1.0)][choice]
    transform.set_random_state(seed=int(rng.integers(2**31)))
    out = np.asarray(transform(image[None]))[0]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def crop_arrays(case: Case, crop, label: int, mask: np.ndarray, rng: np.random.Generator):
    """(image, target mask) of the crop: the case's own, or synthesised from the crop's labels
    (synth.synthesize_crop) when the case has no image, or with probability ``case.ref.synth``.
    Cases with ``synth`` 0 draw nothing from ``rng``, so their samples stay as they were."""
    if case.image is not None and not (case.ref.synth > 0 and rng.random() < case.ref.synth):
        return case.image[crop], mask[crop]
    from .synth import synthesize_crop

    return synthesize_crop(case.labels[crop], label, rng)


def other_object(labels: np.ndarray, crop, label: int, rng: np.random.Generator):
    """(another structure than `label` that reaches into `crop` with at least SMALLEST_SHARE_OF_CROP of its
    voxels, chosen at random; the crop grown to hold it whole with its own margins), or None when no other
    structure reaches in. The first structure stays in the crop as a decoy near its centre."""
    values, inside = np.unique(labels[crop], return_counts=True)
    crop_voxels = int(np.prod([s.stop - s.start for s in crop]))
    keep = (values > 0) & (values != label) & (inside >= SMALLEST_SHARE_OF_CROP * crop_voxels)
    if not keep.any():
        return None
    other = int(rng.choice(values[keep]))
    own = random_crop(*bounding_box(labels == other), labels.shape, rng)
    return other, tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(crop, own))


def make_sample(
    case: Case,
    rng: np.random.Generator,
    voxel_budget: int = DEFAULT_VOXEL_BUDGET,
    augment: bool = True,
    no_box_probability: float = NO_BOX_PROBABILITY,
    box_offset: bool = True,
    challenge_box_probability: float = CHALLENGE_BOX_PROBABILITY,
    other_object_probability: float = 0.0,
) -> Sample:
    """One training sample from ``case``: a random labelled instance, cropped, pooled, padded; with
    ``other_object_probability`` the target is then another object reaching into that crop."""
    values = np.unique(case.labels)
    values = values[values > 0]
    label = int(rng.choice(values))
    mask = case.labels == label
    crop = random_crop(*bounding_box(mask), case.labels.shape, rng)
    if other_object_probability > 0 and rng.random() < other_object_probability:
        switched = other_object(case.labels, crop, label, rng)
        if switched is not None:
            label, crop = switched
            mask = case.labels == label
    image, mask = crop_arrays(case, crop, label, mask, rng)
    factors = pool_factors(mask.shape, voxel_budget)
    image = to_unit_range(image)
    image = max_pool(image, factors)  # as the inference session pools images (session_region.py)
    mask = majority_pool(mask, factors)
    if augment:
        image = augment_intensity(image, rng)
    box = None
    if rng.random() >= no_box_probability:
        box = training_box(mask, rng, box_offset, challenge_box_probability)
    shape = tuple(int(v) for v in mask.shape)
    image, mask = pad_to_multiple(image), pad_to_multiple(mask)
    spacing = tuple(float(s) * f for s, f in zip(case.spacing, factors))
    return Sample(
        image=torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None],
        target=torch.from_numpy(mask.astype(np.float32))[None, None],
        box=box,
        spacing=spacing,
        shape=shape,
        case=case.ref.name,
        label=label,
        click_seed=int(rng.integers(2**31)),
        crop=crop,
        factors=tuple(int(f) for f in factors),
    )


def training_box(mask: np.ndarray, rng: np.random.Generator, offset: bool = True,
                 challenge_probability: float = CHALLENGE_BOX_PROBABILITY):
    """The initial box of a sample, inclusive (z, y, x) corners: with ``challenge_probability`` the
    challenge's box (the object's z range x the y/x extent of its middle occupied slice, widened by
    0-5 voxels: what the evaluator and `ensam predict` give, which leaves e.g. 62 % of a vessel
    outside), else the tight 3D box with each side moved out by 0-5 voxels. offset False: no widening."""
    from ENSAMSegmentLib.core.simulation import box_dict_to_3d, challenge_boxes, random_box_3d

    if rng.random() < challenge_probability:
        (box,) = challenge_boxes(mask.astype(np.uint8), rng if offset else None)
        box = box_dict_to_3d(box)
    else:
        box = random_box_3d(mask, rng, max_offset=5 if offset else 0)
    return tuple(tuple(int(v) for v in corner) for corner in box)


# ---------------------------------------------------------------------------- torch datasets


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample (epoch, index): independent of workers and of history."""
    return np.random.default_rng([seed, epoch, index])


class TrainingDataset(torch.utils.data.Dataset):
    """Samples of a case list; indexed by (epoch, index) pairs from ``EpochSampler``."""

    def __init__(
        self,
        cases: list[CaseRef],
        seed: int = 0,
        voxel_budget: int = DEFAULT_VOXEL_BUDGET,
        augment: bool = True,
        no_box_probability: float = NO_BOX_PROBABILITY,
        challenge_box_probability: float = CHALLENGE_BOX_PROBABILITY,
        other_object_probability: float = 0.0,
    ):
        if not cases:
            raise NoCasesError("the training set is empty")
        self.cases, self.seed, self.voxel_budget = list(cases), seed, voxel_budget
        self.augment, self.no_box_probability = augment, no_box_probability
        self.challenge_box_probability = challenge_box_probability
        self.other_object_probability = other_object_probability

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        epoch, index = key
        rng = sample_rng(self.seed, epoch, index)
        skipped: list[tuple[str, str]] = []
        for attempt in range(len(self.cases)):
            ref = self.cases[(index + attempt) % len(self.cases)]
            try:
                case = load_case(ref)
            except CaseError as error:
                skipped.append((ref.name, str(error)))
                continue
            sample = make_sample(case, rng, self.voxel_budget, self.augment, self.no_box_probability,
                                 challenge_box_probability=self.challenge_box_probability,
                                 other_object_probability=self.other_object_probability)
            sample.skipped = skipped
            return sample
        reasons = "; ".join(reason for _, reason in skipped[:3])
        raise NoCasesError(f"none of the {len(self.cases)} training cases can be used: {reasons}")


class EpochSampler(torch.utils.data.Sampler):
    """(epoch, index) keys of one epoch for one rank: a seeded permutation, split across ranks.

    Every rank gets ceil(n / world_size) keys (the permutation wraps around), so all ranks
    run the same number of steps; ``start`` skips the keys a resumed run already trained.
    """

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.rank, self.world_size = rank, world_size

    def keys(self) -> list[tuple[int, int]]:
        order = np.random.default_rng([self.seed, self.epoch, 2**20]).permutation(self.n)
        per_rank = samples_per_rank(self.n, self.world_size)
        order = np.resize(order, per_rank * self.world_size)
        return [(self.epoch, int(i)) for i in order[self.rank :: self.world_size]][self.start :]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return samples_per_rank(self.n, self.world_size) - self.start


def samples_per_rank(n: int, world_size: int) -> int:
    return -(-n // world_size)


def first_item(batch: list):
    """collate_fn for batch size 1 with variable shapes: the sample itself."""
    return batch[0]


def make_loader(
    dataset: TrainingDataset, sampler: EpochSampler, workers: int, worker_init_fn=None
) -> torch.utils.data.DataLoader:
    """Batch size 1 (shapes vary), ``workers`` processes preparing samples ahead."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=1,
        sampler=sampler,
        num_workers=workers,
        collate_fn=first_item,
        worker_init_fn=worker_init_fn if workers > 0 else None,
        prefetch_factor=2 if workers > 0 else None,
    )
