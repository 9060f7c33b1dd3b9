"""ENSAM in the browser: a thin trame-slicer front-end over the shared PromptController (layer 3).

    app       ENSAMWebApp: the MRML scene and slice views (trame-slicer's SlicerApp), the image, the
              PromptController and the page state; `serve` starts the web server
    layout    the page: slice views, the tool bar (Box, + Click, - Click, Undo, Reset object,
              Next object, Save segmentation) and the status line
    export    the scene's segmentation node -> a Slicer .seg.nrrd file

Started by ``ensam web`` (ENSAMSegmentLib/cli/cmd_web.py). Needs the ``web`` extra
(``trame-slicer[standalone]``, which brings slicer-core); importing this package alone does not.
"""
