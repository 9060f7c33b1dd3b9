"""The request/response contract every ENSAM front-end uses, whichever way the model runs.

Two implementations, one contract:

* `InferenceSession` (session.py): the model in this process, on one worker thread. The `ensam` tool,
  the benchmark, the challenge predictor and the web app use it.
* `WorkerSession` (worker.py): the model in a child process (inside Slicer: python-real), prompts over a
  socket, the changed block of each mask back. The Slicer module and Segment Editor effect use it.

The prompt controller (mrml/promptcontroller.py) takes either through a `SessionPool` (session_pool.py),
and its scenario tests run against both (Testing/test_slicer_frontend.py, Testing/core/test_worker.py).

Requests (all return a concurrent.futures.Future; bad input raises a SessionError subclass at once and
changes nothing):
    submit_image(array_zyx, spacing_zyx, modality, ct_window, identity) -> ImageReport  (the same image
        again: encoded False, objects kept; a different one: objects cleared, ids restart at 1; "the same":
        every byte hashed, or the caller's `identity` when it knows one, e.g. volume node + modification time)
    submit_box(kji_min, kji_max, object_id) / submit_click(kji, foreground, object_id)
    submit_undo(object_id) / submit_reset(object_id)                            -> SegmentationUpdate
    submit_merged_labels()                                                      -> uint8/uint16 labelmap
Objects (answered at once): create_object() -> id (1, 2, ...; selected), select_object(id),
    remove_object(id), object_ids, selected_object, object_prompts(id), object_mask(id), image_shape.
Delivery: poll() hands finished replies to their futures (in-process: nothing to do); the synchronous
    set_image / add_box / add_click / undo / reset / merged_labels wait for theirs.
Responses: SegmentationUpdate (session_types.py) carries the object id, `changed` (slices bounding every
    changed voxel) and `block` (the new mask over them): a front-end writes `block` into `changed` and
    nothing else. A queued prompt overtaken by a newer one for the same object arrives cancelled (its
    prompts travel with the newer one); a request whose object or image went away fails with StaleRequest.
End: close() never waits for a running request; later calls raise SessionClosedError. A WorkerSession
    whose process died fails its requests with WorkerCrashedError and is closed.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

# Every name of the contract: both implementations must have all of them (Testing/core/test_worker.py).
CONTRACT = (
    "submit_image", "submit_box", "submit_click", "submit_undo", "submit_reset", "submit_merged_labels",
    "set_image", "add_box", "add_click", "undo", "reset", "merged_labels",
    "create_object", "select_object", "remove_object", "object_ids", "selected_object", "object_prompts",
    "object_mask", "image_shape", "poll", "fileno", "close", "closed",
)


@runtime_checkable
class Session(Protocol):
    """What the prompt controller and the tools need of a session (see the module docstring)."""

    def submit_image(self, array_zyx, spacing_zyx=(1.0, 1.0, 1.0), modality: str = "auto", ct_window=None,
                     identity=None): ...
    def submit_box(self, kji_min, kji_max, object_id: int | None = None): ...
    def submit_click(self, kji, foreground: bool = True, object_id: int | None = None): ...
    def submit_undo(self, object_id: int | None = None): ...
    def submit_reset(self, object_id: int | None = None): ...
    def submit_merged_labels(self): ...
    def create_object(self) -> int: ...
    def select_object(self, object_id: int) -> None: ...
    def remove_object(self, object_id: int) -> None: ...
    def object_prompts(self, object_id: int | None = None): ...
    def object_mask(self, object_id: int | None = None): ...
    def poll(self) -> None: ...
    def close(self, wait: bool = True) -> None: ...
