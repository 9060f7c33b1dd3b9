"""The interactive loop shared by the ENSAMSegment module, the Segment Editor effect and the web app.

    markups (box ROI, foreground / background point lists)          promptnodes.py
        --observers--> PromptController --submit_*--> session       core/session_contract.py
        <--poll()----- futures         --SegmentWriter.write--> the object's segment

No Qt here: the front-ends own a timer that calls `poll()` while `busy` (the controller asks for it
through the `wake` callback) and refresh their labels from `status` / `timing` in `on_change`.
Nothing waits on the model in the calling thread, so the GUI never blocks. It runs on the slicer-core
wheel as well, which is how it is tested (Testing/test_slicer_frontend.py), with both kinds of session.

Sessions come from a `SessionPool` (core/session_pool.py), one per (volume, model, device): in Slicer
the application's pool of worker processes (slicerui/sessions.py), shared by the module and the effect;
elsewhere a private pool of in-process sessions. Changing the volume, model or device releases the
session and takes another; the image is encoded once per session.

Objects: one session object per segment. `next_object()` starts a new segment; prompts go to the
selected segment, which is created on the first prompt when there is none. Undo / reset act on
the current object: the session steps back, the segmentation is restored exactly by the writer's
undo record of that step (other segments included) when it is the newest one, else the session's
mask is written; the markups are then redrawn from the object's remaining prompts.

Errors reach the status line and the log, and leave a consistent state: a refused prompt changes
nothing; a result that cannot be written (e.g. the volume was moved away from the segmentation) leaves
the segment as it was and forgets the object's prompts (the session drops the object too); a worker
process that died is replaced and the image encoded again, the segmentation untouched; a model or device
that cannot be used says so until another is chosen. `cancel()` stops a running encoding.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .actions import (  # noqa: F401 (the front-ends' tables, also importable from here)
    ACTIONS, DEFAULT_MODEL, DEVICES, PROMPT_NAMES, TOOLS, USER_MODELS_DIR, format_seconds, model_choices,
)
from .promptnodes import PromptNodes, roi_for_box  # noqa: F401


MAX_RESTARTS = 1  # a worker that dies again before any result is not started a third time by itself


@dataclass
class _Job:
    """One submitted request: what to do with its result on the GUI thread."""

    kind: str  # image | box | click | undo | reset
    future: object  # concurrent.futures.Future
    started: float
    segment_id: str | None = None
    number: int = 0  # submission order
    note: str = ""  # said in the status line with the result


class PromptController(PromptNodes):
    """One interactive ENSAM segmentation in a scene (see the module docstring).

    scene, app_logic: slicer.mrmlScene and slicer.app.applicationLogic() in the application, or a
    `mrml.scene.HeadlessScene`'s. wake(): ask the front-end to call `poll()` soon (a timer).
    on_change(): status, timing, target segment or tool changed. editor_node: the Segment Editor's
    vtkMRMLSegmentEditorNode whose masking / overwrite settings every write follows (None: allow
    overlap, edit everywhere). before_change(): called before every change of the segmentation
    (the effect passes scriptedEffect.saveStateForUndo). pool: where sessions come from (default: a
    private pool of in-process sessions). prompt_name: the prefix of the prompt nodes' names.
    """

    def __init__(self, scene, app_logic, *, wake: Callable[[], None] | None = None,
                 on_change: Callable[[], None] | None = None, editor_node=None,
                 before_change: Callable[[], object] | None = None, pool=None, prompt_name: str = "ENSAM"):
        from ENSAMSegmentLib.core.session_pool import SessionPool

        self.scene, self.app_logic = scene, app_logic
        self.wake = wake or (lambda: None)
        self.on_change = on_change or (lambda: None)
        self.editor_node, self.before_change = editor_node, before_change
        self.pool = pool if pool is not None else SessionPool()
        self.prompt_name = prompt_name
        self.model_path: Path | None = None  # None: the default model
        self.device = "auto"
        self.session = None
        self.volume_node = self.segmentation_node = None
        self.segment_id: str | None = None
        self.geometry = None  # world VolumeGeometry of volume_node
        self.writer = None  # mrml.segments.SegmentWriter for (segmentation_node, volume_node)
        self._writes: list[tuple[int, int]] = []  # (object id, step) of each writer undo record
        self._objects: dict[str, int] = {}  # segment id -> session object id
        self._jobs: list[_Job] = []
        self._submitted = 0  # requests submitted so far
        self._session_error = ""  # why no session can be made with this model and device
        self._crashes = 0  # worker crashes since the last result
        self.status = "Select a volume, then draw a box."
        self.timing = ""
        self.image_seconds: float | None = None
        self.device_name = ""  # where the model runs, e.g. "cpu (8 threads, bf16)", once an image is encoded
        self._volume_mtime = None
        self._init_prompt_nodes()

    # -- configuration ------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while requests run or prompt events wait for `poll()`."""
        return bool(self._jobs) or self._prompts_dirty

    @property
    def encoding(self) -> bool:
        return any(job.kind == "image" for job in self._jobs)

    @property
    def model_summary(self) -> str:
        """One line about the model in use, as its session reports it ("" until the session has it)."""
        info = getattr(self.session, "model_info", None)
        if info is None:
            return ""
        if not isinstance(info, dict):  # an in-process session's ModelInfo
            info = {"parameters": info.parameters, "training_data": info.training_data, "created": info.created,
                    "untrained": info.untrained}
        text = f"{info['parameters'] / 1e6:.2f} M parameters, trained on: {info.get('training_data') or 'unknown'}"
        text += f", created {info['created'][:10]}" if info.get("created") else ""
        text += " (untrained: its segmentations mean nothing)" if info.get("untrained") else ""
        device = getattr(self.session, "device_name", "")
        return text + (f"; runs on {device}" if device else "")

    def object_for_segment(self, segment_id: str) -> int | None:
        """The session object id behind a segment (None: no ENSAM prompts for it yet)."""
        return self._objects.get(segment_id)

    def set_model(self, model_path=None, device: str = "auto") -> None:
        """Use another model file (None or '': the default) or device; the image is encoded again."""
        text = "" if model_path is None else str(model_path)
        path = Path(text) if text not in ("", ".") else None  # Path() is what an empty path field gives
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}; use one of {DEVICES}")
        if (path, device) == (self.model_path, self.device):
            return
        self.model_path, self.device = path, device
        self._release_session()
        self._session_error = ""
        if self.volume_node is not None:
            self._clear_prompts()
            self._encode()

    def set_volume(self, volume_node) -> None:
        """Encode this volume (asynchronously); None stops. The same unmodified volume is a no-op."""
        if volume_node is self.volume_node and (volume_node is None or not self._volume_modified()):
            return
        self._release_session()
        self._clear_prompts()
        self.volume_node, self.geometry = volume_node, None
        self._set_writer(None)
        self._session_error = ""
        if volume_node is None:
            self._set_status("Select a volume, then draw a box.")
            return
        self._encode()

    def set_target(self, segmentation_node, segment_id: str | None) -> None:
        """The segment that receives the next prompts (None: a new segment at the first prompt)."""
        if segment_id == "":
            segment_id = None
        if segmentation_node is self.segmentation_node and segment_id == self.segment_id:
            return
        if segmentation_node is not self.segmentation_node:
            self._set_writer(None)
            self._objects.clear()
        if self.segment_id is not None or segment_id is not None:
            self._clear_prompts()  # the markups show the current object's prompts only
        self.segmentation_node, self.segment_id = segmentation_node, segment_id
        object_id = self._objects.get(segment_id) if segment_id is not None else None
        if object_id is not None and self.session is not None and object_id in self.session.object_ids:
            self.session.select_object(object_id)
        self.on_change()

    def cancel(self) -> None:
        """Stop a running encoding: its session ends (a worker process is killed). A box or click, or a
        tool button, encodes the image again."""
        if self.session is None or not self.encoding:
            return
        self.pool.discard(self.session)
        self._release_session()
        self._set_status("Encoding cancelled: press Box or a click tool to encode the image again.")

    # -- object actions -------------------------------------------------------------------------

    def undo(self) -> None:
        """Back one step of the current object (its last box or clicks)."""
        self._object_op("undo")

    def reset_object(self) -> None:
        """Clear the current object's prompts and segment (itself undoable)."""
        self._object_op("reset")

    def next_object(self) -> str | None:
        """Keep the current segment as it is; a new empty segment becomes the target. Returns its id."""
        self._clear_prompts()
        self.segment_id = None
        if self.volume_node is None:
            self.on_change()
            return None
        self.segment_id = self._target_or_status()
        if self.segment_id is None:  # the status says why
            self.on_change()
            return None
        name = self.segmentation_node.GetSegmentation().GetSegment(self.segment_id).GetName()
        self._set_status(f"Next object: {name}. Draw a box, or click on the structure.")
        return self.segment_id

    def _object_op(self, kind: str) -> None:
        object_id = self._objects.get(self.segment_id) if self.segment_id else None
        if object_id is None or self.session is None or object_id not in self.session.object_ids:
            self._set_status("Nothing to " + kind + ": this segment has no ENSAM prompts yet.")
            return
        method = self.session.submit_undo if kind == "undo" else self.session.submit_reset
        self._submit(kind, lambda: method(object_id), segment_id=self.segment_id)

    # -- the loop -------------------------------------------------------------------------------

    def poll(self) -> bool:
        """Send new prompts, apply finished results. Returns `busy` (call again later while True).
        Never raises: an unexpected error is logged and shown in the status line."""
        try:
            self._poll()
        except Exception as error:  # a timer slot must not raise: say it, log it, keep going
            logging.exception("ENSAM: unexpected error")
            self._set_status(f"ENSAM error: {error} (details in the log).")
        return self.busy

    def _poll(self) -> None:
        if self.session is not None:
            self.session.poll()
            if self.session.closed:
                self._session_ended()
        if self._prompts_dirty:
            self._prompts_dirty = False
            if self.session is None and self.volume_node is not None:
                self._encode()  # after a cancel: the prompt waits for the encoder, as any prompt does
            self._send_prompts()
        for job in [j for j in self._jobs if j.future.done()]:
            if job in self._jobs:  # a result before it may have replaced the session and its jobs
                self._jobs.remove(job)
                self._finish(job)
        if self.session is not None and self.session.closed:
            self._session_ended()

    def _session_ended(self) -> None:
        """The session closed under us: its worker died (found dead while idle, say), it could not start, or
        the other front-end cancelled the encoding it shared."""
        from ENSAMSegmentLib.core.session_types import WorkerCrashedError

        failure = getattr(self.session, "failure", None)
        if isinstance(failure, WorkerCrashedError):
            self._worker_lost(failure)
            return
        self._release_session()
        if failure is not None:
            self._session_error = str(failure)
        self._set_status(f"Cannot start ENSAM: {failure}" if failure is not None else
                         "ENSAM stopped: press Box or a click tool to encode the image again.")

    def wait(self, timeout: float = 60.0) -> None:
        """Poll until idle (scripts and tests; a GUI uses its timer instead)."""
        end = time.monotonic() + timeout
        while self.poll():
            if time.monotonic() > end:
                raise TimeoutError(f"ENSAM still busy after {timeout} s: {self.status}")
            time.sleep(0.01)

    def cleanup(self) -> None:
        """Stop observing, release the session, remove the private editor node (prompt nodes stay)."""
        self._unobserve_prompts()
        self._unobserve_interaction()
        self._release_session()
        self._set_writer(None)

    # -- internals: sessions --------------------------------------------------------------------

    def _encode(self) -> bool:
        """Take the volume's session from the pool and submit its image. False (status says why) if none."""
        from .volumes import MRMLError, volume_to_array

        if self._session_error:
            self._set_status(f"Cannot start ENSAM: {self._session_error}")
            return False
        try:
            array, self.geometry = volume_to_array(self.volume_node)
        except MRMLError as error:
            self._set_status(f"Cannot use '{self.volume_node.GetName()}': {error}")
            return False
        self._volume_mtime = self.volume_node.GetImageData().GetMTime()
        key = (id(self.scene), self.volume_node.GetID())
        try:
            self.session = self.pool.acquire(key, self.model_path, self.device)
        except Exception as error:  # model file or device refused at once: said in the status line
            logging.exception("ENSAM session could not start")
            self._session_error = str(error)
            self._set_status(f"Cannot start ENSAM: {error}")
            return False
        session = self.session
        # the image's identity: this node's image as last modified (no hashing of every voxel on the GUI thread)
        identity = (key, self._volume_mtime)
        self._submit("image", lambda: session.submit_image(array, spacing_zyx=self.geometry.spacing_zyx,
                                                           identity=identity))
        if self.encoding:
            self._set_status(f"Encoding '{self.volume_node.GetName()}'...")
        return True

    def _release_session(self) -> None:
        if self.session is not None:
            self.pool.release(self.session)
        self.session = None
        self._jobs.clear()
        self._objects.clear()
        self._writes.clear()

    def _tool_started(self) -> None:
        if self.session is None and self.volume_node is not None:
            self._encode()

    def _worker_lost(self, error) -> None:
        """The worker process died: a new session encodes the image again; the segments stay as they are.
        Twice in a row without a result in between: no third try until the user asks (a tool, a prompt)."""
        logging.error("ENSAM: %s", error)
        self._release_session()
        self._clear_prompts()
        self._crashes += 1
        if self._crashes > MAX_RESTARTS:
            self._crashes = 0
            self._set_status(f"The ENSAM worker stopped again ({error}); not restarted. The segmentation is "
                             "unchanged. Try another device or a smaller (cropped) volume, or press Box to try again.")
            return
        if self.volume_node is not None and self._encode():
            self._set_status(f"The ENSAM worker stopped ({error}). Restarted: encoding the image again; "
                             "the segmentation is unchanged, prompts start a new object.")

    def _follow_volume(self) -> None:
        """The volume's world geometry as it is now (a transform may have moved it; its voxels are the same)."""
        from .volumes import MRMLError, volume_geometry

        try:
            self.geometry = volume_geometry(self.volume_node)
        except MRMLError as error:
            logging.warning("ENSAM: cannot read the volume's geometry: %s", error)

    def _volume_modified(self) -> bool:
        image = self.volume_node.GetImageData()
        return image is not None and image.GetMTime() != self._volume_mtime

    # -- internals: sending ---------------------------------------------------------------------

    def _send(self, kind: str, submit, note: str = "") -> None:
        """Submit a prompt for the target segment's object, creating segment and object if needed."""
        segment_id = self._target_or_status()
        if segment_id is None:
            return
        from ENSAMSegmentLib.core.session_types import SessionError

        object_id = self._objects.get(segment_id)
        if object_id is None or object_id not in self.session.object_ids:  # new, or gone with a new image
            try:
                object_id = self._objects[segment_id] = self.session.create_object()
            except SessionError as error:  # the session ended meanwhile: poll() replaces it
                self._set_status(f"{kind.capitalize()} refused: {error}")
                return
        self._submit(kind, lambda: submit(object_id), segment_id=segment_id, note=note)

    def _submit(self, kind: str, submit, segment_id: str | None = None, note: str = "") -> None:
        from ENSAMSegmentLib.core.session_types import SessionError

        try:
            future = submit()
        except SessionError as error:  # bad prompt, no image, session ended: the session is unchanged
            logging.warning("ENSAM %s refused: %s", kind, error)
            self._set_status(f"{kind.capitalize()} refused: {error}")
            return
        self._submitted += 1
        self._jobs.append(_Job(kind, future, time.perf_counter(), segment_id, self._submitted, note))
        self.wake()
        self.on_change()

    # -- internals: results ---------------------------------------------------------------------

    def _finish(self, job: _Job) -> None:
        from ENSAMSegmentLib.core.session_types import StaleRequest, WorkerCrashedError

        if job.future.cancelled():
            return  # its prompts travel with a newer request of the same object (or the session ended)
        try:
            result = job.future.result()
        except StaleRequest:
            return
        except WorkerCrashedError as error:
            self._worker_lost(error)
            return
        except Exception as error:  # shown to the user; the session keeps its previous state
            self._request_failed(job, error)
            return
        self._crashes = 0
        if job.kind == "image":
            self.image_seconds = result.seconds
            encoded = "encoded" if result.encoded else "already encoded"
            self.timing = f"Image {encoded} in {format_seconds(result.seconds)}."
            self.device_name = getattr(self.session, "device_name", "")
            self._set_status("Ready: draw a box, or click on the structure.")
            self.wake()  # prompts placed while encoding
            return
        if job.segment_id is None or self.writer is None:
            return
        try:
            self._apply(job, result)
        except Exception as error:  # e.g. SegmentWriteError: the volume moved away from the segmentation
            self._write_failed(job, result, error)
            return
        total = time.perf_counter() - job.started
        self.timing = (f"{job.kind.capitalize()}: {format_seconds(total)} "
                       f"(model {format_seconds(result.seconds)}).")
        self._set_status(f"Object {result.object_id}: step {result.step}." + job.note)

    def _request_failed(self, job: _Job, error: Exception) -> None:
        failure = getattr(self.session, "failure", None)
        if job.kind == "image" and failure is not None:  # the worker could not load the model or use the device
            logging.error("ENSAM session could not start: %s", failure)
            self._session_error = str(failure)
            self._release_session()
            self._set_status(f"Cannot start ENSAM: {failure}")
            return
        logging.error("ENSAM %s failed: %s", job.kind, error, exc_info=error)
        self._set_status(f"{job.kind.capitalize()} failed: {error}")

    def _apply(self, job: _Job, update) -> None:
        """Write a finished update into its segment (undo: the writer's own record when possible)."""
        segmentation = self.writer.segmentation
        if segmentation.GetSegment(job.segment_id) is None:
            return  # the user removed the segment meanwhile
        if job.kind == "undo" and self._writes and self._writes[-1] == (update.object_id, update.step + 1):
            self.writer.undo()
            self._writes.pop()
        elif update.changed is not None:
            self.writer.write(job.segment_id, update.block, update.changed)
            self._writes.append((update.object_id, update.step))
            del self._writes[: max(0, len(self._writes) - self.writer.max_undo)]
        if job.segment_id != self.segment_id:
            return
        if job.kind in ("undo", "reset"):
            self._redraw_prompts(update.prompts)
        elif job.kind == "box":
            self._remove_clicks_before(job.number)  # a box starts the object over: earlier clicks are gone

    def _write_failed(self, job: _Job, update, error: Exception) -> None:
        """The session stepped on but the segment did not: drop the object on both sides so they agree."""
        logging.error("ENSAM: the %s result could not be written into segment %s: %s", job.kind, job.segment_id,
                      error, exc_info=error)
        object_id = update.object_id
        if self.session is not None and object_id in self.session.object_ids:
            self.session.remove_object(object_id)
        self._objects = {s: o for s, o in self._objects.items() if o != object_id}
        if job.segment_id == self.segment_id:
            self._clear_prompts()
        self._set_writer(None)  # made anew, from the scene as it is then, at the next prompt
        self._set_status(f"{job.kind.capitalize()} not written: {error}. The segment is unchanged; its ENSAM "
                         "prompts were cleared: draw the box again.")

    # -- internals: targets ---------------------------------------------------------------------

    def _target_or_status(self) -> str | None:
        """`_ensure_target`, or None with the reason in the status line (e.g. segments on another grid)."""
        from .volumes import MRMLError

        try:
            return self._ensure_target()
        except MRMLError as error:
            logging.warning("ENSAM: cannot write into the segmentation: %s", error)
            self._set_status(f"Cannot write into '{self.segmentation_node.GetName()}': {error}")
            return None

    def _ensure_target(self) -> str:
        """The target segment id: creates the segmentation and the segment when missing."""
        from .segments import SegmentWriter

        if self.segmentation_node is None or self.segmentation_node.GetScene() is not self.scene:
            node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{self.volume_node.GetName()} ENSAM")
            node.CreateDefaultDisplayNodes()
            node.SetReferenceImageGeometryParameterFromVolumeNode(self.volume_node)
            self.segmentation_node, self.segment_id = node, None
            self._set_writer(None)
        if self.writer is None:
            self._set_writer(SegmentWriter(self.segmentation_node, self.volume_node, editor_node=self.editor_node,
                                           before_change=self.before_change, max_undo=32))
        segmentation = self.segmentation_node.GetSegmentation()
        if self.segment_id is None or segmentation.GetSegment(self.segment_id) is None:
            self.segment_id = self.writer.add_segment(f"ENSAM {segmentation.GetNumberOfSegments() + 1}")
            self.on_change()
        return self.segment_id

    def _set_writer(self, writer) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = writer
        self._writes.clear()

    def _set_status(self, text: str) -> None:
        self.status = text
        self.on_change()
