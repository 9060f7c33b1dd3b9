"""`ensam web`: ENSAM in the browser, no Slicer needed (trame-slicer front-end).

Opens an image (default: the bundled sample CT) in slice views served at http://HOST:PORT/ and
segments it from a box and foreground/background clicks, with undo, several objects and a
.seg.nrrd download. Needs the `web` extra (`make setup` installs it; or pip install -e '.[web]').
Anyone who can reach HOST:PORT can use the page: keep the default 127.0.0.1 unless you mean it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ENSAMSegmentLib.cli.common import add_device_argument, check_device, check_model, check_output_folder
from ENSAMSegmentLib.cli.main import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser("web", help="segment in the browser (trame-slicer web app)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080; 0: any free)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--image", type=Path,
                        help="image to segment (.nii/.nii.gz/.nrrd/.mha/.npz; default: the bundled sample CT)")
    parser.add_argument("--checkpoint", type=Path, help="ENSAM model file (default: the embedded default model)")
    add_device_argument(parser)
    parser.add_argument("--out-dir", type=Path,
                        help="also write each saved segmentation here (default: browser download only)")
    parser.add_argument("--open", dest="open_browser", action="store_true", help="open the page in a browser")
    parser.set_defaults(func=run)


def run(args) -> int:
    _check_web_extra()
    from ENSAMSegmentLib.core.geometry import GeometryError
    from ENSAMSegmentLib.core.imageio import ImageReadError
    from ENSAMSegmentLib.core.modelfile import ModelFileError
    from ENSAMSegmentLib.core.phantom import sample_data_path

    image = args.image or sample_data_path("image")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0..65535, got {args.port}")
    if args.out_dir is not None:
        check_output_folder(args.out_dir, "--out-dir")
    check_device(args.device)
    check_model(args.checkpoint)
    # trame parses sys.argv for its own options unless TRAME_ARGS is set: ours are not its.
    os.environ.setdefault("TRAME_ARGS", "")
    if not os.environ.get("DISPLAY"):  # headless: render the views through EGL (technical notes, section 4)
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    from ENSAMSegmentLib.webapp.app import ENSAMWebApp, serve

    try:
        app = ENSAMWebApp(image, model_path=args.checkpoint, device=args.device, out_dir=args.out_dir)
    except ModelFileError as error:  # before FileNotFoundError: a missing model file is both
        raise UserError(str(error) if args.checkpoint else f"{error} (the default model; --checkpoint FILE "
                                                           "uses another)") from None
    except (ImageReadError, GeometryError, FileNotFoundError) as error:
        raise UserError(str(error)) from None

    def announce(**_):
        print(f"ENSAM web app: http://{args.host}:{app.server.port}/  (image: {image}; Ctrl+C stops)", flush=True)

    app.server.controller.on_server_ready.add(announce)
    try:
        serve(app, host=args.host, port=args.port, open_browser=args.open_browser)
    except OSError as error:  # the port is taken, or the host is not one of this machine's
        raise UserError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None
    finally:
        app.close()
    return 0


def _check_web_extra() -> None:
    try:
        import trame  # noqa: F401
        import trame_slicer  # noqa: F401
    except ImportError as error:
        raise UserError(f"the browser app needs the 'web' extra ({error.name} is missing): run `make setup`, "
                        f"or {sys.executable} -m pip install 'trame-slicer[standalone]>=2.0,<2.1'") from None
