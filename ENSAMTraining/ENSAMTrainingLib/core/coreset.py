"""Coreset selection: an equal number of usable cases from every dataset (the challenge's coreset track).

``select_coreset`` takes ``floor(fraction * cases found)`` cases (at most ``max_cases``):
the same count from every dataset, all of a dataset that has fewer than its share (the
rest goes to the others), drawn at random (seeded). Datasets named in ``exclude`` take no
part (matched case-insensitively, with shell wildcards, against the dataset name, the
modality, or "<modality>/<dataset>").

Each drawn case is checked (``check_case``) before it counts; a case that fails is skipped
with its reason and the next candidate of its dataset is drawn, so only the drawn cases
(and those of small datasets) are read, not the whole collection. Reasons:

- "unreadable": the file cannot be opened or lacks the image array;
- "missing labels", "not a 3-D volume", "mismatched shapes", "labels all background",
  "labels are not integers": see ``data.check_arrays``;
- "uint8 label overflow": labels stored as uint8 and every value 1..255 in use. Instance
  labels numbered past 255 wrap around modulo 256 (256 -> background, 257 -> 1, ...), which
  merges instances; a set that wrapped necessarily uses all 255 values, a genuine one
  almost never does;
- "broken normalisation": the image is not the organisers' 0-255 preprocessing: values
  outside [0, 255] or not finite; or fewer than ``MIN_GREY_LEVELS`` distinct grey values
  (a flat or binarised image); or more than ``MAX_SATURATED_FRACTION`` of the labelled
  voxels at 0 or at 255 (the structures clipped away by a wrong window).
"""

from __future__ import annotations

import fnmatch
import json
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cases import (
    CaseError,
    CaseRef,
    DataError,
    NoCasesError,
    case_key,
    check_arrays,
    find_cases,
    load_arrays,
)

MIN_GREY_LEVELS = 8
MAX_SATURATED_FRACTION = 0.5


@dataclass
class CaseCheck:
    """The verdict on one case: ok, or the reason it is skipped."""

    case: CaseRef
    ok: bool
    reason: str = ""
    detail: str = ""


def normalisation_problem(image: np.ndarray, labels: np.ndarray) -> str:
    """A description of what is wrong with the image's 0-255 normalisation, or "" when nothing is."""
    if image.dtype != np.uint8:
        if not np.isfinite(image).all():
            return "non-finite intensities"
        low, high = float(image.min()), float(image.max())
        if low < 0 or high > 255:
            return f"intensities {low:g}..{high:g} outside 0..255"
    sample = image[::2, ::2, ::2]
    levels = len(np.unique(sample))
    if levels < MIN_GREY_LEVELS:
        return f"only {levels} distinct grey values"
    labelled = image[labels > 0]
    saturated = float(np.mean((labelled <= 0) | (labelled >= 255))) if labelled.size else 0.0
    if saturated > MAX_SATURATED_FRACTION:
        return f"{saturated:.0%} of the labelled voxels at 0 or 255"
    return ""


def label_overflow(labels: np.ndarray) -> bool:
    """uint8 labels using every value 1..255: instance numbers that wrapped around 256."""
    if labels.dtype != np.uint8:
        return False
    return bool(np.all(np.bincount(labels.ravel(), minlength=256)[1:] > 0))


def check_case(ref: CaseRef) -> CaseCheck:
    """Read one case and decide whether it may enter the coreset (reasons: module docstring)."""
    try:
        image, labels, _ = load_arrays(ref)
        check_arrays(ref.name, image, labels)
    except CaseError as error:
        return CaseCheck(ref, False, error.reason, error.detail)
    if label_overflow(labels):
        return CaseCheck(ref, False, "uint8 label overflow", "uint8 labels use every value 1..255")
    problem = normalisation_problem(image, labels)
    if problem:
        return CaseCheck(ref, False, "broken normalisation", problem)
    return CaseCheck(ref, True)


def equal_shares(total: int, capacity: dict[str, int], order: list[str]) -> dict[str, int]:
    """Split ``total`` as equally as possible, no key above its capacity; ties go first to ``order``."""
    shares: dict[str, int] = {}
    left = {k: c for k, c in capacity.items() if c > 0}
    budget = min(total, sum(left.values()))
    while left:
        share = budget // len(left)
        small = {k: c for k, c in left.items() if c <= share}
        if not small:
            break
        for k, c in small.items():
            shares[k] = c
            budget -= c
            del left[k]
    if left:
        base, extra = divmod(budget, len(left))
        ranked = [k for k in order if k in left]
        for i, k in enumerate(ranked):
            shares[k] = base + (1 if i < extra else 0)
    return shares


@dataclass
class CoresetResult:
    """The selection and the report behind it."""

    root: Path
    selected: list[CaseRef]
    skipped: list[CaseCheck]
    found: dict[str, int]  # cases per dataset (excluded ones included)
    modality: dict[str, str]  # dataset -> modality
    excluded: list[str]  # datasets left out by request
    target: int
    warnings: list[str] = field(default_factory=list)

    def table(self) -> list[dict]:
        """One row per dataset: dataset, modality, found, selected, skipped {reason: count}, excluded."""
        chosen = Counter(c.dataset for c in self.selected)
        skipped: dict[str, Counter] = defaultdict(Counter)
        for check in self.skipped:
            skipped[check.case.dataset][check.reason] += 1
        return [
            dict(
                dataset=d,
                modality=self.modality[d],
                found=n,
                selected=chosen[d],
                skipped=dict(skipped[d]),
                excluded=d in self.excluded,
            )
            for d, n in sorted(self.found.items())
        ]

    def modalities(self) -> dict[str, dict[str, int]]:
        """Per modality: found and selected counts."""
        totals: dict[str, Counter] = defaultdict(Counter)
        for row in self.table():
            totals[row["modality"]]["found"] += row["found"]
            totals[row["modality"]]["selected"] += row["selected"]
        return {m: dict(c) for m, c in sorted(totals.items())}

    def to_dict(self) -> dict:
        return dict(
            data=str(self.root),
            target=self.target,
            found=sum(self.found.values()),
            selected=len(self.selected),
            datasets=self.table(),
            modalities=self.modalities(),
            excluded=self.excluded,
            skipped=[
                dict(case=case_key(s.case, self.root), dataset=s.case.dataset, reason=s.reason, detail=s.detail)
                for s in self.skipped
            ],
            warnings=self.warnings,
        )

    def format(self) -> str:
        """A human-readable report."""
        rows = self.table()
        width = max([len("dataset")] + [len(r["dataset"]) for r in rows])
        lines = [f"{'dataset':<{width}}  {'modality':<10} {'found':>7} {'selected':>8}  skipped"]
        for r in rows:
            if r["excluded"]:
                note = "excluded (--exclude)"
            else:
                note = ", ".join(f"{reason}: {n}" for reason, n in sorted(r["skipped"].items()))
            lines.append(f"{r['dataset']:<{width}}  {r['modality']:<10} {r['found']:>7} {r['selected']:>8}  {note}")
        lines.append("")
        lines.append("per modality: " + ", ".join(f"{m} {c['selected']}/{c['found']}" for m, c in self.modalities().items()))
        lines.append(f"selected {len(self.selected)} of {sum(self.found.values())} cases (target {self.target})")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _matches(pattern: str, ref: CaseRef) -> bool:
    names = (ref.dataset, ref.modality, f"{ref.modality}/{ref.dataset}")
    return any(fnmatch.fnmatch(n.lower(), pattern.lower()) for n in names)


def _check_all(refs: list[CaseRef], workers: int) -> list[CaseCheck]:
    if workers <= 1 or len(refs) <= 1:
        return [check_case(r) for r in refs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(check_case, refs, chunksize=max(1, len(refs) // (4 * workers))))


def select_coreset(
    root: str | Path,
    fraction: float = 0.1,
    max_cases: int | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    seed: int = 0,
    workers: int = 1,
    cases: list[CaseRef] | None = None,
) -> CoresetResult:
    """Select the coreset of the cases under ``root`` (or of ``cases``). See the module docstring."""
    root = Path(root)
    if not 0 < fraction <= 1:
        raise DataError(f"the fraction must be in (0, 1], got {fraction}")
    cases = find_cases(root) if cases is None else cases
    found = Counter(c.dataset for c in cases)
    modality = {c.dataset: c.modality for c in cases}
    target = int(fraction * len(cases))
    if max_cases is not None:
        target = min(target, max_cases)
    if target < 1:
        raise NoCasesError(
            f"the coreset would be empty: {fraction:g} of {len(cases)} cases is less than one case"
        )
    warnings = [f"--exclude {p!r} matches no dataset" for p in exclude if not any(_matches(p, c) for c in cases)]
    excluded = sorted({c.dataset for c in cases if any(_matches(p, c) for p in exclude)})
    rng = np.random.default_rng(seed)
    candidates: dict[str, list[CaseRef]] = defaultdict(list)
    for c in cases:
        if c.dataset not in excluded:
            candidates[c.dataset].append(c)
    for name in candidates:
        candidates[name] = [candidates[name][i] for i in rng.permutation(len(candidates[name]))]
    order = [sorted(candidates)[i] for i in rng.permutation(len(candidates))]
    chosen: dict[str, list[CaseRef]] = defaultdict(list)
    skipped: list[CaseCheck] = []
    while True:
        capacity = {d: len(chosen[d]) + len(candidates[d]) for d in candidates}
        shares = equal_shares(target, capacity, order)
        draws = {d: candidates[d][: max(0, shares.get(d, 0) - len(chosen[d]))] for d in candidates}
        batch = [c for d in order for c in draws[d]]
        if not batch:
            break
        for d, drawn in draws.items():
            del candidates[d][: len(drawn)]
        for check in _check_all(batch, workers):
            if check.ok:
                chosen[check.case.dataset].append(check.case)
            else:
                skipped.append(check)
    selected = sorted((c for d in chosen for c in chosen[d]), key=lambda c: (c.dataset, str(c.image)))
    if not selected:
        raise NoCasesError(f"no usable case under {root}: " + "; ".join(sorted({s.reason for s in skipped})))
    empty = [d for d in candidates if not chosen[d] and d not in excluded]
    if empty:
        warnings.append(f"{len(empty)} dataset(s) contribute no case: {', '.join(sorted(empty)[:10])}")
    if len(selected) < target:
        warnings.append(f"only {len(selected)} usable cases for a target of {target}")
    return CoresetResult(root, selected, skipped, dict(found), modality, excluded, target, warnings)


def write_coreset(result: CoresetResult, list_path: str | Path, report_path: str | Path | None = None) -> Path:
    """Write the case list (one case per line, relative to the data root) and the JSON report.

    The report goes to ``report_path`` or, by default, beside the list as ``<list stem>.report.json``.
    Returns the report path.
    """
    list_path = Path(list_path)
    list_path.parent.mkdir(parents=True, exist_ok=True)
    list_path.write_text("".join(case_key(c, result.root) + "\n" for c in result.selected), encoding="utf-8")
    report = Path(report_path) if report_path else list_path.with_name(list_path.stem + ".report.json")
    report.write_text(json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8")
    return report


__all__ = [
    "CaseCheck",
    "CoresetResult",
    "check_case",
    "equal_shares",
    "label_overflow",
    "normalisation_problem",
    "select_coreset",
    "write_coreset",
]
