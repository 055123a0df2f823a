"""A Triton Python-backend model with upstream's CosyVoice contract that makes deterministic audio (test double
for the GPU pipeline: Triton, gRPC and the decoupled streaming are real; only the synthesis is a tone).

Served under the name `cosyvoice2` with a config.pbtxt like upstream's (decoupled, max_batch_size 16). Per request:
`SAMPLES_PER_CHAR` samples of a 24 kHz sine per character of `target_text`, at the dominant frequency of
`reference_wav` (measured at 16 kHz, so a wrongly resampled reference shows as a wrong pitch; 150 Hz without one),
sent in pieces of `chunk_samples`, then a flags-only final response. Words `key:token` in the text steer it:
  id:T    record what arrived (shapes, dtypes, texts, pitch, server) in <control_dir>/T.json
  hold:T  wait for the file <control_dir>/open-T before the FIRST response
  gate:T  wait for the file <control_dir>/open-T before the SECOND response
  fail:T  answer with an error instead of audio
A request cancelled by the client (is_cancelled) stops and writes <control_dir>/cancelled-T, one that sent all its
audio writes <control_dir>/done-T (T: its id, hold or gate token). Requests run on their own threads, so one instance
serves many at once (decoupled models may do this).
"""

import json
import os
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

SAMPLES_PER_CHAR = 1200
RATE = 24000
REFERENCE_RATE = 16000
WAIT_LIMIT_S = 60.0


def _text(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None, None
    array = tensor.as_numpy()
    return array.reshape(-1)[0].decode("utf-8"), list(array.shape)


def _dominant(samples, rate):
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.control = params.get("control_dir", "")
        self.server = params.get("server_name", "")
        self.chunk = int(params.get("chunk_samples", "4800"))
        self.threads = []

    def execute(self, requests):
        for request in requests:
            thread = threading.Thread(target=self._serve, args=(request,), daemon=True)
            thread.start()
            self.threads.append(thread)
        self.threads = [t for t in self.threads if t.is_alive()]
        return None

    def _path(self, name):
        return os.path.join(self.control, name)

    def _write(self, name, text):
        if self.control:
            tmp = self._path(f".{name}.tmp")
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, self._path(name))

    def _wait_open(self, request, token):
        deadline = time.monotonic() + WAIT_LIMIT_S
        while not os.path.exists(self._path(f"open-{token}")):
            if request.is_cancelled():
                return "cancelled"
            if time.monotonic() > deadline:
                return "timeout"
            time.sleep(0.005)
        return "open"

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            self._respond(request, sender)
        except Exception as err:  # reported to the client as the request's error
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(err).__name__}: {err}")))
        if request.is_cancelled():
            # Triton 2.51's gRPC frontend can crash when a response completes while it is still processing the
            # cancellation (fixed in 2.53); finish a little later so the tests do not hit that race.
            time.sleep(0.2)
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _respond(self, request, sender):
        target, target_shape = _text(request, "target_text")
        reference_text, reference_text_shape = _text(request, "reference_text")
        keys = dict(word.split(":", 1) for word in target.split() if ":" in word)
        token = keys.get("id") or keys.get("hold") or keys.get("gate") or ""
        wav_tensor = pb_utils.get_input_tensor_by_name(request, "reference_wav")
        pitch, wav_shape, wav_dtype, wav_len = 150.0, None, None, None
        if wav_tensor is not None:
            wav = wav_tensor.as_numpy()
            wav_shape, wav_dtype = list(wav.shape), str(wav.dtype)
            length = pb_utils.get_input_tensor_by_name(request, "reference_wav_len").as_numpy()
            wav_len = {"value": int(length.reshape(-1)[0]), "shape": list(length.shape), "dtype": str(length.dtype)}
            pitch = _dominant(wav.reshape(-1)[: wav_len["value"]], REFERENCE_RATE)
        if "id" in keys:
            record = {
                "server": self.server,
                "request_id": request.request_id(),
                "target_text": target,
                "target_text_shape": target_shape,
                "reference_text": reference_text,
                "reference_text_shape": reference_text_shape,
                "reference_wav_shape": wav_shape,
                "reference_wav_dtype": wav_dtype,
                "reference_wav_len": wav_len,
                "pitch": pitch,
            }
            self._write(f"{keys['id']}.json", json.dumps(record))
        if "fail" in keys:
            raise RuntimeError(f"asked to fail ({keys['fail']})")
        total = SAMPLES_PER_CHAR * len(target)
        phase = 2 * np.pi * pitch / RATE
        sent = 0
        index = 0
        while sent < total:
            wait = keys.get("hold") if index == 0 else keys.get("gate") if index == 1 else None
            if wait is not None:
                outcome = self._wait_open(request, wait)
                if outcome == "timeout":
                    raise RuntimeError(f"gate {wait} never opened")
                if outcome == "cancelled":
                    self._write(f"cancelled-{token}", f"{self.server} before response {index}")
                    return
            if request.is_cancelled():
                self._write(f"cancelled-{token}", f"{self.server} before response {index}")
                return
            count = min(self.chunk, total - sent)
            wave = (0.5 * np.sin(phase * np.arange(sent, sent + count))).astype(np.float32)
            output = pb_utils.Tensor("waveform", wave.reshape(1, -1))
            sender.send(pb_utils.InferenceResponse(output_tensors=[output]))
            sent += count
            index += 1
        if token:
            self._write(f"done-{token}", self.server)

    def finalize(self):
        for thread in self.threads:
            thread.join(timeout=5)
