"""A real Triton Inference Server on the CPU for tests: the `tritonserver` and Python backend bundled in PyPI's
`nvidia-pytriton` wheel, serving Python-backend models with upstream's CosyVoice contract."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Optional

MODELS = Path(__file__).resolve().parent / "triton_models"

CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 16
dynamic_batching {{
    max_queue_delay_microseconds: 0
}}
model_transaction_policy {{
  decoupled: {decoupled}
}}
parameters [
{parameters}
]
input [
  {{ name: "reference_wav" data_type: TYPE_FP32 dims: [-1] optional: true }},
  {{ name: "reference_wav_len" data_type: TYPE_INT32 dims: [1] optional: true }},
  {{ name: "reference_text" data_type: TYPE_STRING dims: [1] optional: true }},
  {{ name: "target_text" data_type: TYPE_STRING dims: [1] }}
]
output [
  {{ name: "waveform" data_type: TYPE_FP32 dims: [-1] }}
]
instance_group [
  {{ count: 1 kind: KIND_CPU }}
]
"""
"""Upstream's model_repo/cosyvoice2/config.pbtxt with its template values filled in (run.sh stage 2: max batch 16,
queue delay 0, decoupled) and our own parameters; one CPU instance (the test models serve requests on threads)."""


def _pytriton_dir() -> Optional[Path]:
    try:
        import pytriton
    except ImportError:
        return None
    return Path(pytriton.__file__).resolve().parent


def unavailable() -> Optional[str]:
    """Why a Triton server cannot run here (None: it can)."""
    root = _pytriton_dir()
    if root is None:
        return "nvidia-pytriton is not installed (script/setup --test installs it)"
    libc, version = platform.libc_ver()
    if libc == "glibc" and tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
        return f"the bundled tritonserver needs glibc >= 2.35 (this machine has {version})"
    stub = root / "tritonserver" / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"
    if not (stub / "triton_python_backend_stub").is_file():
        return f"nvidia-pytriton has no Python backend stub for Python {sys.version_info[0]}.{sys.version_info[1]}"
    try:
        import tritonclient.grpc  # noqa: F401
    except ImportError:
        return "tritonclient[grpc] is not installed (script/setup --test installs it)"
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        # nvidia-pytriton requires numpy < 2: under numpy 2 its Python backend stub misreads every BYTES input (the
        # first byte repeated: "unpack_from requires a buffer of at least 404232220 bytes") and dies.
        return (
            f"numpy {numpy.__version__}: nvidia-pytriton's Python backend needs numpy < 2 (constraints/cosyvoice.txt)"
        )
    return None


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _backends(work: Path) -> Path:
    """A backend folder with the Python backend and the stub for this interpreter (as pytriton prepares it)."""
    root = _pytriton_dir()
    assert root is not None
    target = work / "backends"
    if not (target / "python" / "triton_python_backend_stub").is_file():
        shutil.copytree(root / "tritonserver" / "backends", target, dirs_exist_ok=True)
        stub = root / "tritonserver" / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"
        shutil.copy(stub / "triton_python_backend_stub", target / "python" / "triton_python_backend_stub")
    return target


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = _pytriton_dir()
    assert root is not None
    # The stub links the interpreter's libpython: under pyenv (no system copy of that version) it must come from
    # this interpreter's LIBDIR, or the stub loads another libpython and crashes. The wheel's own libraries too.
    libs = [str(sysconfig.get_config_var("LIBDIR") or ""), str(root.parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = ":".join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    # The stub's embedded Python finds this environment (numpy, ...) through the first `python` on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


class TritonServer:
    """One tritonserver process with a model repository of our own; gRPC only, on a free port."""

    def __init__(self, work: Path, name: str) -> None:
        self.work = work
        self.name = name
        self.repo = work / f"repo-{name}"
        self.log = work / f"triton-{name}.log"
        self.port = 0
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.shm_prefix = f"wcv_test_{os.getpid()}_{name}_{id(self):x}_"

    @property
    def url(self) -> str:
        """grpc://127.0.0.1:port."""
        return f"grpc://127.0.0.1:{self.port}"

    def add_model(
        self, name: str, model_py: Path, parameters: dict[str, str], decoupled: bool = True, config: str = CONFIG
    ) -> None:
        """Put `model_py` into the repository as `name` with upstream's config and these parameters."""
        folder = self.repo / name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy(model_py, folder / "1" / "model.py")
        params = ",\n".join(
            f'  {{ key: "{key}", value: {{ string_value: "{value}" }} }}' for key, value in parameters.items()
        )
        text = config.format(name=name, decoupled="true" if decoupled else "false", parameters=params)
        (folder / "config.pbtxt").write_text(text)

    def start(
        self, timeout: float = 120.0, models: tuple[str, ...] = (), env: Optional[dict[str, str]] = None
    ) -> "TritonServer":
        """Start and wait until the server and `models` are ready (RuntimeError with the log's tail if not)."""
        root = _pytriton_dir()
        assert root is not None
        self.port = free_port()
        command = [
            str(root / "tritonserver" / "bin" / "tritonserver"),
            f"--model-repository={self.repo}",
            f"--backend-directory={_backends(self.work)}",
            f"--grpc-port={self.port}",
            "--allow-http=false",
            "--allow-metrics=false",
            "--exit-timeout-secs=3",
            # Named shared-memory regions, so the ones a killed server leaves in /dev/shm can be removed.
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            # A model that imports torch and loads CosyVoice on two busy cores needs more than the default 30 s.
            "--backend-config=python,stub-timeout-seconds=600",
        ]
        with open(self.log, "wb") as log:
            # Own session: stop() and kill() reach the Python-backend stub processes it starts, too.
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**_env(), **(env or {})}, start_new_session=True
            )
        self.wait_ready(timeout, models)
        return self

    def wait_ready(self, timeout: float, models: tuple[str, ...] = ()) -> None:
        """Poll server and model readiness until `timeout`."""
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{self.port}")
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    break
                try:
                    if client.is_server_ready(client_timeout=2) and all(
                        client.is_model_ready(m, client_timeout=2) for m in models
                    ):
                        return
                except Exception:  # not up yet
                    pass
                time.sleep(0.1)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"tritonserver {self.name} did not become ready:\n{self.log_problems()}")

    def log_problems(self) -> str:
        """The error lines of the server's log and its last lines (its startup table left out)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        lines = [line for line in text.splitlines() if not line.startswith(("|", "+"))]
        errors = [line for line in lines if line.startswith("E") or "rror" in line]
        return "\n".join(errors[-20:] + ["..."] + lines[-15:])

    def kill(self) -> None:
        """SIGKILL the server and its stubs at once (a machine that dies mid-request)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s; the whole process group (the server and its stubs)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        # Stubs left behind by a killed server exit on their own; make sure none outlives the test.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    def alive(self) -> str:
        """Empty when the server runs, else its exit status and the end of its log (for assertion messages)."""
        if self.process is not None and self.process.poll() is None:
            return ""
        code = self.process.returncode if self.process is not None else None
        return f"tritonserver {self.name} exited ({code}):\n{self.log_problems()}"
