"""First-run Python dependencies of the ENSAM Slicer modules.

Slicer ships numpy and SimpleITK; ENSAM also needs torch, MONAI and scipy. torch is installed
through the PyTorch extension (`PyTorchUtils`, which picks the build that matches the GPU driver),
everything else with `slicer.util.pip_install`, each only after the user said yes.

The decision (what is missing or too old, which pip requirement strings) is pure and tested
without Slicer: `plan_dependencies(installed_versions())`. `ensure_dependencies()` is the
Slicer-side action; it imports slicer, qt and PyTorchUtils only when called.

This module must import without torch, MONAI or Slicer: it runs before they exist.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping


@dataclass(frozen=True)
class Requirement:
    """One package the modules need: distribution name, import name, minimum version."""

    dist: str
    module: str
    minimum: str

    @property
    def spec(self) -> str:
        """pip requirement string, e.g. 'monai>=1.4'."""
        return f"{self.dist}>={self.minimum}"


TORCH = Requirement("torch", "torch", "2.6")
TORCH_VERSION_REQUIREMENT = ">=" + TORCH.minimum  # the form PyTorchUtils.installTorch takes
# Installed with pip (after torch, so that pip never pulls a CUDA-less torch from PyPI itself).
PIP_PACKAGES = (Requirement("monai", "monai", "1.4"), Requirement("scipy", "scipy", "1.11"))
# Part of Slicer: never pip-installed (replacing them breaks Slicer's own modules).
BUNDLED = (Requirement("numpy", "numpy", "1.26"), Requirement("SimpleITK", "SimpleITK", "2.3"))
ALL_REQUIREMENTS = (TORCH, *PIP_PACKAGES, *BUNDLED)

UNKNOWN_VERSION = "unknown"  # importable, but no version found: accepted

# The oldest Slicer the modules run on: the Segment Editor logic they write through
# (vtkSlicerSegmentEditorLogic, mrml/segments.py) first exists in Slicer 5.10 (absent in 5.8.1), and the
# effect's cleanup() is called from 5.10 on. 5.10 ships Python 3.12, so Slicer 5.8's Python 3.9 is moot.
MINIMUM_SLICER = (5, 10)


def slicer_version_problem(major: int, minor: int) -> str:
    """Why this Slicer cannot run ENSAM ("" when it can): what the module and effect show instead."""
    if (int(major), int(minor)) >= MINIMUM_SLICER:
        return ""
    need = ".".join(map(str, MINIMUM_SLICER))
    return (f"ENSAM needs 3D Slicer {need} or newer; this is Slicer {major}.{minor}. "
            f"Install Slicer {need} or later from download.slicer.org (the extension for it comes from its "
            "Extensions Manager).")


class DependencyError(RuntimeError):
    """A dependency cannot be installed from here (a bundled package is missing or too old)."""


def release_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: '2.6.0+cu124' -> (2, 6, 0), '1.4rc1' -> (1, 4)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if not match:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def version_at_least(version: str, minimum: str) -> bool:
    """True when `version` >= `minimum` on the numeric release (pre-release tags ignored)."""
    if version == UNKNOWN_VERSION:
        return True
    have, need = release_tuple(version), release_tuple(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def installed_version(requirement: Requirement, version_of: Callable[[str], str] = importlib.metadata.version):
    """Installed version of a package, UNKNOWN_VERSION if importable without metadata, else None.

    Slicer's own SimpleITK is built from source and may have no distribution metadata, so an
    importable module without metadata counts as present (its `__version__` when it has one).
    """
    try:
        return version_of(requirement.dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    if importlib.util.find_spec(requirement.module) is None:
        return None
    module = importlib.import_module(requirement.module)
    return str(getattr(module, "__version__", UNKNOWN_VERSION))


def installed_versions(requirements=ALL_REQUIREMENTS) -> dict[str, str | None]:
    """{distribution name: installed version or None} for every requirement."""
    return {r.dist: installed_version(r) for r in requirements}


@dataclass
class DependencyPlan:
    """What has to happen before the modules can run.

    torch: True when torch must be installed or upgraded (through PyTorchUtils).
    pip: pip requirement strings to install, in order.
    broken: human-readable problems with bundled packages that pip must not fix.
    restart: True when an already-imported package gets replaced (Slicer must restart).
    """

    torch: bool = False
    pip: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    restart: bool = False

    @property
    def satisfied(self) -> bool:
        return not (self.torch or self.pip or self.broken)

    def describe(self) -> str:
        """One paragraph for the confirmation dialog."""
        parts = []
        if self.torch:
            parts.append(f"PyTorch (torch{TORCH_VERSION_REQUIREMENT}) through the PyTorch extension")
        if self.pip:
            parts.append("with pip: " + ", ".join(self.pip))
        text = "ENSAM needs these Python packages: " + "; ".join(parts) + "." if parts else ""
        if self.broken:
            text += (" " if text else "") + " ".join(self.broken)
        if self.restart:
            text += " Restart Slicer afterwards: an older version is already loaded."
        return text


def _missing_or_old(requirement: Requirement, installed: Mapping[str, str | None]) -> bool:
    version = installed.get(requirement.dist)
    return version is None or not version_at_least(version, requirement.minimum)


def plan_dependencies(installed: Mapping[str, str | None], loaded_modules=()) -> DependencyPlan:
    """Decide what to install from {dist: version or None}; `loaded_modules`: names already imported."""
    plan = DependencyPlan()
    plan.torch = _missing_or_old(TORCH, installed)
    plan.pip = [r.spec for r in PIP_PACKAGES if _missing_or_old(r, installed)]
    for r in BUNDLED:
        if _missing_or_old(r, installed):
            have = installed.get(r.dist)
            state = "is missing" if have is None else f"is version {have}"
            plan.broken.append(
                f"{r.dist} {state} but ENSAM needs {r.spec}; it comes with Slicer, so install a recent Slicer."
            )
    replaced = [TORCH] if plan.torch else []
    replaced += [r for r in PIP_PACKAGES if r.spec in plan.pip]
    plan.restart = any(installed.get(r.dist) is not None and r.module in loaded_modules for r in replaced)
    return plan


def current_plan() -> DependencyPlan:
    """The plan for this Python process."""
    return plan_dependencies(installed_versions(), loaded_modules=set(sys.modules))


def ensure_dependencies() -> bool:
    """Inside Slicer: install what is missing after asking. True when everything is there now.

    Returns False (and tells the user why) when the user declined, the PyTorch extension is
    missing, a bundled package is broken, or an installation failed (no network, pip's error: shown in a
    message box and the log); raises nothing. The callers are Qt slots, where an exception would only reach
    the Python console.
    """
    import slicer

    plan = current_plan()
    if plan.satisfied:
        return True
    if plan.broken:
        slicer.util.errorDisplay(plan.describe(), windowTitle="ENSAM: missing packages")
        return False
    try:
        if plan.torch and not _install_torch():
            return False
        if plan.pip:
            question = "ENSAM needs these Python packages, installed with pip: " + ", ".join(plan.pip) + ". Install now?"
            if not slicer.util.confirmOkCancelDisplay(question, windowTitle="ENSAM: install packages"):
                logging.info("ENSAM: installation of %s declined", plan.pip)
                return False
            import qt

            slicer.app.setOverrideCursor(qt.Qt.WaitCursor)  # as slicer.util.tryWithErrorDisplay(waitCursor=True)
            try:
                slicer.util.pip_install(" ".join(plan.pip))
            finally:
                slicer.app.restoreOverrideCursor()
    except Exception as error:  # pip's CalledProcessError, light-the-torch's errors, no network, ...
        import traceback

        logging.exception("ENSAM: installing Python packages failed")
        slicer.util.errorDisplay(f"ENSAM could not install its Python packages: {error}\n\nThe Python console "
                                 "(View > Python Console) has pip's output.", windowTitle="ENSAM: installation failed",
                                 detailedText=traceback.format_exc())
        return False
    importlib.invalidate_caches()
    if plan.restart:
        slicer.util.infoDisplay("Packages were upgraded: restart Slicer before using ENSAM.", windowTitle="ENSAM")
        return False
    return current_plan().satisfied


def _install_torch() -> bool:
    """torch through the PyTorch extension's logic (asks the user itself)."""
    import slicer

    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.errorDisplay(
            "ENSAM needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager, "
            "restart Slicer, and open ENSAM again.",
            windowTitle="ENSAM: PyTorch extension missing",
        )
        return False
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=True, torchVersionRequirement=TORCH_VERSION_REQUIREMENT
    )
    if torch is None:
        logging.info("ENSAM: PyTorch installation declined or failed")
        return False
    return True
