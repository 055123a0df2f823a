"""A Triton Python-backend model that runs the REAL upstream CosyVoice2 code (a tiny random-weight model built by
tests/tiny_cosyvoice2.py) behind upstream's Triton contract, streaming each chunk CosyVoice yields as a response.

Upstream's own `model_repo/cosyvoice2` needs TensorRT-LLM and a GPU; this one calls `CosyVoice2` directly on the
CPU, so real model audio crosses the real Triton wire. Parameters: `repo` (CosyVoice checkout), `model_dir`,
`control_dir` (gets `cancelled-<request id>` when a request is cancelled between chunks).
"""

import json
import os
import tempfile
import threading

import numpy as np
import soundfile
import triton_python_backend_utils as pb_utils

from wyoming_cosyvoice_plugins.cosyvoice.upstream import import_cosyvoice


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        module = import_cosyvoice(params["repo"])
        self.model = module.CosyVoice2(params["model_dir"], load_jit=False, load_trt=False, load_vllm=False, fp16=False)
        self.control = params.get("control_dir", "")
        self.lock = threading.Lock()  # one synthesis at a time: the model is not thread-safe
        self.threads = []

    def execute(self, requests):
        for request in requests:
            thread = threading.Thread(target=self._serve, args=(request,), daemon=True)
            thread.start()
            self.threads.append(thread)
        self.threads = [t for t in self.threads if t.is_alive()]
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            with self.lock:
                self._respond(request, sender)
        except Exception as err:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(err).__name__}: {err}")))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _respond(self, request, sender):
        target = pb_utils.get_input_tensor_by_name(request, "target_text").as_numpy().reshape(-1)[0].decode("utf-8")
        wav = pb_utils.get_input_tensor_by_name(request, "reference_wav").as_numpy()
        length = int(pb_utils.get_input_tensor_by_name(request, "reference_wav_len").as_numpy().reshape(-1)[0])
        reference_text = pb_utils.get_input_tensor_by_name(request, "reference_text")
        prompt_text = reference_text.as_numpy().reshape(-1)[0].decode("utf-8") if reference_text is not None else ""
        with tempfile.NamedTemporaryFile(suffix=".wav") as prompt:
            soundfile.write(prompt.name, wav.reshape(-1)[:length], 16000, subtype="FLOAT")
            if prompt_text:
                outputs = self.model.inference_zero_shot(target, prompt_text, prompt.name, stream=True)
            else:
                outputs = self.model.inference_cross_lingual(target, prompt.name, stream=True)
            try:
                for output in outputs:
                    if request.is_cancelled():
                        if self.control:
                            open(os.path.join(self.control, f"cancelled-{request.request_id()}"), "w").close()
                        return
                    speech = output["tts_speech"].detach().float().cpu().numpy().astype(np.float32).reshape(1, -1)
                    sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("waveform", speech)]))
            finally:
                outputs.close()

    def finalize(self):
        for thread in self.threads:
            thread.join(timeout=30)
