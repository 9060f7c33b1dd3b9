"""The inference worker process: one InferenceSession behind the socket of worker_wire.py.

    python -m ENSAMSegmentLib.core.worker_main --port PORT --options JSON --image-folders JSON
                                                                             (key on stdin, one hex line)

Started by `WorkerSession` (worker.py), never by hand. Threads:

* the reader reads every message at once into memory (so the parent never waits on a socket while the
  model loads or works), an image from the file the message names (worker_wire.read_image, which deletes
  it), and exits the process when the connection ends: the parent is gone;
* the main thread loads the model (InferenceSession), says "ready" (or "fatal" and exits with code 2
  when the model or device cannot be used), then executes the messages in order;
* the session's own thread runs the model; each request's future sends its reply when it completes.

Replies: {"op": "done" | "error" | "cancelled", "id": n, ...}. Object ids are the client's: the client
numbers its objects the way InferenceSession does, and `_ids` maps them to the session's (they agree,
the map only makes sure). Nothing here decides anything a session would not.

An image file that cannot be read (it is written whole before its message is sent, so: no memory for it,
or someone removed it) fails its request with the reason and ends the process (EXIT_TRANSFER): its
session would otherwise keep the previous image under the new one's objects, and the client replaces a
worker that ended. The image folders are removed whenever the process ends (the parent may have died
with a file in them).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading

import numpy  # noqa: F401  imported before the reader thread unpickles arrays while the main thread imports
#              torch: two threads importing numpy at once can see it half initialised (a circular ImportError)

from . import worker_wire as wire

EXIT_FATAL = 2  # the model or the device could not be used ("fatal" was sent)
EXIT_TRANSFER = 3  # an image file could not be read (its request failed with the reason)


class WorkerServer:
    def __init__(self, conn, options: dict, image_folders=()):
        self.conn, self.options = conn, dict(options)
        self.image_folders = [str(f) for f in image_folders]
        self.session = None
        self.inbox: queue.Queue = queue.Queue()
        self._send_lock = threading.Lock()
        self._ids: dict[int, int] = {}  # client object id -> session object id

    # -- wire ---------------------------------------------------------------------------------

    def send(self, message) -> None:
        with self._send_lock:
            try:
                wire.send(self.conn, message)
            except OSError:  # the parent is gone: nothing left to do
                self.exit(0)

    def exit(self, code: int) -> None:
        """End the process now (from any thread), removing the image folders first."""
        wire.remove_folders(self.image_folders)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def read_forever(self) -> None:
        """Reader thread: messages into the inbox; the end of the connection ends the process."""
        while True:
            try:
                message = wire.recv(self.conn)
            except (EOFError, OSError):
                self.exit(0)
            if message.get("op") == "image" and "file" in message:
                self._read_image(message)
            self.inbox.put(message)
            if message.get("op") == "close":
                return

    def _read_image(self, message: dict) -> None:
        """The image's voxels from the file the message names, into the message (as "array")."""
        try:
            message["array"] = wire.read_image(message.pop("file"), message.pop("shape"), message.pop("dtype"),
                                               self.image_folders)
        except (OSError, ValueError, MemoryError) as error:
            from .session_types import SessionError

            text = f"the image did not reach the ENSAM worker process: {error}"
            print(text, file=sys.stderr, flush=True)  # the client quotes the log's last line with the exit
            self.send({"op": "error", "id": message["id"], "error": wire.encode_error(SessionError(text))})
            self.exit(EXIT_TRANSFER)

    # -- main thread --------------------------------------------------------------------------

    def run(self) -> int:
        threading.Thread(target=self.read_forever, name="ENSAM-worker-reader", daemon=True).start()
        try:
            self.session = self._load()
        except Exception as error:  # model file or device: the client shows the message
            self.send({"op": "fatal", "error": wire.encode_error(error)})
            return EXIT_FATAL
        self.send({"op": "ready", "pid": os.getpid(), "device_name": self.session.device_name,
                   "model": _model_summary(self.session.model_info), "malloc_tuned": self.malloc_tuned,
                   "voxel_budget": self.session.voxel_budget, "global_voxel_budget": self.session.global_voxel_budget})
        while True:
            message = self.inbox.get()
            op = message.get("op")
            if op == "close":
                return 0
            try:
                self.dispatch(op, message)
            except Exception as error:  # refused at submission (bad input): the session is unchanged
                if "id" in message:
                    self.send({"op": "error", "id": message["id"], "error": wire.encode_error(error)})

    def _load(self):
        from . import devices
        from .session import InferenceSession

        # this process only runs the model: freed activations are reused, no page faults per layer (issue 14)
        self.malloc_tuned = devices.keep_freed_memory()
        options = dict(self.options)
        threads = options.pop("torch_threads", None)
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        return InferenceSession(model_path=options.pop("model_path", None), device=options.pop("device", "auto"),
                                **options)

    def dispatch(self, op: str, m: dict) -> None:
        s = self.session
        if op == "image":
            future = s.submit_image(m["array"], m["spacing"], m["modality"], m["ct_window"], m.get("identity"))
            self._ids = {k: v for k, v in self._ids.items() if v in s.object_ids}  # a new image clears them
            self._reply(m["id"], future)
        elif op == "same_image":
            self._reply(m["id"], s.submit_same_image())
        elif op == "create":
            self._ids[m["object"]] = s.create_object()
        elif op == "remove":
            s.remove_object(self._sid(m["object"]))
            del self._ids[m["object"]]
        elif op == "box":
            self._reply(m["id"], s.submit_box(m["lo"], m["hi"], object_id=self._sid(m["object"])), m["object"])
        elif op == "click":
            future = s.submit_click(m["point"], m["foreground"], object_id=self._sid(m["object"]))
            self._reply(m["id"], future, m["object"])
        elif op in ("undo", "reset"):
            submit = s.submit_undo if op == "undo" else s.submit_reset
            self._reply(m["id"], submit(self._sid(m["object"])), m["object"])
        elif op == "labels":
            self._reply(m["id"], s.submit_merged_labels(), labels=True)
        else:
            raise ValueError(f"unknown worker request {op!r}")

    def _sid(self, client_id: int) -> int:
        from .session_types import UnknownObjectError

        if client_id not in self._ids:
            raise UnknownObjectError(f"no object with id {client_id!r} in the worker")
        return self._ids[client_id]

    def _reply(self, request_id: int, future, client_object: int | None = None, labels: bool = False) -> None:
        def done(f):
            if f.cancelled():
                self.send({"op": "cancelled", "id": request_id})
                return
            error = f.exception()
            if error is not None:
                self.send({"op": "error", "id": request_id, "error": wire.encode_error(error)})
                return
            result = f.result()
            if client_object is not None:  # a SegmentationUpdate: the changed block, not the whole mask
                result = {"changed": result.changed, "block": result.block, "logits_region": result.logits_region,
                          "seconds": result.seconds, "timings": result.timings, "step": result.step,
                          "decoding": result.decoding, "window_growth": result.window_growth,
                          "prompts": result.prompts}
            self.send({"op": "done", "id": request_id, "result": result})

        future.add_done_callback(done)


def _model_summary(info) -> dict:
    return {"path": None if info.path is None else str(info.path), "training_data": info.training_data,
            "parameters": info.parameters, "created": info.created, "untrained": info.untrained}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--options", default="{}", help="InferenceSession options as JSON")
    parser.add_argument("--image-folders", default="[]", help="where the client puts images (JSON list)")
    args = parser.parse_args(argv)
    folders = json.loads(args.image_folders)
    try:
        key = bytes.fromhex(sys.stdin.readline().strip())
        conn = wire.connect(args.port, key)
    except BaseException:  # the parent died before the handshake
        wire.remove_folders(folders)
        raise
    server = WorkerServer(conn, json.loads(args.options), folders)
    try:
        code = server.run()
    except BaseException:
        wire.remove_folders(folders)
        raise
    # Leave at once: nothing is saved here, and the interpreter's shutdown (torch's threads, the reader
    # blocked on the socket) can take seconds or abort; the parent kills a worker that lingers anyway.
    server.exit(code)


if __name__ == "__main__":
    sys.exit(main())
