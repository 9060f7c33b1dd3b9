"""The self-test runner both ENSAM modules share (Reload and Test, Slicer's Self Tests module, ctest)."""

from __future__ import annotations

import logging
import unittest


def run_each(test_case, tests) -> None:
    """Run every test of `tests` (bound methods of `test_case`, a ScriptedLoadableModuleTest) after its
    setUp; what cannot run in this Slicer is skipped with the reason, logged and shown (no installation,
    no dialog: the self-tests also run unattended, registered by slicer_add_python_unittest)."""
    for test in tests:
        test_case.setUp()
        try:
            test()
        except unittest.SkipTest as reason:
            logging.warning(f"{type(test_case).__name__}.{test.__name__} skipped: {reason}")
            test_case.delayDisplay(f"{test.__name__} skipped: {reason}")
