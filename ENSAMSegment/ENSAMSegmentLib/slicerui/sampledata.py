"""The bundled sample CT in Slicer's Sample Data module, category "ENSAM": a new user loads it with one
click (Sample Data > ENSAM > ENSAM sample CT), then draws a box in ENSAM Segment.

The volume ships with the extension (Resources/SampleData/ensam-sample-ct.nrrd, a procedural phantom,
not patient data; its .json names the structures with a suggested box and click). Sample Data downloads
by URL into its cache: a file:// URL of the installed copy, as Slicer's own SampleData tests do
(SampleData.py, v5.10.0, path2uri), with its SHA256 so that the cache never keeps an older copy.
`source()` needs no Slicer (tested); `register()` runs at start-up.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CATEGORY = "ENSAM"
SAMPLE_NAME = "ENSAM sample CT"
RESOURCES = Path(__file__).resolve().parents[2] / "Resources"
IMAGE = RESOURCES / "SampleData" / "ensam-sample-ct.nrrd"
THUMBNAIL = RESOURCES / "Icons" / "ENSAMSampleCT.png"


def source(image: Path = IMAGE, thumbnail: Path = THUMBNAIL) -> dict:
    """The keyword arguments of SampleDataLogic.registerCustomSampleDataSource for the sample CT."""
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    return {
        "category": CATEGORY,
        "sampleName": SAMPLE_NAME,
        "uris": image.resolve().as_uri(),
        "fileNames": f"{image.stem}-{digest[:12]}{image.suffix}",  # a changed file is a new cache entry
        "nodeNames": SAMPLE_NAME,
        "checksums": f"SHA256:{digest}",
        "thumbnailFileName": str(thumbnail) if thumbnail.is_file() else None,
        "loadFileTypes": "VolumeFile",
    }


def register() -> None:
    """Add the sample to the Sample Data module (Slicer start-up; SampleData.py, v5.10.0 lines 510-560)."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(**source())
