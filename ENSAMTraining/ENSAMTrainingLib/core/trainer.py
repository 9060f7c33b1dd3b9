"""`ensam train`: the training loop, its run folder, checkpoints, resume, signals and DDP.

    train(config) / resume(run_dir)   a new run / the run in run_dir continued -> TrainResult
    export_model(state, path)         a model file from the trainer's state or a run's checkpoint

The run's settings (TrainConfig, also importable from here) and the device, cases and model they
name are set up by runsetup.py; this file runs the loop on them.

Run folder (RUN_DIR = ``TrainConfig.out``):

    config.json        the run's settings (also inside every checkpoint)
    cases_train.txt    the training cases, cases_val.txt the held-out ones (case-list format)
    checkpoint.pt      the latest checkpoint (atomic; see checkpoint.py)
    metrics.csv        per optimizer step, validation.csv per epoch (logs.py), tensorboard/
    loss.png           loss curve and validation DSC/NSD, redrawn every minute and each epoch
    model.pt           the trained model (modelfile.save_model), written when training ends

Schedule: ``epochs`` epochs; each visits every training case once in a seeded random order
(one random object per visit); gradients of ``accumulation`` samples make one optimizer
step (the last group of an epoch may be smaller; each sample's loss is divided by its
group's size); Muon + AdamW (optim.py) with the lr halved at epochs 2, 5, 10; the nGPT
weight renormalisation after every optimizer step.

Checkpoints are taken between optimizer steps: every ``checkpoint_minutes``, at the end of
every epoch, and when stopping. ``resume=True`` continues from RUN_DIR/checkpoint.pt exactly:
model, optimiser states, schedule, RNG states, the epoch and the position in it; the data
order and every sample are functions of (seed, epoch, index) (data.py), so the resumed run
computes the same steps as one that never stopped. On resume the data settings come from
the checkpoint; ``epochs``, ``device``, ``workers``, ``checkpoint_minutes``,
``progress_json``, ``stop_after`` and ``progress_bar`` may be given anew, and from a checkpoint
taken at an epoch's end also ``accumulation`` and the number of processes (e.g. to go on under
``torchrun --nproc_per_node 2`` with half the accumulation: the same samples per optimizer step).

Non-finite steps: a step whose loss or gradients are not finite (one bad sample, an overflow) updates
nothing and is reported; ``MAX_NONFINITE_IN_A_ROW`` of them in a row end the run with TrainingError.
No checkpoint of non-finite weights is ever written. (A run without this guard went NaN at step 533 of
a long CPU run, then overwrote its good checkpoint with NaN weights at the next epoch's end.)

Stopping: SIGINT or SIGTERM lets the current accumulation group finish (at most
``accumulation - 1`` more samples), writes a checkpoint and returns status "interrupted"
(the CLI exits with code 3); a second SIGINT aborts at once. ``stop_after`` (optimizer steps
in total) stops the same way with status "stopped" (for tests and benchmarks). DataLoader
workers ignore both signals, so a Ctrl-C in a terminal reaches only the trainer.

Scale out: under ``torchrun --nproc_per_node N`` each process trains on its share of every
epoch's order (ceil(n / N) samples each) through DistributedDataParallel, NCCL on CUDA and
gloo on the CPU; rank 0 writes logs, checkpoints, the progress stream and the model, and
validates (the others wait). Stop and checkpoint decisions are all-reduced so every rank
takes them at the same step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import distributed as dist_utils
from .cases import NoCasesError, write_case_list
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import EpochSampler, TrainingDataset, make_loader, samples_per_rank
from .logs import TRAIN_FIELDS, VAL_FIELDS, CsvLog, TensorBoard, val_row
from .optim import make_optimizers, set_epoch_lr
from .plots import plot_run
from .progress import ProgressStream
from .runsetup import TrainConfig, TrainingError, build_model, default_workers, pick_device, renormalize, split_cases
from .step import InteractiveStep

EXIT_INTERRUPTED = 3
PLOT_EVERY_S = 60.0
WORKER_TERM_GRACE_S = 20
# A step whose loss or gradients are not finite is skipped (no update; logged as a "skipped" event);
# this many in a row stop the run with an error, its last checkpoint intact. A checkpoint of weights
# that are not finite is never written (the one before it stays).
MAX_NONFINITE_IN_A_ROW = 20
RESUME_OVERRIDES = ("epochs", "device", "workers", "checkpoint_minutes", "progress_json", "stop_after", "progress_bar",
                    "accumulation")  # accumulation: from an epoch-end checkpoint only (see _restore)


@dataclasses.dataclass
class TrainResult:
    status: str  # "finished", "interrupted", "stopped"
    run_dir: Path
    model: Path | None
    checkpoint: Path
    epoch: int
    step: int
    last_val: dict | None


def _last_line(message: str) -> str:
    """The exception line of a DataLoader worker's re-raised traceback, without the class name."""
    line = message.strip().splitlines()[-1] if message.strip() else message
    return line.split("Error: ", 1)[1] if line.startswith("ENSAMTrainingLib.") and "Error: " in line else line


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader worker_init_fn: stop signals are the trainer's business, not the workers'.

    A terminal's Ctrl-C and torchrun's stop (killpg) reach the workers too; they keep serving
    the samples the trainer needs to finish its accumulation group. SIGTERM still ends a
    worker, WORKER_TERM_GRACE_S seconds later (SIGALRM), so none can outlive its purpose.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: signal.alarm(WORKER_TERM_GRACE_S))


# ---------------------------------------------------------------------------- the trainer


class Trainer:
    """One training run; ``run()`` trains until done, stopped or interrupted."""

    def __init__(self, config: TrainConfig, state: dict | None = None, progress: ProgressStream | None = None):
        """``state``: a loaded checkpoint to continue from (see ``resume``), or None for a new run."""
        self.out = Path(config.out)
        self.checkpoint_path = self.out / "checkpoint.pt"
        self.state = state
        self.config = config
        self.info = dist_utils.env_info()
        self.device = pick_device(config.device, self.info.local_rank)
        if self.device.type == "cpu":  # a process of its own: freed activations are reused, not mapped anew
            from ENSAMSegmentLib.core.devices import keep_freed_memory  # (as inference does; issue 14)

            keep_freed_memory()
        self.info = dist_utils.init_distributed(self.device)
        self.main = self.info.is_main
        self.progress = progress if progress is not None else ProgressStream(config.progress_json if self.main else None)
        self.train_cases, self.val_cases = split_cases(config)
        self.per_rank = samples_per_rank(len(self.train_cases), self.info.world_size)
        self.steps_per_epoch = math.ceil(self.per_rank / config.accumulation)
        self.total_steps = self.steps_per_epoch * config.epochs
        self._setup_model()
        self.epoch, self.position, self.step = 0, 0, 0
        self.elapsed_before, self.samples_before, self.epoch_loss, self.last_val = 0.0, 0, [0.0, 0], None
        if self.state is not None:
            self._restore(self.state)
        self.stop_requested = False
        self.reported: set[str] = set()
        self.samples_run, self.steps_run, self.train_time = 0, 0, 0.0
        self.nonfinite_in_a_row, self.nonfinite_steps = 0, 0

    # -- set-up -----------------------------------------------------------------------------

    def _setup_model(self) -> None:
        config = self.config
        model_config = self.state["model_config"] if self.state is not None else None
        self.model = build_model(config, self.device, model_config)
        self.model_config = self.model.config.to_dict()
        if self.state is None:
            renormalize(self.model)
        self.optimizers = make_optimizers(
            self.model, config.optimizer, config.muon_lr, config.adamw_lr, weight_decay=config.weight_decay,
            scale_lr_factor=config.scale_lr_factor
        )
        self.step_module = InteractiveStep(self.model, config.clicks, config.amp, config.grad_clicks)
        self.ddp = None
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.step_module, device_ids=ids, find_unused_parameters=True)
        self.dataset = TrainingDataset(
            self.train_cases, config.seed, config.voxel_budget, config.augment, config.no_box_probability,
            config.challenge_box_probability, config.other_object_probability
        )

    def _restore(self, state: dict) -> None:
        saved_world = state.get("world_size", 1)
        # between epochs: a new epoch not begun, or (stop_after) the last step of one taken
        between = state["position"] in (0, samples_per_rank(len(self.train_cases), saved_world))
        if saved_world != self.info.world_size and not between:
            raise TrainingError(
                f"this checkpoint was taken mid-epoch by {saved_world} process(es): resume it with "
                f"{saved_world} (here {self.info.world_size}); an epoch-end checkpoint can resume with any number"
            )
        saved_accumulation = state["config"].get("accumulation", self.config.accumulation)
        if saved_accumulation != self.config.accumulation and not between:
            raise TrainingError(
                f"this checkpoint was taken mid-epoch with {saved_accumulation} samples per step and process: "
                f"resume it with that --accumulation; an epoch-end checkpoint can change it"
            )
        self.model.load_state_dict(state["model"])
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        self.epoch, self.position, self.step = state["epoch"], state["position"], state["step"]
        if between and self.position:  # the epoch's last step was taken: done for any number of processes
            self.position = self.per_rank
        self.elapsed_before, self.epoch_loss = state["elapsed_s"], list(state["epoch_loss"])
        self.samples_before = state["samples"]
        self.last_val = state["last_val"]
        set_rng_state(state["rng"])

    def _checkpoint_state(self) -> dict:
        return dict(
            config=self.config.to_dict(),
            model_config=self.model_config,
            model=self.model.state_dict(),
            optimizers=[o.state_dict() for o in self.optimizers],
            epoch=self.epoch,
            position=self.position,
            step=self.step,
            world_size=self.info.world_size,
            rng=rng_state(),
            elapsed_s=self.elapsed_before + self.train_time,
            samples=self.samples_before + self.samples_run * self.info.world_size,
            epoch_loss=list(self.epoch_loss),
            last_val=self.last_val,
        )

    def _open_logs(self) -> None:
        keep = self.step if self.state is not None else None
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1) + "\n")
            write_case_list(self.out / "cases_train.txt", self.train_cases, self.config.data)
            write_case_list(self.out / "cases_val.txt", self.val_cases, self.config.data)
            self.train_log = CsvLog(self.out / "metrics.csv", TRAIN_FIELDS, keep)
            self.val_log = CsvLog(self.out / "validation.csv", VAL_FIELDS, keep)
            self.tensorboard = TensorBoard(self.out / "tensorboard", purge_step=keep)
        self.last_plot = time.monotonic()
        self.last_checkpoint = time.monotonic()
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not (self.main and self.config.progress_bar),
        )

    # -- signals ----------------------------------------------------------------------------

    def _on_signal(self, signum, _frame) -> None:
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop_requested = True
        print(
            f"\nensam train: {signal.Signals(signum).name} received: stopping after this step, with a checkpoint",
            file=sys.stderr,
        )

    def _install_signals(self) -> dict:
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: no signal handling
                pass
        return previous

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> TrainResult:
        previous = self._install_signals()
        try:
            self._open_logs()
            self._emit_start()
            while self.epoch < self.config.epochs:
                reason = self._train_epoch()
                if reason:
                    return self._stop(reason)
                self._end_epoch()
            return self._finish()
        except Exception as error:
            self.progress.emit("error", message=str(error), type=type(error).__name__)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if hasattr(self, "bar"):
                self.bar.close()
            if self.main and hasattr(self, "tensorboard"):
                self.tensorboard.close()
            dist_utils.shutdown()

    def _emit_start(self) -> None:
        self.progress.emit(
            "start",
            run_dir=str(self.out),
            epochs=self.config.epochs,
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
            train_cases=len(self.train_cases),
            val_cases=len(self.val_cases),
            device=str(self.device),
            world_size=self.info.world_size,
            resumed=self.state is not None,
            epoch=self.epoch,
            step=self.step,
            parameters=sum(p.numel() for p in self.model.parameters()),
        )

    def _train_epoch(self) -> str | None:
        """Train the rest of the current epoch; the stop reason, or None at the epoch's end."""
        config = self.config
        set_epoch_lr(self.optimizers, self.epoch)
        sampler = EpochSampler(
            len(self.train_cases), config.seed, self.epoch, self.position, self.info.rank, self.info.world_size
        )
        workers = default_workers(self.info.world_size) if config.workers is None else config.workers
        samples = iter(make_loader(self.dataset, sampler, workers, worker_init_fn=_ignore_stop_signals))
        try:
            return self._train_samples(samples)
        except NoCasesError as error:  # raised in a worker: keep the message, drop the worker's traceback
            raise NoCasesError(_last_line(str(error))) from None
        finally:
            # shut the workers down now, also when an exception (whose traceback keeps the
            # iterator alive) propagates; else they would linger until interpreter exit
            shutdown = getattr(samples, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _train_samples(self, samples) -> str | None:
        config = self.config
        module = self.ddp if self.ddp is not None else self.step_module
        group: list[float] = []
        started = time.monotonic()
        for sample in samples:
            self._report_skipped(sample.skipped)
            first = (self.position // config.accumulation) * config.accumulation
            size = min(config.accumulation, self.per_rank - first)
            last = self.position + 1 == first + size
            with self.ddp.no_sync() if (self.ddp is not None and not last) else nullcontext():
                loss, _ = module(sample)
                (loss / size).backward()
            group.append(float(loss.detach()))
            self.position += 1
            self.samples_run += 1
            if not last:
                continue
            self.train_time += time.monotonic() - started
            self._optimizer_step(group)
            started = time.monotonic()
            group = []
            reason = self._decide()
            if reason:
                return reason
        return None

    def _optimizer_step(self, group: list[float]) -> None:
        finite = self._step_is_finite(group)
        if finite:
            for optimizer in self.optimizers:
                optimizer.step()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if finite:
            renormalize(self.model)
            self.nonfinite_in_a_row = 0
        else:
            self._skip_nonfinite(group)
        self.step += 1
        self.steps_run += 1
        loss = dist_utils.mean_over_ranks(sum(group) / len(group), self.info, self.device)
        if finite:  # a skipped step's loss stays out of the epoch's mean (metrics.csv shows it)
            self.epoch_loss[0] += loss
            self.epoch_loss[1] += 1
        if not self.main:
            return
        rate = self.samples_run * self.info.world_size / max(self.train_time, 1e-9)
        eta = (self.total_steps - self.step) * self.train_time / max(self.steps_run, 1)
        lr = self.optimizers[0].param_groups[0]["lr"]
        row = dict(
            epoch=self.epoch,
            step=self.step,
            samples=self.samples_before + self.samples_run * self.info.world_size,
            loss=loss,
            lr=lr,
            samples_per_s=rate,
            time_s=self.elapsed_before + self.train_time,
        )
        self.train_log.write(row)
        self.tensorboard.scalars("train", dict(loss=loss, lr=lr, samples_per_s=rate), self.step)
        self.progress.emit("step", **{k: row[k] for k in ("epoch", "step", "samples", "loss", "lr")},
                           total=self.total_steps, samples_per_s=rate, eta_s=eta)
        self.bar.set_postfix(epoch=self.epoch, loss=f"{loss:.4f}", samples_s=f"{rate:.2f}", refresh=False)
        self.bar.update(1)
        if time.monotonic() - self.last_plot > PLOT_EVERY_S:
            self._plot()

    def _decide(self) -> str | None:
        """After an optimizer step: stop ("signal"/"stop"), or checkpoint now ("time")? Same on every rank."""
        config = self.config
        due = time.monotonic() - self.last_checkpoint >= config.checkpoint_minutes * 60
        due = due and self.position < self.per_rank  # at an epoch's end the epoch checkpoint follows
        stop_after = config.stop_after is not None and self.step >= config.stop_after
        signalled, due, stop_after = dist_utils.any_true(
            [self.stop_requested, due, stop_after], self.info, self.device
        )
        if signalled:
            return "signal"
        if stop_after:
            return "stop"
        if due:
            self._save_checkpoint("time")
        return None

    def _end_epoch(self) -> None:
        train_loss = self.epoch_loss[0] / max(self.epoch_loss[1], 1)
        val = self._validate()
        finished_epoch = self.epoch
        self.epoch += 1
        self.position = 0
        self.epoch_loss = [0.0, 0]
        if val is not None:
            self.last_val = val
        if self.main:
            if val is not None:
                self.val_log.write(val_row(finished_epoch, self.step, val))
                self.tensorboard.scalars("val", {k: v for k, v in val.items() if not isinstance(v, list)}, self.step)
            self.progress.emit("epoch", epoch=finished_epoch, step=self.step, train_loss=train_loss, val=val)
            self._plot()
        self._save_checkpoint("epoch")

    def _validate(self) -> dict | None:
        if not self.val_cases:
            return None
        val = None
        if self.main:
            from .validation import validate

            val = validate(
                self.model,
                self.val_cases,
                seed=self.config.seed,
                voxel_budget=self.config.voxel_budget,
                clicks=self.config.clicks,
                amp=self.config.amp,
            )
        dist_utils.barrier(self.info)
        return val

    def _report_skipped(self, skipped: list[tuple[str, str]]) -> None:
        for case, reason in skipped:
            if case in self.reported:
                continue
            self.reported.add(case)
            print(f"ensam train: skipping case {reason}", file=sys.stderr)
            self.progress.emit("warning", message=f"skipping case {reason}", case=case)

    def _plot(self) -> None:
        self.last_plot = time.monotonic()
        plot_run(self.out)

    def _step_is_finite(self, group: list[float]) -> bool:
        """The group's losses and the model's gradients are finite, on every rank."""
        finite = all(math.isfinite(loss) for loss in group) and all(
            bool(torch.isfinite(p.grad).all()) for p in self.model.parameters() if p.grad is not None)
        return dist_utils.mean_over_ranks(float(finite), self.info, self.device) == 1.0

    def _skip_nonfinite(self, group: list[float]) -> None:
        self.nonfinite_in_a_row += 1
        self.nonfinite_steps += 1
        if self.main:
            message = (f"step {self.step + 1}: loss or gradients not finite; skipped, the weights are unchanged "
                       f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_steps} in this session)")
            print(f"ensam train: {message}", file=sys.stderr, flush=True)
            self.progress.emit("warning", message=message, skipped_step=self.step + 1,
                               in_a_row=self.nonfinite_in_a_row)
        if self.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise TrainingError(f"{self.nonfinite_in_a_row} optimizer steps in a row had a loss or gradients that "
                                f"are not finite; stopped. The last checkpoint ({self.checkpoint_path}) is intact: "
                                "resume from it, perhaps with a lower learning rate")

    def _save_checkpoint(self, reason: str) -> Path:
        if not all(bool(torch.isfinite(t).all()) for t in self.model.state_dict().values() if t.is_floating_point()):
            raise TrainingError(f"the model's weights are not finite: no checkpoint written; {self.checkpoint_path} "
                                "keeps the last good state")
        if self.main:
            save_checkpoint(self.checkpoint_path, self._checkpoint_state())
            self.progress.emit("checkpoint", path=self.checkpoint_path, epoch=self.epoch, step=self.step, reason=reason)
        dist_utils.barrier(self.info)
        self.last_checkpoint = time.monotonic()
        return self.checkpoint_path

    def _stop(self, reason: str) -> TrainResult:
        self._save_checkpoint(reason)
        status = "interrupted" if reason == "signal" else "stopped"
        if self.main:
            self._plot()
            self.progress.emit(
                "done", status=status, model=None, checkpoint=self.checkpoint_path, epoch=self.epoch, step=self.step
            )
        return TrainResult(status, self.out, None, self.checkpoint_path, self.epoch, self.step, self.last_val)

    def _finish(self) -> TrainResult:
        model_path = self.out / "model.pt"
        if self.main:
            export_model(self._checkpoint_state(), model_path, cases=len(self.train_cases))
            self.progress.emit(
                "done", status="finished", model=model_path, checkpoint=self.checkpoint_path, epoch=self.epoch,
                step=self.step,
            )
        dist_utils.barrier(self.info)
        return TrainResult("finished", self.out, model_path, self.checkpoint_path, self.epoch, self.step, self.last_val)


def export_model(state: dict | str | Path, path: str | Path, dtype: torch.dtype | None = None,
                 cases: int | None = None) -> Path:
    """Write a model file (modelfile.save_model) from a training state: the trainer's, or a run folder's
    checkpoint (a run stopped early is usable too). Metadata: the data (`cases` training cases; from a
    run folder, those of its cases_train.txt), the run's progress and its latest validation.
    dtype torch.float16: half-size weights (shipping, or files to carry back)."""
    from ENSAMSegmentLib.core.modelfile import save_model
    from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig

    if not isinstance(state, dict):
        folder = Path(state)
        state = load_checkpoint(folder / "checkpoint.pt" if folder.is_dir() else folder)
        listed = (folder if folder.is_dir() else folder.parent) / "cases_train.txt"
        if cases is None and listed.is_file():
            cases = len(listed.read_text().splitlines())
    config = TrainConfig.from_dict(state["config"])
    model = ENSAM(ENSAMConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    data = " + ".join(str(d) for d in (config.data, config.synthetic) if d)
    data = f"{cases} cases from {data}" if cases is not None else data
    notes = (f"ensam train: epoch {state['epoch']} of {config.epochs}, {state['step']} steps, {state['samples']} samples, "
             f"{state['elapsed_s'] / 3600:.2f} h, optimizer {config.optimizer}, voxel budget {config.voxel_budget}, "
             f"seed {config.seed}")
    return save_model(path, model, training_data=data, metrics=state.get("last_val"), notes=notes, dtype=dtype,
                      voxel_budget=config.voxel_budget)


def train(config: TrainConfig, progress: ProgressStream | None = None) -> TrainResult:
    """Train a new run described by ``config`` (see the module docstring)."""
    if (Path(config.out) / "checkpoint.pt").exists():
        raise TrainingError(
            f"{config.out} already holds a run (checkpoint.pt): continue it with --resume, or choose another --out"
        )
    return Trainer(config, None, progress).run()


def resume(out: str | Path, progress: ProgressStream | None = None, **overrides) -> TrainResult:
    """Continue the run in ``out`` from its checkpoint; ``overrides``: any of RESUME_OVERRIDES."""
    unknown = sorted(set(overrides) - set(RESUME_OVERRIDES))
    if unknown:
        raise TrainingError(f"cannot change {', '.join(unknown)} when resuming (only {', '.join(RESUME_OVERRIDES)})")
    try:
        state = load_checkpoint(Path(out) / "checkpoint.pt")
    except CheckpointError as error:
        raise TrainingError(f"cannot resume: {error}") from None
    config = dataclasses.replace(TrainConfig.from_dict(state["config"]), out=str(out), **overrides)
    return Trainer(config, state, progress).run()


__all__ = ["EXIT_INTERRUPTED", "RESUME_OVERRIDES", "TrainConfig", "TrainResult", "Trainer", "TrainingError",
           "export_model", "resume", "train"]
