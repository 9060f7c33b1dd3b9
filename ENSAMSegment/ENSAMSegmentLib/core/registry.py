"""Model registries: a `models.json` beside model files that names each file and its sha256.

Two folders hold one each: the shipped models (ENSAMSegment/Resources/Models, committed with the
extension) and the user's models (~/.ensam/models, or $ENSAM_USER_MODELS_DIR; `ensam models import`
writes there, and the ENSAM Segment module lists its *.pt files).

    {"format": "ensam-model-registry", "format_version": 1,
     "default": "ensam-default",            # the name of the default model (shipped registry), or null
     "models": [{"name": "ensam-default", "file": "ensam-default.pt", "sha256": "...", "bytes": 11534336,
                 "weights_dtype": "float16", "parameters": 5500000, "architecture": {ENSAMConfig},
                 "training_data": "...", "metrics": {...}, "created": "...", "ensam_version": "...",
                 "notes": "..."}]}

Loading a model file (modelfile.load_model / read_model_info) looks for a registry in the file's own
folder; when it lists the file, the file's sha256 must match. Hashes are cached per process by the
file's size, mtime and inode, so loading the same file again costs a stat. No torch here: the Slicer
module reads the default model's path before torch is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

REGISTRY_NAME = "models.json"
FORMAT = "ensam-model-registry"
FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).parents[2] / "Resources" / "Models"
DEFAULT_FILE = "ensam-default.pt"  # the default model's file when the shipped registry names none
USER_DIR_ENV = "ENSAM_USER_MODELS_DIR"
SHIPPED_MAX_BYTES = 12 * 1024 * 1024  # issue 12: a shipped model file is at most 12 MB


class RegistryError(Exception):
    """A registry file that cannot be read or written; the message names it."""


def user_models_dir() -> Path:
    """The user's model folder: $ENSAM_USER_MODELS_DIR, else ~/.ensam/models (= mrml USER_MODELS_DIR)."""
    return Path(os.environ.get(USER_DIR_ENV) or Path.home() / ".ensam" / "models")


@dataclass
class ModelEntry:
    name: str
    file: str
    sha256: str
    bytes: int
    weights_dtype: str = ""
    parameters: int = 0
    architecture: dict = field(default_factory=dict)
    training_data: str = ""
    metrics: dict = field(default_factory=dict)
    created: str = ""
    ensam_version: str = ""
    notes: str = ""

    @classmethod
    def from_dict(cls, d: dict, where: str) -> ModelEntry:
        known = {f.name for f in fields(cls)}
        missing = {"name", "file", "sha256", "bytes"} - set(d)
        if missing:
            raise RegistryError(f"{where}: missing {', '.join(sorted(missing))}")
        if not isinstance(d["sha256"], str) or len(d["sha256"]) != 64:
            raise RegistryError(f"{where}: sha256 {d['sha256']!r} is not 64 hex digits")
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Registry:
    folder: Path
    default: str | None = None
    models: list[ModelEntry] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.folder / REGISTRY_NAME

    @classmethod
    def load(cls, folder, foreign_ok: bool = False) -> Registry:
        """The registry in `folder` (an empty one when the folder has none, or with `foreign_ok` when its
        models.json is some other program's: JSON without the ENSAM format marker)."""
        folder = Path(folder)
        path = folder / REGISTRY_NAME
        if not path.is_file():
            return cls(folder)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise RegistryError(f"model registry {path}: cannot be read ({error})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            if foreign_ok:
                return cls(folder)
            raise RegistryError(f"model registry {path}: not an ENSAM model registry (no format {FORMAT!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise RegistryError(f"model registry {path}: format version {data.get('format_version')!r}, "
                                f"this ENSAM reads version {FORMAT_VERSION}")
        models = []
        for i, item in enumerate(data.get("models") or []):
            if not isinstance(item, dict):
                raise RegistryError(f"model registry {path}: model {i + 1} is not a JSON object")
            models.append(ModelEntry.from_dict(item, f"model registry {path}, model {i + 1}"))
        return cls(folder, data.get("default"), models)

    def save(self) -> Path:
        """Write atomically (temporary file, then rename)."""
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, "default": self.default,
                "models": [asdict(m) for m in self.models]}
        text = json.dumps(data, indent=2) + "\n"
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{REGISTRY_NAME}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # not mkstemp's 0600: other users of a shared install read it too
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.path

    def get(self, name: str) -> ModelEntry | None:
        return next((m for m in self.models if m.name == name), None)

    def for_file(self, filename: str) -> ModelEntry | None:
        return next((m for m in self.models if m.file == filename), None)

    def put(self, entry: ModelEntry) -> None:
        """Add `entry`, replacing one of the same name or file."""
        self.models = [m for m in self.models if m.name != entry.name and m.file != entry.file] + [entry]

    def file_of(self, entry: ModelEntry) -> Path:
        return self.folder / entry.file


def default_model_path(folder=None) -> Path:
    """The default model file: the one the shipped registry (or `folder`'s) names as default, else
    ensam-default.pt (until a trained model is registered, `make setup` writes an untrained placeholder there)."""
    folder = Path(folder) if folder is not None else SHIPPED_DIR
    try:
        registry = Registry.load(folder)
    except RegistryError:
        return folder / DEFAULT_FILE  # loading that file reports the broken registry
    entry = registry.get(registry.default) if registry.default else None
    return registry.file_of(entry) if entry else folder / DEFAULT_FILE


_HASHES: dict[tuple, str] = {}


def file_sha256(path) -> str:
    """sha256 of a file, cached by (path, size, mtime, inode): a file is hashed once per process."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def registered_entry(path) -> tuple[Registry, ModelEntry] | None:
    """(registry, entry) when the registry in `path`'s folder lists the file, else None."""
    path = Path(path)
    registry = Registry.load(path.parent, foreign_ok=True)  # a run folder may hold another tool's models.json
    entry = registry.for_file(path.name)
    return (registry, entry) if entry else None


def mismatch_message(path, registry: Registry, entry: ModelEntry, actual: str) -> str:
    """What is wrong with a registered file whose sha256 differs, and what to do."""
    path = Path(path)
    size = path.stat().st_size
    if registry.folder.resolve() == SHIPPED_DIR.resolve():
        fix = ("restore the shipped file (in a source tree: git checkout -- "
               f"ENSAMSegment/Resources/Models/{entry.file}; else reinstall the ENSAM extension)")
    elif registry.folder.resolve() == user_models_dir().resolve():
        fix = f"import the model again: ensam models import FILE --name {entry.name} --replace"
    else:
        fix = (f"restore the file, or register it again: ensam models register FILE --name {entry.name} "
               f"--folder {registry.folder} --replace")
    return (f"model file {path} does not match its entry {entry.name!r} in {registry.path}: sha256 "
            f"expected {entry.sha256}, actual {actual} ({size:,} bytes, registered {entry.bytes:,}). The file "
            f"was changed or damaged after it was registered (an interrupted copy or download?); {fix}")
