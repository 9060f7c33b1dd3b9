"""MRML logic of ENSAM: Slicer's MRML API only (no Qt), usable in Slicer and on the slicer-core wheel.

  scene     headless scene with the module logics (tests, browser app; Slicer has its own)
  volumes   scalar volume node <-> (array (z, y, x), VolumeGeometry in world RAS), transforms
  prompts   click point lists (fg/bg nodes) and ROI nodes -> voxel indices (z, y, x)
  segments  SegmentWriter: masks into segments, Segment Editor masking/overwrite rules, undo
  selftest_scenarios  checks shared by pytest (Testing/mrml) and the module's self-test

Import the submodules directly (``from ENSAMSegmentLib.mrml import segments``); ``import slicer``
happens inside their functions, so importing this package never needs Slicer.
"""
