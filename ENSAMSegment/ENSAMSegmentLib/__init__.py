"""ENSAMSegmentLib: the ENSAM model, the interactive inference session, and their I/O.

Layers (imports point down only):
  core        network/, modelfile, geometry, imageio, intensity, session, simulation, metrics
  MRML logic  mrml/ (Slicer's MRML API, no Qt)
  front-ends  cli/ (the `ensam` tool); the Slicer widgets live in ENSAMSegment.py
"""

__version__ = "0.1.0"
