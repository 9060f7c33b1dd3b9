"""Qt glue shared by the ENSAMSegment module widget and the Segment Editor effect (Slicer app only).

A `PromptPanel` connects a `PromptController` to widgets the front-end owns: the six action
buttons, the status and timing labels, the encoder progress bar and its Cancel button, keyboard
shortcuts, and the timer that calls `controller.poll()` while work is pending (so results are applied
on the GUI thread and the GUI never waits for the model: it runs in a worker process, slicerui/sessions.py).
Everything else lives in the controller, which is tested without Qt.
"""

from __future__ import annotations

import logging

import qt

import slicer

from ENSAMSegmentLib.mrml.actions import ACTIONS, TOOLS

# How often replies are picked up while the worker computes: a click's result waits at most this long
# after it arrived (5 ms on average, about 1 % of a click on a CPU); idle, the timer does not run.
POLL_MS = 10


class PromptPanel:
    """buttons: {action: QPushButton} for the keys of `ACTIONS`; the tool buttons are checkable.
    cancel_button (optional): shown while the image is encoded; it stops the encoding."""

    def __init__(self, buttons: dict, status_label, timing_label, progress_bar, cancel_button=None):
        self.controller = None
        self.buttons, self.status_label = buttons, status_label
        self.timing_label, self.progress_bar, self.cancel_button = timing_label, progress_bar, cancel_button
        self.shortcuts: dict[str, object] = {}  # key -> QShortcut, while installed
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self._poll)
        for action, button in buttons.items():
            label, key = ACTIONS[action]
            button.text = f"{label} ({key})"
            button.toolTip = f"{button.toolTip} Shortcut: {key}".strip()
            button.checkable = action in TOOLS
            button.connect("clicked()", lambda action=action: self.trigger(action))
        if cancel_button is not None:
            cancel_button.connect("clicked()", self.cancel)
        self.progress_bar.visible = False
        self.refresh()

    def set_controller(self, controller) -> None:
        self.controller = controller
        self.refresh()

    def wake(self) -> None:
        """The controller has work: poll soon (its `wake` callback)."""
        if not self.timer.isActive():
            self.timer.start()

    def _poll(self) -> None:
        busy = self.controller is not None and self.controller.poll()  # poll() never raises
        if not busy:
            self.timer.stop()
        self.refresh()

    def trigger(self, action: str) -> None:
        """What a button click or a shortcut does."""
        controller = self.controller
        if controller is None:
            self.refresh()
            return
        if action in TOOLS:
            if controller.active_tool() == action:
                controller.stop_tool()
            else:
                controller.start_tool(action)
        elif action == "undo":
            controller.undo()
        elif action == "reset":
            controller.reset_object()
        elif action == "next":
            controller.stop_tool()
            controller.next_object()
        self.refresh()

    def cancel(self) -> None:
        if self.controller is not None:
            self.controller.cancel()
        self.refresh()

    def refresh(self) -> None:
        """Buttons, labels, progress bar and Cancel from the controller's state."""
        try:
            self._refresh()
        except Exception:  # a display problem must not break the timer that applies results
            logging.exception("ENSAM: cannot update the panel")

    def _refresh(self) -> None:
        controller = self.controller
        ready = controller is not None and controller.volume_node is not None
        active = controller.active_tool() if controller is not None else None
        for action, button in self.buttons.items():
            button.enabled = ready
            if action in TOOLS:
                was_blocked = button.blockSignals(True)
                button.checked = active == action
                button.blockSignals(was_blocked)
        if controller is not None:
            self.status_label.text = controller.status
            self.timing_label.text = controller.timing
            self.progress_bar.visible = controller.encoding
            if self.cancel_button is not None:
                self.cancel_button.visible = controller.encoding

    def install_shortcuts(self, parent=None) -> None:
        """The keys of `ACTIONS` on the main window, until `remove_shortcuts` (none without a main window)."""
        self.remove_shortcuts()
        parent = parent or slicer.util.mainWindow()
        if parent is None:  # Slicer --no-main-window (the generic tests): no keys to bind
            return
        for action, (_, key) in ACTIONS.items():
            shortcut = qt.QShortcut(qt.QKeySequence(key), parent)
            shortcut.connect("activated()", lambda action=action: self.trigger(action))
            self.shortcuts[key] = shortcut

    def remove_shortcuts(self) -> None:
        for shortcut in self.shortcuts.values():
            shortcut.setParent(None)
            shortcut.deleteLater()
        self.shortcuts.clear()

    def cleanup(self) -> None:
        self.timer.stop()
        self.remove_shortcuts()
        self.controller = None
