"""What the session's worker thread computes: encoding, decoding prompts, undo and reset, the merge.

`SessionEngine` is the half of `InferenceSession` (session.py) that runs on its one worker thread and holds
the model, the cached embeddings and each object's history; session.py is the other half: the public
methods, validation, the request queue and the thread. The module docstring of session.py describes
the behaviour (working grids, windowed clicks, undo, merge).
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import devices
from .intensity import IntensityError, to_uint8
from .network import Prompts
from .session_merge import boost_box, boost_empty, merge_into
from .session_region import (
    Grid, MaskCrop, Placed, Slices, box_grid, changed_region, decode_region, grid_input, image_logits,
    pool_factors, resample, union, whole_grid,
)
from .session_types import (
    ImageReport, InvalidImageError, NoImageError, ObjectPrompts, SegmentationUpdate, SessionError, StaleRequest,
)
from .session_window import block_region, click_window, grow_window, patched_block

# whole mode: a box whose crop holds at least this share of the image's voxels is decoded on the image's
# cached embedding rather than on a crop encoded again (_choose_grid)
WHOLE_IMAGE_SHARE = 0.5

@dataclass(frozen=True)
class _Step:
    """One entry of an object's history: prompts, their logits (None: empty object) and mask."""

    prompts: ObjectPrompts = ObjectPrompts()
    logits: Placed | None = None
    grid: Grid | None = None
    fill: float = 0.0  # stand-in logit beyond `logits` when fed back to a larger grid
    mask: MaskCrop = MaskCrop()
    norms: dict | None = field(default=None, compare=False)  # decoder statistics clicks reuse (windows)


_EMPTY = _Step()


@dataclass(eq=False)
class _Object:
    id: int
    history: list = field(default_factory=lambda: [_EMPTY])

    @property
    def current(self) -> _Step:
        return self.history[-1]


@dataclass(frozen=True)
class _Image:
    fingerprint: tuple
    shape: tuple
    spacing: tuple
    volume: np.ndarray  # uint8 (z, y, x), the normalised image
    mode: str
    main: Grid


@dataclass(eq=False)
class _Request:
    kind: str  # image | prompts | undo | reset | labels
    future: concurrent.futures.Future
    obj: _Object | None = None
    prompts: tuple = ()
    args: tuple = ()
    generation: int = 0
    submitted: float = field(default_factory=time.perf_counter)


class SessionEngine:
    """The worker-thread half of InferenceSession (see the module docstring); not used on its own."""

    # ----------------------------------------------------------------------------- worker: image

    def _run_image(self, request: _Request) -> ImageReport:
        array, spacing, modality, ct_window, fingerprint = request.args
        start = time.perf_counter()
        try:
            try:
                volume = to_uint8(array, modality, ct_window)
            except IntensityError as error:
                raise InvalidImageError(str(error)) from None
            normalised = time.perf_counter()
            mode = "whole" if pool_factors(volume.shape, self.voxel_budget) == (1, 1, 1) else "large"
            main = whole_grid(volume.shape, self.voxel_budget if mode == "whole" else self.global_voxel_budget)
            self._cache.clear()  # free the previous image's embeddings before encoding this one
            self._embedding(volume, main, main)
            image = _Image(fingerprint, tuple(volume.shape), spacing, volume, mode, main)
        except BaseException:
            with self._lock:
                self._image = None
                self._cache.clear()
                if self._generation == request.generation:
                    self._submitted = None
            raise
        with self._lock:
            self._image = image
        end = time.perf_counter()
        timings = {"queue": start - request.submitted, "normalize": normalised - start,
                   "encode": end - normalised, "total": end - start}
        return ImageReport(image.shape, spacing, mode, main.shape, main.factor, True, end - start, timings)

    def _run_same_image(self, request: _Request) -> ImageReport:
        image = self._require_image()
        return ImageReport(image.shape, image.spacing, image.mode, image.main.shape, image.main.factor,
                           False, 0.0, {"queue": time.perf_counter() - request.submitted})

    def _require_image(self) -> _Image:
        if self._image is None:
            raise NoImageError("no image: call set_image() first (or the last image failed to encode)")
        return self._image

    def _embedding(self, volume: np.ndarray, grid: Grid, main: Grid):
        """The cached embedding of `grid`, else encode it (worker thread only). The main grid's
        embedding stays; of the other (crop) grids, the `max_cached_regions` last used are kept."""
        if grid in self._cache:
            self._cache[grid] = self._cache.pop(grid)  # most recently used last
            return self._cache[grid]
        x = devices.prepare_input(grid_input(volume, grid), self.device, self.amp_dtype)
        with torch.inference_mode(), devices.autocast(self.device, self.amp_dtype):
            embedding = self.model.encode(x)
        del x
        self.encoder_runs += 1
        if grid != main:
            crops = [g for g in self._cache if g != main]
            while crops and len(crops) >= self.max_cached_regions:
                del self._cache[crops.pop(0)]
        self._cache[grid] = embedding
        return embedding

    # ----------------------------------------------------------------------------- worker: prompts

    def _run_prompts(self, request: _Request) -> SegmentationUpdate:
        start = time.perf_counter()
        image, current = self._checked_state(request)
        prompts = current.prompts
        for prompt in request.prompts:
            prompts = prompts.apply(prompt)
        restart = any(p[0] == "box" for p in request.prompts)
        previous = None if restart or current.logits is None else current

        grid = self._choose_grid(image, prompts, previous)
        t0 = time.perf_counter()
        embedding = self._embedding(image.volume, grid, image.main)
        t1 = time.perf_counter()
        clicks = [p[1] for p in request.prompts if p[0] == "click"]
        growth = 0
        if self._decodes_locally(grid, previous, clicks):
            region, logits, growth = self._decode_window(embedding, grid, prompts, previous, clicks)
            norms, decoding = previous.norms, "window"
        else:
            region, norms = None, {}
            if prompts.box is not None:
                region = decode_region(grid, *prompts.bounds(), self.decode_margin, self.full_decode_fraction)
            logits = self._decode(embedding, grid, prompts, previous, region, norms)
            decoding = "whole" if region is None else "region"
        t2 = time.perf_counter()

        placed = grid.placed(logits, region)
        extent, values = image_logits(placed, image.shape)
        mask = MaskCrop.from_region(extent, values > 0)
        step = _Step(prompts, placed, grid, min(0.0, placed.border_median()), mask, norms)
        changed = changed_region(current.mask, mask)
        obj = self._commit(request, image, lambda history: history.append(step))
        end = time.perf_counter()
        timings = {"queue": start - request.submitted, "encode": t1 - t0, "decode": t2 - t1,
                   "postprocess": end - t2, "total": end - start}
        return _update(obj, image, changed, extent, end - start, timings, decoding, growth)

    def _checked_state(self, request: _Request) -> tuple[_Image, _Step]:
        with self._lock:
            image = self._require_image()
            if request.generation != self._generation or self._objects.get(request.obj.id) is not request.obj:
                raise StaleRequest(f"object {request.obj.id} was removed or its image replaced")
            return image, request.obj.current

    def _commit(self, request: _Request, image: _Image, change) -> _Object:
        obj = request.obj
        with self._lock:
            if self._image is not image or self._objects.get(obj.id) is not obj:
                raise StaleRequest(f"object {obj.id} was removed or its image replaced while it was computed")
            change(obj.history)
            if self.max_undo is not None and len(obj.history) - 1 > self.max_undo:
                del obj.history[1]  # history[0] stays the empty state
        return obj

    def _choose_grid(self, image: _Image, prompts: ObjectPrompts, previous: _Step | None) -> Grid:
        """Without a box: the main grid. With a box, in either mode: the object's crop if it still holds
        every prompt, else a new crop around the box and clicks (in whole mode, the main grid itself when
        that crop holds at least WHOLE_IMAGE_SHARE of the image's voxels: encoding it again would cost a
        whole encoder pass, 3.2 s on the 2-core CPU for a 128x248x221 crop, to change little). Training shows the object in a crop of about its own size, never in a wide
        image: validation phantoms (48x64x64, encoded whole) scored 0.72 at the box step decoded on the
        whole image and 0.93 on the box's crop (MODEL_CARD.md, "Context around the box")."""
        if prompts.box is None:
            return image.main
        if (previous is not None and previous.grid != image.main
                and all(previous.grid.contains(p) for p in prompts.points())):
            return previous.grid
        crop = box_grid(image.shape, *prompts.bounds(), self.context_margin, self.voxel_budget)
        if image.mode == "whole" and math.prod(crop.size) >= WHOLE_IMAGE_SHARE * math.prod(image.shape):
            return image.main  # the crop is most of the image: its cached embedding serves, no encoder pass
        return crop

    def _decode(self, embedding, grid: Grid, prompts: ObjectPrompts, previous: _Step | None,
                region, norms: dict) -> torch.Tensor:
        """One decoder call for one object -> float32 CPU logits [1, 1, *region or grid.padded];
        the decoder's GroupNorm statistics go into `norms` (for later windowed clicks)."""
        with torch.inference_mode(), devices.autocast(self.device, self.amp_dtype):
            logits = self.model.decode(embedding, self._prompts(grid, prompts), self._prev_logits(grid, previous),
                                       region, norms)
        return logits.float().cpu()

    def _decodes_locally(self, grid: Grid, previous: _Step | None, clicks: list) -> bool:
        """Clicks added to an object decoded before on this grid: decode a window (session_window.py)."""
        return bool(self.click_window and clicks and previous is not None and previous.grid == grid
                    and previous.norms)

    def _decode_window(self, embedding, grid: Grid, prompts: ObjectPrompts, previous: _Step,
                       clicks: list) -> tuple[Slices, torch.Tensor, int]:
        """Decode a window around the new clicks, growing it while the change reaches its faces ->
        (grid region, float32 CPU logits over it: the previous logits with the window written in,
        times the window grew)."""
        window = click_window(grid, clicks, self.click_window)
        half_cells = [math.ceil(self.click_window / f) for f in grid.factor]
        prev = self._prev_logits(grid, previous)  # [1, 1, *grid.padded]: what the window's logits replace
        with torch.inference_mode(), devices.autocast(self.device, self.amp_dtype):
            x, skips = self.model.decoder_inputs(embedding, self._prompts(grid, prompts), prev)
            for rounds in range(self.click_window_growth + 1):
                values = self.model.decoder.forward_window(x, skips, window, previous.norms).float().cpu()
                if rounds == self.click_window_growth:
                    break
                grown = grow_window(window, prev[(0, 0, *window)].cpu() > 0, values[0, 0] > 0, grid.padded,
                                    half_cells, [grid.to_grid(p) for p in clicks])
                if grown is None:
                    break
                window = grown
        return *patched_block(block_region(grid, previous.logits), prev, window, values), rounds

    def _prompts(self, grid: Grid, prompts: ObjectPrompts) -> Prompts:
        objects = {"fg": [grid.to_grid(p) for p in prompts.fg], "bg": [grid.to_grid(p) for p in prompts.bg]}
        if prompts.box is not None:
            objects["box"] = tuple(grid.to_grid(p) for p in prompts.box)
        return Prompts.from_objects([objects]).to(self.device)

    def _prev_logits(self, grid: Grid, previous: _Step | None) -> torch.Tensor | None:
        """The previous step's logits on the whole padded grid (fed back to the network), or None.
        Same grid: every value, padding included (as in training); another grid: image content only."""
        if previous is None:
            return None
        return resample(previous.logits, grid.origin, grid.factor, grid.padded, previous.fill,
                        clip=previous.grid != grid).to(self.device)

    # ----------------------------------------------------------------------------- worker: undo, reset

    def _run_undo(self, request: _Request) -> SegmentationUpdate:
        return self._history_op(request, lambda history: history.pop() if len(history) > 1 else None)

    def _run_reset(self, request: _Request) -> SegmentationUpdate:
        return self._history_op(request, lambda history: history.append(_EMPTY) if history[-1] is not _EMPTY
                                else None)

    def _history_op(self, request: _Request, change) -> SegmentationUpdate:
        start = time.perf_counter()
        image, before = self._checked_state(request)
        obj = self._commit(request, image, change)
        after = obj.current
        end = time.perf_counter()
        return _update(obj, image, changed_region(before.mask, after.mask), None, end - start,
                       {"queue": start - request.submitted, "total": end - start})

    # ----------------------------------------------------------------------------- worker: merge

    def _run_labels(self, request: _Request) -> np.ndarray:
        with self._lock:
            image = self._require_image()
            steps = {oid: obj.current for oid, obj in sorted(self._objects.items()) if obj.current.logits is not None}
        ids = list(steps) or [0]
        if max(ids) > np.iinfo(np.uint16).max:
            raise SessionError(f"object id {max(ids)} does not fit a uint16 labelmap")
        labels = np.zeros(image.shape, np.uint8 if max(ids) <= 255 else np.uint16)
        if not steps:
            return labels
        logits = {oid: image_logits(step.logits, image.shape) for oid, step in steps.items()}
        area = None
        for extent, _ in logits.values():
            area = union(area, extent)
        best = merge_into(labels[area], area, logits)
        empty = [oid for oid in steps if not np.any(labels[area] == oid)]
        if empty:
            for oid in empty:
                logits[oid] = boost_empty(logits[oid], boost_box(steps[oid].prompts), best, area,
                                          self.empty_object_margin)
            merge_into(labels[area], area, logits)
        return labels


def _update(obj: _Object, image: _Image, changed: Slices | None, logits_region: Slices | None, seconds: float,
            timings: dict, decoding: str = "", growth: int = 0) -> SegmentationUpdate:
    """The SegmentationUpdate of `obj`'s current step: its mask as a crop and as the block over `changed`."""
    step = obj.current
    block = None if changed is None else step.mask.within(changed)
    return SegmentationUpdate(obj.id, changed, block, logits_region, seconds, timings, len(obj.history) - 1,
                              decoding, growth, step.prompts, image.shape, step.mask)
