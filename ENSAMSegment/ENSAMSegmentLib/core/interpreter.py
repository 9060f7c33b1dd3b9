"""Which Python starts ENSAM's child processes (inference worker, training, coreset), with what, and how they ended.

Inside the Slicer application `sys.executable` is the *launcher* `PythonSlicer`, not an interpreter:
qSlicerCoreApplication::handleCommandLineArguments sets it to QStandardPaths::findExecutable("PythonSlicer")
(Base/QTCore/qSlicerCoreApplication.cxx, v5.10.0 lines 1340-1342). PythonSlicer is a CTK AppLauncher
(SuperBuild/python_configure_python_launcher.cmake, v5.10.0 lines 262-282: APPLICATION_NAME PythonSlicer,
APPLICATION_INSTALL_EXECUTABLE_NAME python-real) that sets up the environment and starts `python-real`, the
real interpreter beside it, as its own child; it forwards no signal, so stopping the launcher leaves
python-real running. A child started from Slicer already has that environment (Slicer's own launcher set
PYTHONHOME, PYTHONPATH and the library paths for SlicerApp-real: SuperBuild/External_python.cmake, v5.10.0
lines 376-379 and 419-422, and LibraryPaths, PIP_REQUIRE_VIRTUALENV, SSL_CERT_FILE as PythonSlicer does:
CMake/SlicerBlockCTKAppLauncherSettings.cmake lines 279-284, 333), and Slicer itself runs Python CLI modules
that way: python-real found on SlicerApp-real's PATH, started with its environment
(Base/QTCLI/qSlicerCLIExecutableModuleFactory.cxx, v5.10.0 lines 33-47 and 82). So ENSAM starts python-real
directly: the process it holds is the interpreter itself, and signalling or killing it reaches the work.
Outside Slicer `sys.executable` is used as it is.

The child also needs ENSAM's own packages: Slicer adds module folders to sys.path of the application,
not to PYTHONPATH, so `child_environment` puts the folders that hold ENSAMSegmentLib (and ENSAMTrainingLib)
first on the child's PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

LAUNCHER_NAME = "PythonSlicer"
REAL_NAME = "python-real"


def python_interpreter(executable: str | None = None) -> str:
    """The interpreter for child processes: python-real beside a PythonSlicer launcher, else `executable`
    (default sys.executable) itself."""
    executable = executable or sys.executable
    path = Path(executable)
    if path.name.lower().startswith(LAUNCHER_NAME.lower()):
        real = path.with_name(REAL_NAME + path.suffix)  # python-real.exe beside PythonSlicer.exe on Windows
        if real.is_file():
            return str(real)
    return executable


def package_folders(modules=("ENSAMSegmentLib", "ENSAMTrainingLib")) -> list[str]:
    """The folders holding these packages (their parents), without duplicates; missing packages skipped."""
    import importlib

    folders = []
    for name in modules:
        try:
            package = importlib.import_module(name)
        except ImportError:
            continue
        folder = str(Path(package.__file__).resolve().parents[1])
        if folder not in folders:
            folders.append(folder)
    return folders


def child_environment(base: dict[str, str] | None = None, folders: list[str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) with PYTHONPATH starting with `folders` (default `package_folders()`)
    and unbuffered output."""
    env = dict(os.environ if base is None else base)
    paths = (package_folders() if folders is None else list(folders)) + [
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def new_group_options() -> dict:
    """subprocess.Popen options that start the child in a process group of its own: on POSIX a new session
    (os.killpg reaches it and every process it starts, and Ctrl-C in Slicer's terminal does not), on
    Windows a new process group without a console window."""
    if os.name == "nt":
        import subprocess

        return {"creationflags": subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def describe_exit(returncode) -> str:
    """'exited with code 1' / 'was killed (signal 9, SIGKILL)'."""
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"was killed (signal {-returncode}, {name})"
    return f"exited with code {returncode}"
