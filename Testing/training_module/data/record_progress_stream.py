"""Records progress_recorded.jsonl: the progress file of one real `ensam train` run folder.

    python Testing/training_module/data/record_progress_stream.py

What the file holds, in order (all written by `ensam train --progress-json FILE`, which appends):
1. a run on 3 tiny phantoms (1 held out for validation, 2 epochs of 2 steps) stopped with SIGINT
   after its first step: start, step(s), checkpoint "signal", done "interrupted";
2. half of one of its step lines without a newline: what a process killed while writing leaves
   (the only line written by this script rather than by `ensam train`);
3. `--resume` to the end, appended to that same unfinished line: start (resumed), steps, epochs
   with validation metrics, checkpoints, done "finished";
4. `--resume --device cuda:99` of the finished run: an "error" event (no such device).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ENSAMSegmentLib.core.phantom import write_challenge_dataset

HERE = Path(__file__).resolve().parent
TINY_MODEL = dict(init_filters=8, norm_groups=4, blocks_down=(1, 1, 1, 1), heads=2, mlp_hidden=32,
                  interaction_layers=1, prev_channels=(4, 8))


def ensam(*args: str) -> list[str]:
    return [sys.executable, "-m", "ENSAMSegmentLib.cli.main", "train", *args]


def main() -> None:
    work = Path(tempfile.mkdtemp())
    write_challenge_dataset(work / "data", 3, shape=(16, 24, 24), seed=11)
    run, stream = work / "run", work / "progress.jsonl"
    first = ensam("--data", str(work / "data"), "--out", str(run), "--epochs", "2", "--voxel-budget", "4096",
                  "--val-fraction", "0.34", "--workers", "0", "--accumulation", "1", "--clicks", "1", "--no-augment",
                  "--no-progress-bar", "--model-config", json.dumps(TINY_MODEL), "--progress-json", str(stream))
    process = subprocess.Popen(first)
    while process.poll() is None and '"step"' not in (stream.read_text() if stream.exists() else ""):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    assert process.wait() == 3
    step_line = next(line for line in stream.read_text().splitlines() if '"event": "step"' in line)
    with open(stream, "a", encoding="utf-8") as f:
        f.write(step_line[: len(step_line) // 2])
    assert subprocess.run(ensam("--out", str(run), "--resume", "--progress-json", str(stream))).returncode == 0
    bad = subprocess.run(ensam("--out", str(run), "--resume", "--device", "cuda:99", "--progress-json", str(stream)))
    assert bad.returncode == 2
    text = stream.read_text().replace(str(work), "/tmp/recorded")
    (HERE / "progress_recorded.jsonl").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
