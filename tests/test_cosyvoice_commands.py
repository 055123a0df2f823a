"""`wyoming-cosyvoice download` and `wyoming-cosyvoice health`, run as a user runs them (subprocesses)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from wyoming_cosyvoice import gpu
from wyoming_cosyvoice.gpu import gpu_facts

from .cosyvoice_support import STANDIN_REPO, make_model_dir
from .helpers import write_config

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, prelude: str = "", cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter; `prelude` runs first (to hide or provide hub clients)."""
    code = prelude + "\nimport sys\nfrom wyoming_cosyvoice.__main__ import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


NO_HUBS = "import sys\nsys.modules['modelscope'] = None\nsys.modules['huggingface_hub'] = None\n"


def test_download_without_hub_client_explains_what_to_do(tmp_path: Path) -> None:
    result = cli("download", "CosyVoice2-0.5B", "--dir", str(tmp_path / "m"), prelude=NO_HUBS)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        "error: cannot download CosyVoice2-0.5B: neither modelscope nor huggingface_hub is installed"
    )
    assert f"git lfs install && git clone https://huggingface.co/FunAudioLLM/CosyVoice2-0.5B {tmp_path / 'm'}" in line
    assert "https://www.modelscope.cn/iic/CosyVoice2-0.5B.git" in line
    assert not (tmp_path / "m").exists()


def test_download_unknown_model() -> None:
    result = cli("download", "CosyVoice9", prelude=NO_HUBS)
    assert result.returncode == 2
    assert "error: unknown model 'CosyVoice9' (known: Fun-CosyVoice3-0.5B, CosyVoice2-0.5B" in result.stderr


def _fake_hub(tmp_path: Path, body: str) -> str:
    """A huggingface_hub stand-in module (the real hub is not reachable from tests)."""
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "huggingface_hub.py").write_text(textwrap.dedent(body))
    return f"import sys\nsys.modules['modelscope'] = None\nsys.path.insert(0, {str(hub)!r})\n"


def test_download_network_failure_gives_the_manual_way(tmp_path: Path) -> None:
    prelude = _fake_hub(
        tmp_path,
        """
        def snapshot_download(repo_id, local_dir=None, **kwargs):
            raise OSError("Failed to resolve 'huggingface.co'")
    """,
    )
    result = cli("download", "Fun-CosyVoice3-0.5B", "--dir", str(tmp_path / "m"), prelude=prelude)
    assert result.returncode == 2
    assert (
        "downloading Fun-CosyVoice3-0.5B from huggingface_hub failed (Failed to resolve 'huggingface.co')"
        in result.stderr
    )
    assert "git clone https://huggingface.co/FunAudioLLM/Fun-CosyVoice3-0.5B-2512" in result.stderr


def test_download_with_real_hub_client_and_no_network_says_the_hub_is_unreachable(tmp_path: Path) -> None:
    """huggingface_hub installed, its endpoint unreachable: the message names the network, not a missing client."""
    pytest.importorskip("huggingface_hub")
    with socket.socket() as probe:  # a port nothing listens on: connection refused, as with no network
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    prelude = f"import os\nos.environ['HF_ENDPOINT'] = {endpoint!r}\n"
    result = cli(
        "download", "CosyVoice2-0.5B", "--dir", str(tmp_path / "m"), "--source", "huggingface", prelude=prelude
    )
    assert result.returncode == 2
    (line,) = [text for text in result.stderr.strip().splitlines() if text.startswith("error:")]
    assert line.startswith(f"error: cannot download CosyVoice2-0.5B: {endpoint} is unreachable from this machine (")
    assert "Connection refused" in line and "check the network" in line
    assert "install a hub client" not in line
    assert f"git clone https://huggingface.co/FunAudioLLM/CosyVoice2-0.5B {tmp_path / 'm'}" in line


def test_download_success_checks_the_model_dir(tmp_path: Path) -> None:
    prelude = _fake_hub(
        tmp_path,
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from tests.cosyvoice_support import make_model_dir
        calls = []

        def snapshot_download(repo_id, local_dir=None, **kwargs):
            assert repo_id == "FunAudioLLM/CosyVoice2-0.5B", repo_id
            make_model_dir(Path(local_dir), 2)
            return local_dir
    """,
    )
    result = cli("download", "CosyVoice2-0.5B", "--dir", str(tmp_path / "m"), prelude=prelude)
    assert result.returncode == 0, result.stderr
    assert f"CosyVoice2 model ready in {tmp_path / 'm'}" in result.stdout
    assert f"model_dir: {tmp_path / 'm'}" in result.stdout


def test_download_goes_to_the_data_folder_and_health_accepts_it(tmp_path: Path) -> None:
    """No --dir: the model lands in the data folder's models/, whose server.yaml (the shipped default, model_dir
    null) gets that exact path; `health` on the same data folder then finds the model, from another working folder."""
    prelude = _fake_hub(
        tmp_path,
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from tests.cosyvoice_support import make_model_dir

        def snapshot_download(repo_id, local_dir=None, **kwargs):
            make_model_dir(Path(local_dir), 2)
            return local_dir
    """,
    )
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = cli("download", "CosyVoice2-0.5B", "--data-dir", str(data), prelude=prelude, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    model = data / "models" / "CosyVoice2-0.5B"
    assert f"CosyVoice2 model ready in {model}" in result.stdout
    assert f"Set engines.cosyvoice.model_dir: {model} in {data / 'server.yaml'}" in result.stdout
    assert f"    model_dir: {model}\n" in (data / "server.yaml").read_text()
    assert not list(elsewhere.iterdir())  # nothing written to the working folder (the old pretrained_models/)
    # health reads the same data folder: the model is found (the checkout is another matter: none is set here).
    text = (data / "server.yaml").read_text().replace("    repo: null\n", f"    repo: {STANDIN_REPO}\n", 1)
    (data / "server.yaml").write_text(text)
    result = cli("health", "--data-dir", str(data), cwd=tmp_path)
    assert f"cosyvoice model: CosyVoice2 in {model}" in result.stdout, result.stdout
    assert "not found" not in result.stdout
    # A second download keeps the path the user now has (never rewritten, printed instead).
    result = cli("download", "CosyVoice2-0.5B", "--data-dir", str(data), prelude=prelude, cwd=elsewhere)
    assert result.returncode == 0 and f"Set in {data / 'server.yaml'}:" in result.stdout


def test_health_reports_gpu_and_checks(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "cfg",
        engine={"name": "cosyvoice", "fallback": "espeak"},
        engines={"cosyvoice": {"repo": str(STANDIN_REPO), "model_dir": str(tmp_path / "nope")}},
    )
    result = cli("health", "--config", str(path))
    assert result.returncode == 1
    assert "gpu: " in result.stdout and "engine: cosyvoice (fallback: espeak)" in result.stdout
    if gpu_facts().driver_version == "" and gpu.driver_version() is None:  # no NVIDIA driver on this machine
        assert "cuda_fit: no NVIDIA driver found" in result.stdout
    else:
        assert "cuda_fit: NVIDIA driver " in result.stdout
    assert f"cosyvoice checkout: {STANDIN_REPO}" in result.stdout
    assert f"cosyvoice problem: cosyvoice engine: model directory {tmp_path / 'nope'} not found" in result.stdout
    make_model_dir(tmp_path / "nope", 3)
    result = cli("health", "--config", str(path))
    assert "cosyvoice model: CosyVoice3 in" in result.stdout
    try:
        __import__("torch")
    except ImportError:
        assert "torch: not installed" in result.stdout
        return
    if "CUDA not available" in result.stdout:
        assert "no CUDA GPU visible to torch" in result.stdout and result.returncode == 1
