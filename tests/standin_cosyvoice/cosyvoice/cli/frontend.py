"""Stand-in of cosyvoice/cli/frontend.py: same methods and model_input dictionaries as upstream."""
import os
import re
from typing import Callable, Generator

import numpy as np
import torch

from cosyvoice.utils.file_utils import logging, load_wav

END_OF_PROMPT_TOKEN = 151646  # what upstream's Qwen tokenizer gives <|endofprompt|>


class _Tokenizer:
    """Character tokenizer; `<|...|>` markers are one token (<|endofprompt|> is 151646 as in upstream)."""

    def encode(self, text, allowed_special='all'):
        tokens = []
        for piece in re.split(r'(<\|[a-z_]+\|>)', text):
            if piece == '<|endofprompt|>':
                tokens.append(END_OF_PROMPT_TOKEN)
            elif piece.startswith('<|') and piece.endswith('|>'):
                tokens.append(151000 + len(piece))
            else:
                tokens.extend(ord(c) % 151000 for c in piece)
        return tokens


def _is_only_punctuation(text):
    return not any(c.isalnum() for c in text)


def _split_paragraph(text):
    if text[-1] not in '.!?。！？':  # upstream's split_paragraph indexes the last character (IndexError on '')
        text += '.'
    pieces = [p.strip() for p in re.split(r'(?<=[.!?。！？])\s*', text) if p.strip()]
    merged = []
    for piece in pieces:
        if merged and len(merged[-1]) + len(piece) <= 80:
            merged[-1] = merged[-1] + ' ' + piece
        else:
            merged.append(piece)
    return merged


class CosyVoiceFrontEnd:

    def __init__(self,
                 get_tokenizer: Callable,
                 feat_extractor: Callable,
                 campplus_model: str,
                 speech_tokenizer_model: str,
                 spk2info: str = '',
                 allowed_special: str = 'all'):
        self.tokenizer = get_tokenizer()
        self.feat_extractor = feat_extractor
        self.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        for onnx in (campplus_model, speech_tokenizer_model):  # upstream opens them with onnxruntime
            with open(onnx, 'rb'):
                pass
        if os.path.exists(spk2info):
            self.spk2info = torch.load(spk2info, map_location=self.device, weights_only=True)
        else:
            self.spk2info = {}
        self.allowed_special = allowed_special
        self.text_frontend = ''
        logging.info('no frontend is avaliable')

    def _extract_text_token(self, text):
        text_token = self.tokenizer.encode(text, allowed_special=self.allowed_special)
        text_token = torch.tensor([text_token], dtype=torch.int32).to(self.device)
        text_token_len = torch.tensor([text_token.shape[1]], dtype=torch.int32).to(self.device)
        return text_token, text_token_len

    def _extract_speech_token(self, prompt_wav):
        speech = load_wav(prompt_wav, 16000)
        assert speech.shape[1] / 16000 <= 30, 'do not support extract speech token for audio longer than 30s'
        frames = speech.shape[1] // 640  # 25 tokens per second
        energy = speech[0, :frames * 640].reshape(frames, 640).abs().mean(dim=1)
        speech_token = (energy * 6560).clamp(0, 6560).to(torch.int32).unsqueeze(0)
        speech_token_len = torch.tensor([speech_token.shape[1]], dtype=torch.int32).to(self.device)
        return speech_token.to(self.device), speech_token_len

    def _extract_spk_embedding(self, prompt_wav):
        speech = load_wav(prompt_wav, 16000)[0].numpy()
        spectrum = np.abs(np.fft.rfft(speech))
        freqs = np.fft.rfftfreq(len(speech), 1 / 16000)
        band = (freqs >= 60) & (freqs <= 500)
        pitch = float(freqs[band][np.argmax(spectrum[band])])
        embedding = torch.zeros(1, 192)
        embedding[0, 0] = pitch
        embedding[0, 1:] = torch.from_numpy(spectrum[1:192].astype(np.float32) / (spectrum.max() + 1e-9))
        return embedding.to(self.device)

    def _extract_speech_feat(self, prompt_wav):
        speech = load_wav(prompt_wav, 24000)
        frames = speech.shape[1] // 480  # 50 mel frames per second
        speech_feat = speech[0, :frames * 480].reshape(1, frames, 480)[:, :, :80].to(self.device)
        speech_feat_len = torch.tensor([speech_feat.shape[1]], dtype=torch.int32).to(self.device)
        return speech_feat, speech_feat_len

    def text_normalize(self, text, split=True, text_frontend=True):
        if isinstance(text, Generator):
            return [text]
        if '<|' in text and '|>' in text:
            text_frontend = False
        if text_frontend is False or text == '':
            return [text] if split is True else text
        text = text.strip()
        texts = _split_paragraph(text)
        texts = [i for i in texts if not _is_only_punctuation(i)]
        return texts if split is True else text

    def frontend_sft(self, tts_text, spk_id):
        tts_text_token, tts_text_token_len = self._extract_text_token(tts_text)
        embedding = self.spk2info[spk_id]['embedding']
        model_input = {'text': tts_text_token, 'text_len': tts_text_token_len, 'llm_embedding': embedding, 'flow_embedding': embedding}
        return model_input

    def frontend_zero_shot(self, tts_text, prompt_text, prompt_wav, resample_rate, zero_shot_spk_id):
        tts_text_token, tts_text_token_len = self._extract_text_token(tts_text)
        if zero_shot_spk_id == '':
            prompt_text_token, prompt_text_token_len = self._extract_text_token(prompt_text)
            speech_feat, speech_feat_len = self._extract_speech_feat(prompt_wav)
            speech_token, speech_token_len = self._extract_speech_token(prompt_wav)
            if resample_rate == 24000:
                token_len = min(int(speech_feat.shape[1] / 2), speech_token.shape[1])
                speech_feat, speech_feat_len[:] = speech_feat[:, :2 * token_len], 2 * token_len
                speech_token, speech_token_len[:] = speech_token[:, :token_len], token_len
            embedding = self._extract_spk_embedding(prompt_wav)
            model_input = {'prompt_text': prompt_text_token, 'prompt_text_len': prompt_text_token_len,
                           'llm_prompt_speech_token': speech_token, 'llm_prompt_speech_token_len': speech_token_len,
                           'flow_prompt_speech_token': speech_token, 'flow_prompt_speech_token_len': speech_token_len,
                           'prompt_speech_feat': speech_feat, 'prompt_speech_feat_len': speech_feat_len,
                           'llm_embedding': embedding, 'flow_embedding': embedding}
        else:
            model_input = {**self.spk2info[zero_shot_spk_id]}
        model_input['text'] = tts_text_token
        model_input['text_len'] = tts_text_token_len
        return model_input

    def frontend_cross_lingual(self, tts_text, prompt_wav, resample_rate, zero_shot_spk_id):
        model_input = self.frontend_zero_shot(tts_text, '', prompt_wav, resample_rate, zero_shot_spk_id)
        del model_input['prompt_text']
        del model_input['prompt_text_len']
        del model_input['llm_prompt_speech_token']
        del model_input['llm_prompt_speech_token_len']
        return model_input

    def frontend_instruct(self, tts_text, spk_id, instruct_text):
        model_input = self.frontend_sft(tts_text, spk_id)
        del model_input['llm_embedding']
        instruct_text_token, instruct_text_token_len = self._extract_text_token(instruct_text)
        model_input['prompt_text'] = instruct_text_token
        model_input['prompt_text_len'] = instruct_text_token_len
        return model_input

    def frontend_instruct2(self, tts_text, instruct_text, prompt_wav, resample_rate, zero_shot_spk_id):
        model_input = self.frontend_zero_shot(tts_text, instruct_text, prompt_wav, resample_rate, zero_shot_spk_id)
        del model_input['llm_prompt_speech_token']
        del model_input['llm_prompt_speech_token_len']
        return model_input
