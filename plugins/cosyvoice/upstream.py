"""The official CosyVoice code from a checkout: checks, lazy import, upstream quirks, model dir and TensorRT plans."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import re
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from wyoming_cosyvoice.errors import EngineUnavailable

from .prompts import soundfile_load_wav

_LOGGER = logging.getLogger(__name__)

PREFIX = "cosyvoice engine: "
README_HINT = "README 'GPU engine: CosyVoice'"


@dataclass(frozen=True)
class ModelInfo:
    """What a model directory holds, found without importing anything heavy."""

    path: Path
    """The model directory."""

    version: int
    """1, 2 or 3 (CosyVoice, CosyVoice2, CosyVoice3)."""

    class_name: str
    """Upstream class: CosyVoice, CosyVoice2 or CosyVoice3."""

    identity: str
    """Hash of the yaml and the model files' names, sizes and times: prepared prompts and plans are keyed by it."""

    @property
    def sample_rate(self) -> int:
        """Output rate the model family uses (confirmed by the loaded model's `sample_rate`)."""
        return 22050 if self.version == 1 else 24000


_YAMLS = {1: "cosyvoice.yaml", 2: "cosyvoice2.yaml", 3: "cosyvoice3.yaml"}
_CLASSES = {1: "CosyVoice", 2: "CosyVoice2", 3: "CosyVoice3"}


def required_files(version: int) -> list[str]:
    """Files upstream opens when constructing the model class of `version`."""
    files = [_YAMLS[version], "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", f"speech_tokenizer_v{version}.onnx"]
    if version >= 2:
        files.append("CosyVoice-BlankEN")
    return files


def inspect_model_dir(model_dir: Optional[Path]) -> ModelInfo:
    """Which CosyVoice a model directory holds; a missing directory or file is a one-line EngineUnavailable."""
    if model_dir is None:
        raise EngineUnavailable(PREFIX + f"engines.cosyvoice.model_dir is not set ({README_HINT})")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EngineUnavailable(
            PREFIX
            + f"model directory {model_dir} not found (fetch one with: wyoming-cosyvoice download CosyVoice2-0.5B)"
        )
    versions = [v for v, name in _YAMLS.items() if (model_dir / name).is_file()]
    if not versions:
        raise EngineUnavailable(
            PREFIX + f"{model_dir} is not a CosyVoice model directory (none of {', '.join(_YAMLS.values())} found)"
        )
    version = versions[-1]
    missing = [name for name in required_files(version) if not (model_dir / name).exists()]
    if missing:
        raise EngineUnavailable(
            PREFIX + f"model directory {model_dir} is incomplete: missing {', '.join(missing)} "
            f"(re-run wyoming-cosyvoice download, or git lfs pull inside it)"
        )
    digest = hashlib.sha256(_CLASSES[version].encode())
    digest.update((model_dir / _YAMLS[version]).read_bytes())
    for name in required_files(version)[1:]:
        path = model_dir / name
        stat = path.stat()
        digest.update(f"|{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return ModelInfo(model_dir.resolve(), version, _CLASSES[version], digest.hexdigest()[:16])


def check_checkout(repo: Optional[Path]) -> Path:
    """The checkout root, verified to hold the CosyVoice package and its Matcha-TTS submodule."""
    if repo is None:
        raise EngineUnavailable(PREFIX + f"engines.cosyvoice.repo is not set ({README_HINT})")
    repo = Path(repo)
    if not repo.is_dir():
        raise EngineUnavailable(
            PREFIX + f"CosyVoice checkout {repo} not found "
            f"(git clone --recursive https://github.com/FunAudioLLM/CosyVoice.git {repo})"
        )
    if not (repo / "cosyvoice" / "cli" / "cosyvoice.py").is_file():
        raise EngineUnavailable(PREFIX + f"{repo} is not a CosyVoice checkout (no cosyvoice/cli/cosyvoice.py)")
    if not (repo / "third_party" / "Matcha-TTS" / "matcha").is_dir():
        raise EngineUnavailable(
            PREFIX + f"{repo}/third_party/Matcha-TTS is empty (run: git -C {repo} submodule update --init --recursive)"
        )
    return repo.resolve()


class _UpstreamRootFilter(logging.Filter):
    """Drop CosyVoice's per-chunk INFO/DEBUG lines, which it logs on the root logger (warnings still show)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "root" or record.levelno >= logging.WARNING


_ROOT_FILTER = _UpstreamRootFilter()


def _no_progress_bar(iterable: Any, *args: Any, **kwargs: Any) -> Any:
    """Stands in for tqdm: upstream draws a progress bar on stderr for every request."""
    return iterable


def _ensure_modelscope() -> None:
    """Upstream imports modelscope at module top but only calls it for a missing model dir, which we refuse first."""
    if "modelscope" in sys.modules or importlib.util.find_spec("modelscope") is not None:
        return
    placeholder = types.ModuleType("modelscope")

    def snapshot_download(model_id: str, *args: Any, **kwargs: Any) -> str:
        raise RuntimeError(f"modelscope is not installed; cannot download {model_id} (use wyoming-cosyvoice download)")

    placeholder.snapshot_download = snapshot_download  # type: ignore[attr-defined]
    placeholder.__file__ = "<wyoming-cosyvoice placeholder>"
    sys.modules["modelscope"] = placeholder


PIP_REQUIREMENTS = {
    "conformer": "conformer",
    "diffusers": "diffusers==0.29.0",
    "einops": "einops",
    "gdown": "gdown",
    "hydra": "hydra-core",
    "hyperpyyaml": "hyperpyyaml",
    "inflect": "inflect",
    "librosa": "librosa",
    "lightning": "lightning",
    "matplotlib": "matplotlib",
    "more_itertools": "more-itertools",
    "numba": "numba",
    "omegaconf": "omegaconf",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime-gpu",
    "PIL": "pillow",
    "regex": "regex",
    "rich": "rich",
    "scipy": "scipy",
    "sklearn": "scikit-learn",
    "soundfile": "soundfile",
    "tiktoken": "tiktoken",
    "torchaudio": "torchaudio==2.11.*",
    "tqdm": "tqdm",
    "transformers": "transformers>=4.51.3,<4.53",
    "wetext": "wetext",
    "wget": "wget",
    "whisper": "openai-whisper",
    "x_transformers": "x-transformers",
    "yaml": "pyyaml",
}
"""Import name -> what to `pip install` for it (the `gpu` extra's pins; the names differ for whisper, hydra, ...)."""


def pip_requirement(module: str) -> str:
    """The pip requirement that provides import name `module` (its top-level package)."""
    top = module.split(".")[0]
    return PIP_REQUIREMENTS.get(top, top.replace("_", "-"))


def _version(requirement: str) -> str:
    """Installed version of the distribution a requirement names ("not installed" when absent)."""
    from importlib import metadata

    try:
        return metadata.version(re.split(r"[<>=!~;\s]", requirement)[0])
    except metadata.PackageNotFoundError:
        return "not installed"


def _import_failure(repo: Path, err: BaseException) -> EngineUnavailable:
    """One line that names the package to install (or the pair of versions that do not fit) for an import error."""
    where = f"importing CosyVoice from {repo} failed: "
    if isinstance(err, ModuleNotFoundError) and err.name:
        requirement = pip_requirement(err.name)
        return EngineUnavailable(
            PREFIX + where + f"missing Python package {err.name.split('.')[0]!r} (pip install '{requirement}')"
        )
    if isinstance(err, OSError) and "torchaudio" in str(err):
        # A torchaudio built for another torch: its native libraries fail to load.
        return EngineUnavailable(
            PREFIX + where + f"torchaudio {_version('torchaudio')} cannot load its native libraries with torch "
            f"{_version('torch')}; install a matching pair: pip install 'torch==2.11.*' 'torchaudio==2.11.*'"
        )
    if isinstance(err, ImportError) and err.name:
        top = err.name.split(".")[0]
        requirement = pip_requirement(top)
        return EngineUnavailable(
            PREFIX + where + f"{err} ({top} {_version(requirement)} does not fit: pip install '{requirement}')"
        )
    return EngineUnavailable(PREFIX + where + f"{type(err).__name__}: {err}")


def import_cosyvoice(repo: Path) -> types.ModuleType:
    """`cosyvoice.cli.cosyvoice` from `repo`, imported once, with upstream's logging/tqdm/load_wav quirks fixed."""
    repo = Path(repo).resolve()
    loaded = sys.modules.get("cosyvoice")
    if loaded is not None:
        origin = Path(getattr(loaded, "__file__", None) or next(iter(getattr(loaded, "__path__", [""])), "")).resolve()
        if repo not in origin.parents:
            raise EngineUnavailable(PREFIX + f"a different cosyvoice package is already imported from {origin.parent}")
    for path in (repo / "third_party" / "Matcha-TTS", repo):
        if str(path) in sys.path:
            sys.path.remove(str(path))
        sys.path.insert(0, str(path))
    _ensure_modelscope()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        module = importlib.import_module("cosyvoice.cli.cosyvoice")
        file_utils = importlib.import_module("cosyvoice.utils.file_utils")
        frontend = importlib.import_module("cosyvoice.cli.frontend")
    except Exception as err:  # a missing package, a mismatched build, or a broken checkout (anything at import)
        raise _import_failure(repo, err) from None
    finally:
        # cosyvoice.utils.file_utils calls logging.basicConfig(level=DEBUG) at import: undo it.
        root.setLevel(level)
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
    if _ROOT_FILTER not in root.filters:
        root.addFilter(_ROOT_FILTER)
    # torch.cuda.amp.autocast deprecation, once per call site per process: noise for a server's users.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"cosyvoice\.")
    module.tqdm = _no_progress_bar  # type: ignore[attr-defined]
    file_utils.load_wav = soundfile_load_wav  # type: ignore[attr-defined]
    frontend.load_wav = soundfile_load_wav  # type: ignore[attr-defined]  # imported by name there
    return module


# --- TensorRT plans -------------------------------------------------------------------------------


def tensorrt_version() -> Optional[str]:
    """The installed TensorRT version, or None when TensorRT cannot be imported."""
    try:
        import tensorrt
    except Exception:  # ImportError, or a broken install raising OSError on its libraries
        return None
    return str(getattr(tensorrt, "__version__", "unknown"))


def upstream_plan_path(model_dir: Path, fp16: bool) -> Path:
    """Where upstream looks for (and builds) the flow decoder plan: one name for every GPU and TensorRT."""
    return Path(model_dir) / f"flow.decoder.estimator.{'fp16' if fp16 else 'fp32'}.mygpu.plan"


def keyed_plan_path(
    cache_dir: Path, identity: str, fp16: bool, gpu_name: str, capability: tuple[int, int], trt_version: str
) -> Path:
    """Our cache name for a plan: valid only for this model, precision, GPU model, compute capability and TensorRT."""
    gpu = "".join(c if c.isalnum() else "-" for c in gpu_name).strip("-").lower() or "gpu"
    trt = "".join(c if c.isalnum() or c == "." else "-" for c in trt_version)
    precision = "fp16" if fp16 else "fp32"
    name = f"flow.decoder.estimator.{precision}.{identity}.{gpu}.sm{capability[0]}{capability[1]}.trt{trt}.plan"
    return Path(cache_dir) / "trt" / name


def link_plan(upstream: Path, keyed: Path) -> bool:
    """Before loading: point upstream's plan name at our keyed plan (True), or clear it so upstream builds one."""
    if upstream.is_symlink():
        upstream.unlink()
    elif upstream.exists():
        # A plan we did not key: it may come from another GPU or TensorRT version and would fail to deserialize.
        stale = upstream.with_name(upstream.name + ".stale")
        os.replace(upstream, stale)
        _LOGGER.warning("Moved unkeyed TensorRT plan %s aside to %s; a keyed one will be built", upstream, stale)
    if not keyed.is_file() or keyed.stat().st_size == 0:
        return False
    try:
        upstream.symlink_to(keyed)
    except OSError:
        import shutil

        shutil.copyfile(keyed, upstream)
    return True


def adopt_plan(upstream: Path, keyed: Path) -> None:
    """After loading: move a plan upstream just built into our keyed cache and link it back."""
    if upstream.is_symlink() or not upstream.is_file() or upstream.stat().st_size == 0:
        return
    import shutil

    keyed.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(upstream), str(keyed))  # the cache may be on another file system than the model
    try:
        upstream.symlink_to(keyed)
    except OSError:
        shutil.copyfile(keyed, upstream)
    _LOGGER.info("TensorRT plan cached as %s", keyed)
