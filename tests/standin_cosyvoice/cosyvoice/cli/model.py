"""Stand-in of cosyvoice/cli/model.py: the same per-call dictionaries, LLM thread and streaming loops as upstream;
the networks are replaced by a token counter (LLM) and a sine generator (flow + vocoder)."""
import threading
import time
import uuid
from contextlib import nullcontext

import numpy as np
import torch

import matcha  # noqa: F401  (upstream's flow imports Matcha-TTS from third_party/Matcha-TTS)


class StandinLLM(torch.nn.Module):
    """Emits 2 speech tokens per text token (upstream's minimum length), `token_s` seconds apart."""

    def __init__(self, token_s=0.002, version=2):
        super().__init__()
        self.token_s = token_s
        self.version = version

    def inference(self, text, text_len, prompt_text, prompt_text_len, prompt_speech_token, prompt_speech_token_len,
                  embedding, sampling=25, max_token_text_ratio=20, min_token_text_ratio=2, uuid=''):
        full = torch.concat([prompt_text, text], dim=1)
        if self.version == 3:
            assert 151646 in full, '<|endofprompt|> not detected in CosyVoice3 text or prompt_text, check your input!'
        for i in range(int(text_len) * 2):
            time.sleep(self.token_s)
            yield int(full[0, i % full.shape[1]]) % 6561


class StandinFlow(torch.nn.Module):
    def __init__(self, input_frame_rate=25, pre_lookahead_len=3, token_mel_ratio=2):
        super().__init__()
        self.input_frame_rate = input_frame_rate
        self.pre_lookahead_len = pre_lookahead_len
        self.token_mel_ratio = token_mel_ratio
        self.nonfinite = False
        self.flow_s = 0.0  # seconds per token the flow runs over (prompt + tokens so far), like the real flow's cost


class StandinHift(torch.nn.Module):
    pass


def _sine(embedding, first_sample, count, sample_rate, nonfinite):
    if count <= 0:
        raise RuntimeError('cannot reshape tensor of 0 elements into shape [1, 0, -1, 80] because the unspecified '
                           'dimension size -1 can be ambiguous')
    pitch = float(embedding.flatten()[0]) or 150.0
    t = (first_sample + torch.arange(count, dtype=torch.float64)) / sample_rate
    speech = (0.5 * torch.sin(2 * np.pi * pitch * t)).float().unsqueeze(0)
    if nonfinite:
        speech[:] = float('nan')
    return speech


class CosyVoiceModel:

    def __init__(self,
                 llm: torch.nn.Module,
                 flow: torch.nn.Module,
                 hift: torch.nn.Module,
                 fp16: bool = False):
        self.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        self.llm = llm
        self.flow = flow
        self.hift = hift
        self.fp16 = fp16
        self.token_min_hop_len = 2 * self.flow.input_frame_rate
        self.token_max_hop_len = 4 * self.flow.input_frame_rate
        self.token_overlap_len = 20
        self.stream_scale_factor = 1
        self.sample_rate = 22050
        self.samples_per_token = 22050 // self.flow.input_frame_rate
        self.poll_s = 0.1
        self.llm_context = nullcontext()
        self.lock = threading.Lock()
        self.tts_speech_token_dict = {}
        self.llm_end_dict = {}
        self.mel_overlap_dict = {}
        self.flow_cache_dict = {}
        self.hift_cache_dict = {}
        self.silent_tokens = []

    def load(self, llm_model, flow_model, hift_model):
        for path in (llm_model, flow_model, hift_model):
            torch.load(path, map_location=self.device, weights_only=True)

    def llm_job(self, text, prompt_text, llm_prompt_speech_token, llm_embedding, uuid):
        with self.llm_context:
            token_generator = self.llm.inference(text=text.to(self.device),
                                                 text_len=torch.tensor([text.shape[1]], dtype=torch.int32).to(self.device),
                                                 prompt_text=prompt_text.to(self.device),
                                                 prompt_text_len=torch.tensor([prompt_text.shape[1]], dtype=torch.int32).to(self.device),
                                                 prompt_speech_token=llm_prompt_speech_token.to(self.device),
                                                 prompt_speech_token_len=torch.tensor([llm_prompt_speech_token.shape[1]], dtype=torch.int32).to(self.device),
                                                 embedding=llm_embedding.to(self.device),
                                                 uuid=uuid)
            for i in token_generator:
                self.tts_speech_token_dict[uuid].append(i)
        self.llm_end_dict[uuid] = True

    def token2wav(self, token, prompt_token, prompt_feat, embedding, uuid, finalize=False, speed=1.0):
        produced = self.hift_cache_dict[uuid] or 0
        count = token.shape[1] if finalize else token.shape[1] - self.token_overlap_len
        samples = count * self.samples_per_token
        if speed != 1.0:
            assert self.hift_cache_dict[uuid] is None, 'speed change only support non-stream inference mode'
            samples = int(samples / speed)
        self.hift_cache_dict[uuid] = produced + samples
        return _sine(embedding, produced, samples, self.sample_rate, self.flow.nonfinite)

    def tts(self, text=torch.zeros(1, 0, dtype=torch.int32), flow_embedding=torch.zeros(0, 192), llm_embedding=torch.zeros(0, 192),
            prompt_text=torch.zeros(1, 0, dtype=torch.int32),
            llm_prompt_speech_token=torch.zeros(1, 0, dtype=torch.int32),
            flow_prompt_speech_token=torch.zeros(1, 0, dtype=torch.int32),
            prompt_speech_feat=torch.zeros(1, 0, 80), source_speech_token=torch.zeros(1, 0, dtype=torch.int32), stream=False, speed=1.0, **kwargs):
        this_uuid = str(uuid.uuid1())
        with self.lock:
            self.tts_speech_token_dict[this_uuid], self.llm_end_dict[this_uuid] = [], False
            self.hift_cache_dict[this_uuid] = None
            self.mel_overlap_dict[this_uuid] = torch.zeros(1, 80, 0)
            self.flow_cache_dict[this_uuid] = torch.zeros(1, 80, 0, 2)
        p = threading.Thread(target=self.llm_job, args=(text, prompt_text, llm_prompt_speech_token, llm_embedding, this_uuid))
        p.start()
        if stream is True:
            token_hop_len = self.token_min_hop_len
            while True:
                time.sleep(self.poll_s)
                if len(self.tts_speech_token_dict[this_uuid]) >= token_hop_len + self.token_overlap_len:
                    this_tts_speech_token = torch.tensor(self.tts_speech_token_dict[this_uuid][:token_hop_len + self.token_overlap_len]).unsqueeze(dim=0)
                    this_tts_speech = self.token2wav(token=this_tts_speech_token, prompt_token=flow_prompt_speech_token,
                                                     prompt_feat=prompt_speech_feat, embedding=flow_embedding,
                                                     uuid=this_uuid, finalize=False)
                    yield {'tts_speech': this_tts_speech.cpu()}
                    with self.lock:
                        self.tts_speech_token_dict[this_uuid] = self.tts_speech_token_dict[this_uuid][token_hop_len:]
                    token_hop_len = min(self.token_max_hop_len, int(token_hop_len * self.stream_scale_factor))
                if self.llm_end_dict[this_uuid] is True and len(self.tts_speech_token_dict[this_uuid]) < token_hop_len + self.token_overlap_len:
                    break
            p.join()
            this_tts_speech_token = torch.tensor(self.tts_speech_token_dict[this_uuid]).unsqueeze(dim=0)
            this_tts_speech = self.token2wav(token=this_tts_speech_token, prompt_token=flow_prompt_speech_token,
                                             prompt_feat=prompt_speech_feat, embedding=flow_embedding,
                                             uuid=this_uuid, finalize=True)
            yield {'tts_speech': this_tts_speech.cpu()}
        else:
            p.join()
            this_tts_speech_token = torch.tensor(self.tts_speech_token_dict[this_uuid]).unsqueeze(dim=0)
            this_tts_speech = self.token2wav(token=this_tts_speech_token, prompt_token=flow_prompt_speech_token,
                                             prompt_feat=prompt_speech_feat, embedding=flow_embedding,
                                             uuid=this_uuid, finalize=True, speed=speed)
            yield {'tts_speech': this_tts_speech.cpu()}
        with self.lock:
            self.tts_speech_token_dict.pop(this_uuid)
            self.llm_end_dict.pop(this_uuid)
            self.mel_overlap_dict.pop(this_uuid)
            self.hift_cache_dict.pop(this_uuid)
            self.flow_cache_dict.pop(this_uuid)


class CosyVoice2Model(CosyVoiceModel):

    def __init__(self,
                 llm: torch.nn.Module,
                 flow: torch.nn.Module,
                 hift: torch.nn.Module,
                 fp16: bool = False):
        self.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        self.llm = llm
        self.flow = flow
        self.hift = hift
        self.fp16 = fp16
        # NOTE must matching training static_chunk_size
        self.token_hop_len = 25
        # NOTE increase token_hop_len incrementally to avoid duplicate inference
        self.token_max_hop_len = 4 * self.token_hop_len
        self.stream_scale_factor = 2
        self.sample_rate = 24000
        self.samples_per_token = 24000 // self.flow.input_frame_rate
        self.poll_s = 0.1
        self.llm_context = nullcontext()
        self.lock = threading.Lock()
        self.tts_speech_token_dict = {}
        self.llm_end_dict = {}
        self.hift_cache_dict = {}
        self.silent_tokens = []

    def token2wav(self, token, prompt_token, prompt_feat, embedding, token_offset, uuid, stream=False, finalize=False, speed=1.0):
        time.sleep(self.flow.flow_s * (prompt_token.shape[1] + token.shape[1]))
        end = token.shape[1] if finalize else token.shape[1] - self.flow.pre_lookahead_len
        samples = (end - token_offset) * self.samples_per_token
        if speed != 1.0:
            assert token_offset == 0 and finalize is True, 'speed change only support non-stream inference mode'
            samples = int(samples / speed)
        return _sine(embedding, token_offset * self.samples_per_token, samples, self.sample_rate, self.flow.nonfinite)

    def tts(self, text=torch.zeros(1, 0, dtype=torch.int32), flow_embedding=torch.zeros(0, 192), llm_embedding=torch.zeros(0, 192),
            prompt_text=torch.zeros(1, 0, dtype=torch.int32),
            llm_prompt_speech_token=torch.zeros(1, 0, dtype=torch.int32),
            flow_prompt_speech_token=torch.zeros(1, 0, dtype=torch.int32),
            prompt_speech_feat=torch.zeros(1, 0, 80), source_speech_token=torch.zeros(1, 0, dtype=torch.int32), stream=False, speed=1.0, **kwargs):
        this_uuid = str(uuid.uuid1())
        with self.lock:
            self.tts_speech_token_dict[this_uuid], self.llm_end_dict[this_uuid] = [], False
            self.hift_cache_dict[this_uuid] = None
        p = threading.Thread(target=self.llm_job, args=(text, prompt_text, llm_prompt_speech_token, llm_embedding, this_uuid))
        p.start()
        if stream is True:
            token_offset = 0
            prompt_token_pad = int(np.ceil(flow_prompt_speech_token.shape[1] / self.token_hop_len) * self.token_hop_len - flow_prompt_speech_token.shape[1])
            while True:
                time.sleep(self.poll_s)
                this_token_hop_len = self.token_hop_len + prompt_token_pad if token_offset == 0 else self.token_hop_len
                if len(self.tts_speech_token_dict[this_uuid]) - token_offset >= this_token_hop_len + self.flow.pre_lookahead_len:
                    this_tts_speech_token = torch.tensor(self.tts_speech_token_dict[this_uuid][:token_offset + this_token_hop_len + self.flow.pre_lookahead_len]).unsqueeze(dim=0)
                    this_tts_speech = self.token2wav(token=this_tts_speech_token, prompt_token=flow_prompt_speech_token,
                                                     prompt_feat=prompt_speech_feat, embedding=flow_embedding,
                                                     token_offset=token_offset, uuid=this_uuid, stream=stream, finalize=False)
                    token_offset += this_token_hop_len
                    self.token_hop_len = min(self.token_max_hop_len, self.token_hop_len * self.stream_scale_factor)
                    yield {'tts_speech': this_tts_speech.cpu()}
                if self.llm_end_dict[this_uuid] is True and len(self.tts_speech_token_dict[this_uuid]) - token_offset < this_token_hop_len + self.flow.pre_lookahead_len:
                    break
            p.join()
            this_tts_speech_token = torch.tensor(self.tts_speech_token_dict[this_uuid]).unsqueeze(dim=0)
            this_tts_speech = self.token2wav(token=this_tts_speech_token, prompt_token=flow_prompt_speech_token,
                                             prompt_feat=prompt_speech_feat, embedding=flow_embedding,
                                             token_offset=token_offset, uuid=this_uuid, finalize=True)
            yield {'tts_speech': this_tts_speech.cpu()}
        else:
            p.join()
            this_tts_speech_token = torch.tensor(self.tts_speech_token_dict[this_uuid]).unsqueeze(dim=0)
            this_tts_speech = self.token2wav(token=this_tts_speech_token, prompt_token=flow_prompt_speech_token,
                                             prompt_feat=prompt_speech_feat, embedding=flow_embedding,
                                             token_offset=0, uuid=this_uuid, finalize=True, speed=speed)
            yield {'tts_speech': this_tts_speech.cpu()}
        with self.lock:
            self.tts_speech_token_dict.pop(this_uuid)
            self.llm_end_dict.pop(this_uuid)
            self.hift_cache_dict.pop(this_uuid)


class CosyVoice3Model(CosyVoice2Model):

    def __init__(self,
                 llm: torch.nn.Module,
                 flow: torch.nn.Module,
                 hift: torch.nn.Module,
                 fp16: bool = False):
        super().__init__(llm, flow, hift, fp16)
        self.silent_tokens = [1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323]
