"""A Triton Python-backend model that runs the REAL upstream CosyVoice2 code (a tiny random-weight model built by
tests/tiny_cosyvoice2.py) behind upstream's Triton contract, streaming each chunk as a response.

Upstream's own `model_repo/cosyvoice2` needs TensorRT-LLM and a GPU. This one drives this project's CosyVoice
engine (its public Engine interface: start, prepare, warmup, synthesize) on the CPU, so real model audio crosses
the real Triton wire, and the latency benchmark (benchmarks/triton_hop.py) compares the very same code with and
without the Triton hop. Parameters: `repo` (CosyVoice checkout), `model_dir`, `cache_dir`, `warmup` (true).
The reference of each request is stored once per content, so a voice is prepared on its first request only
(as the local engine prepares it once at startup).
"""

import asyncio
import hashlib
import json
import os
import queue
import threading
from pathlib import Path

import numpy as np
import soundfile
import triton_python_backend_utils as pb_utils

from wyoming_cosyvoice.config import Section
from wyoming_cosyvoice.engine import SynthesisOptions
from wyoming_cosyvoice.voices import VoiceProfile
from wyoming_cosyvoice_plugins.cosyvoice import create_engine


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.cache = Path(params["cache_dir"])
        self.cache.mkdir(parents=True, exist_ok=True)
        settings = {"repo": params["repo"], "model_dir": params["model_dir"], "cache_dir": str(self.cache)}
        settings["require_gpu"] = False
        self.engine = create_engine(Section("cosyvoice", settings, "model.py", "engines.cosyvoice", self.cache))
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="engine loop", daemon=True).start()
        self._call(self.engine.start())
        if params.get("warmup", "true") == "true":  # as a local server warms up before serving (the benchmark)
            self._call(self.engine.warmup())

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._serve, args=(request,), daemon=True).start()
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            self._respond(request, sender)
        except Exception as err:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(err).__name__}: {err}")))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _profile(self, request):
        wav = pb_utils.get_input_tensor_by_name(request, "reference_wav").as_numpy()
        length = int(pb_utils.get_input_tensor_by_name(request, "reference_wav_len").as_numpy().reshape(-1)[0])
        samples = np.ascontiguousarray(wav.reshape(-1)[:length], dtype=np.float32)
        text = pb_utils.get_input_tensor_by_name(request, "reference_text")
        transcript = text.as_numpy().reshape(-1)[0].decode("utf-8") if text is not None else ""
        digest = hashlib.sha256(samples.tobytes() + transcript.encode()).hexdigest()[:16]
        path = self.cache / f"reference-{digest}.wav"
        if not path.is_file():
            soundfile.write(str(path) + ".tmp.wav", samples, 16000, subtype="FLOAT")
            os.replace(str(path) + ".tmp.wav", path)
        mode = "zero_shot" if transcript else "cross_lingual"
        return VoiceProfile(name=f"v{digest}", reference_audio=path, transcript=transcript or None, mode=mode)

    def _respond(self, request, sender):
        target = pb_utils.get_input_tensor_by_name(request, "target_text").as_numpy().reshape(-1)[0].decode("utf-8")
        profile = self._profile(request)
        self._call(self.engine.prepare([profile]))  # cached after the first request of a voice
        chunks = queue.Queue()

        async def produce():
            stream = self.engine.synthesize(target, profile, SynthesisOptions(request_id=request.request_id()))
            try:
                async for chunk in stream:
                    chunks.put(chunk.audio)
                    if request.is_cancelled():
                        break
            finally:
                await stream.aclose()
                chunks.put(None)

        future = asyncio.run_coroutine_threadsafe(produce(), self.loop)
        while True:
            pcm = chunks.get()
            if pcm is None:
                break
            if request.is_cancelled():
                continue  # the producer stops at its next chunk
            speech = (np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0).reshape(1, -1)
            sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("waveform", speech)]))
        future.result()

    def finalize(self):
        self._call(self.engine.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
