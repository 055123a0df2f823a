"""Build a random-weight CosyVoice model directory (CosyVoice 1, 2 or 3) with the REAL CosyVoice classes: tiny
(for the real-code tests) or, for CosyVoice 2, with CosyVoice2-0.5B's layer sizes (timing on a GPU without a download).

Usage: python -m tests.tiny_cosyvoice --repo /path/to/CosyVoice --out /tmp/tiny-cv2 [--version 1|2|3] [--size 0.5b]
The audio it makes is noise; every code path (tokenizer, LLM, flow, vocoder, frontend, streaming) is upstream's.
Needs CosyVoice's inference dependencies (script/setup-cosyvoice installs them; docs/cosyvoice.md "Real-code tests").

What it takes to make random weights behave (facts of the upstream code at ace7c47):
- Random weights rarely pick a stop token, so each LLM is made to stop exactly at its minimum length (2 speech tokens
  per text token), where upstream stops masking the end-of-speech token; every other stop token is kept from winning
  before that, or replies would end early at random. v1 (`TransformerLM`, one stop token 4096) and v2 (`Qwen2LM`, stop
  tokens 6561-6563; 6561 is the one masked until the minimum length) get it through their output layer's bias.
  `CosyVoice3LM`'s output layer has no bias and 200 stop tokens (6561-6760, of which only 6561 is masked until the
  minimum length): one dimension of every speech-token embedding carries a constant, which survives the LLM's final
  norm as a constant feature, and the stop rows of the output layer read it (6561 up, the others down).
- CosyVoice 3 asserts `<|endofprompt|>` is token 151646: the tokenizer's vocabulary is padded so that it is.
- The tokenizer is saved from `Qwen2TokenizerFast.from_pretrained(dir)`, which reads vocab.json/merges.txt under
  transformers 4.51 and 5.x alike (its constructor ignores them under 5.x: a one-token vocabulary).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SPEECH_TOKENS = {1: 4096, 2: 6561, 3: 6561}
"""Speech-token vocabulary per version (v1: 50 Hz tokens, v2/v3: 25 Hz)."""

TOKEN_STRIDE = {1: 2, 2: 4, 3: 4}
"""Whisper-mel frames (100 per second) per speech token."""

END_OF_PROMPT_ID = 151646
"""CosyVoice 3's hard-coded id of `<|endofprompt|>` (cosyvoice/llm/llm.py)."""

BUILTIN_SPEAKERS = ("中文女", "英文男")
"""Built-in speakers of the tiny CosyVoice 1 (`spk2info.pt`), named like CosyVoice-300M-SFT's."""

SIZES = {
    # A few MB: every code path, a fraction of the compute.
    "tiny": dict(
        hidden=64,
        qwen_layers=1,
        qwen_heads=2,
        qwen_kv_heads=1,
        qwen_ffn=128,
        qwen_vocab=0,
        enc_heads=2,
        enc_units=64,
        enc_blocks=1,
        dec_channels=32,
        dec_head_dim=16,
        dec_blocks=1,
        dec_mid_blocks=1,
        dec_heads=2,
        hift_channels=16,
        hift_kernels=[3],
        hift_dilations=[[1, 3, 5]],
    ),
    # The layer sizes of CosyVoice2-0.5B (Qwen2-0.5B LLM, the released flow and HiFT configs): the same compute
    # per token as the real model, for timing (about 2.5 GB of random weights).
    "0.5b": dict(
        hidden=896,
        qwen_layers=24,
        qwen_heads=14,
        qwen_kv_heads=2,
        qwen_ffn=4864,
        qwen_vocab=151936,
        enc_heads=8,
        enc_units=2048,
        enc_blocks=6,
        dec_channels=256,
        dec_head_dim=64,
        dec_blocks=4,
        dec_mid_blocks=12,
        dec_heads=8,
        hift_channels=512,
        hift_kernels=[3, 7, 11],
        hift_dilations=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    ),
}

V1_YAML = """\
sample_rate: 22050
text_encoder_input_size: {hidden}
llm_input_size: {hidden}
llm_output_size: {hidden}
spk_embed_dim: 192

llm: !new:cosyvoice.llm.llm.TransformerLM
    text_encoder_input_size: !ref <text_encoder_input_size>
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    text_token_size: 51866
    speech_token_size: {tokens}
    length_normalized_loss: True
    lsm_weight: 0
    spk_embed_dim: !ref <spk_embed_dim>
    text_encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        input_size: !ref <text_encoder_input_size>
        output_size: {hidden}
        attention_heads: {enc_heads}
        linear_units: {hidden}
        num_blocks: 1
        dropout_rate: 0.0
        positional_dropout_rate: 0.0
        attention_dropout_rate: 0.0
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        use_cnn_module: False
        macaron_style: False
        use_dynamic_chunk: False
        use_dynamic_left_chunk: False
        static_chunk_size: 1
    llm: !new:cosyvoice.transformer.encoder.TransformerEncoder
        input_size: !ref <llm_input_size>
        output_size: !ref <llm_output_size>
        attention_heads: {enc_heads}
        linear_units: {hidden}
        num_blocks: 1
        dropout_rate: 0.0
        positional_dropout_rate: 0.0
        attention_dropout_rate: 0.0
        input_layer: 'linear_legacy'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        static_chunk_size: 1
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: 512
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {tokens}
    input_frame_rate: 50
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        output_size: 512
        attention_heads: {enc_heads}
        linear_units: {enc_units}
        num_blocks: {enc_blocks}
        dropout_rate: 0.0
        positional_dropout_rate: 0.0
        attention_dropout_rate: 0.0
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 512
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 80
        sampling_ratios: [1, 1, 1, 1]
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{dec_channels}]
            dropout: 0.0
            attention_head_dim: {dec_head_dim}
            n_blocks: {dec_blocks}
            num_mid_blocks: {dec_mid_blocks}
            num_heads: {dec_heads}
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {hift_channels}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 8]
    upsample_kernel_sizes: [16, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: {hift_kernels}
    resblock_dilation_sizes: {hift_dilations}
    source_resblock_kernel_sizes: [7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {hift_channels}

get_tokenizer: !name:whisper.tokenizer.get_tokenizer
    multilingual: True
    num_languages: 100
    language: 'en'
    task: 'transcribe'
allowed_special: 'all'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1024
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 256
    win_size: 1024
    fmin: 0
    fmax: 8000
    center: False
"""

V2_YAML = """\
sample_rate: 24000
llm_input_size: {hidden}
llm_output_size: {hidden}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 25
num_decoding_left_chunks: -1

llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: {tokens}
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: 512
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {tokens}
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: 512
        attention_heads: {enc_heads}
        linear_units: {enc_units}
        num_blocks: {enc_blocks}
        dropout_rate: 0.0
        positional_dropout_rate: 0.0
        attention_dropout_rate: 0.0
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 512
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{dec_channels}]
            dropout: 0.0
            attention_head_dim: {dec_head_dim}
            n_blocks: {dec_blocks}
            num_mid_blocks: {dec_mid_blocks}
            num_heads: {dec_heads}
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {hift_channels}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: {hift_kernels}
    resblock_dilation_sizes: {hift_dilations}
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {hift_channels}

get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
allowed_special: 'all'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: 8000
    center: False
"""

V3_YAML = """\
sample_rate: 24000
llm_input_size: {hidden}
llm_output_size: {hidden}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 25
num_decoding_left_chunks: -1

llm: !new:cosyvoice.llm.llm.CosyVoice3LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: {tokens}
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT
    input_size: 80
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {tokens}
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    pre_lookahead_layer: !new:cosyvoice.transformer.upsample_encoder.PreLookaheadLayer
        in_channels: 80
        channels: {enc_units}
        pre_lookahead_len: 3
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.DiT.dit.DiT
            dim: {dit_dim}
            depth: 1
            heads: {dec_heads}
            dim_head: {dec_head_dim}
            ff_mult: 2
            mel_dim: 80
            mu_dim: 80
            spk_dim: 80
            out_channels: 80
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.CausalHiFTGenerator
    in_channels: 80
    base_channels: {hift_channels}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: {hift_kernels}
    resblock_dilation_sizes: {hift_dilations}
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    conv_pre_look_right: 4
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {hift_channels}

get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
    version: cosyvoice3
allowed_special: 'all'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: null
    center: False
"""

YAMLS = {1: ("cosyvoice.yaml", V1_YAML), 2: ("cosyvoice2.yaml", V2_YAML), 3: ("cosyvoice3.yaml", V3_YAML)}

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a test of the tiny model",
    "home assistant speaks with a cloned voice",
    "one two three four five six seven eight nine ten",
]


def build_blank_en(out: Path, size: dict, pad_to: int = 0) -> int:
    """A byte-level BPE tokenizer saved as a Qwen2 tokenizer (its vocabulary padded to `pad_to` entries) and a Qwen2
    model of `size`; returns the model's vocabulary size."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2TokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(out))
    if pad_to:
        # Tokens no merge can produce: they only move the ids of the special tokens CosyVoice adds after them.
        vocab = json.loads((out / "vocab.json").read_text())
        vocab.update({f"<|unused_{n}|>": n for n in range(len(vocab), pad_to)})
        (out / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Qwen2TokenizerFast.from_pretrained(
        str(out), unk_token=None, bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(str(out))
    # Room for the special tokens CosyVoice adds (about 20 for v2, about 300 for v3).
    vocab_size = max(len(tokenizer) + (320 if pad_to else 64), size["qwen_vocab"])
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=size["hidden"],
        intermediate_size=size["qwen_ffn"],
        num_hidden_layers=size["qwen_layers"],
        num_attention_heads=size["qwen_heads"],
        num_key_value_heads=size["qwen_kv_heads"],
        max_position_embeddings=32768,
        tie_word_embeddings=size["qwen_vocab"] > 0 or pad_to > 0,
    )
    Qwen2ForCausalLM(config).save_pretrained(str(out), safe_serialization=True)
    return vocab_size


def build_onnx(out: Path, version: int) -> None:
    """campplus.onnx ([1,T,80] -> [1,192]) and speech_tokenizer_v<version>.onnx (feats [1,128,T] -> int64 tokens)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(80, 192)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["mean", "w"], ["embedding"]),
        ],
        "campplus",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "T", 80])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 192])],
        [weight],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(out / "campplus.onnx")
    )

    consts = [
        numpy_helper.from_array(np.array(v, dtype=np.int64), n)
        for n, v in (
            ("starts", [0]),
            ("ends", [2**62]),
            ("axes", [1]),
            ("steps", [TOKEN_STRIDE[version]]),
            ("modulus", [SPEECH_TOKENS[version]]),
        )
    ]
    consts.append(numpy_helper.from_array(np.array([1000.0], dtype=np.float32), "scale"))
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["feats"], ["m"], axes=[1], keepdims=0),
            helper.make_node("Slice", ["m", "starts", "ends", "axes", "steps"], ["s"]),
            helper.make_node("Abs", ["s"], ["a"]),
            helper.make_node("Mul", ["a", "scale"], ["b"]),
            helper.make_node("Cast", ["b"], ["c"], to=TensorProto.INT64),
            helper.make_node("Mod", ["c", "modulus"], ["tokens"]),
        ],
        "speech_tokenizer",
        [
            helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 128, "T"]),
            helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1]),
        ],
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, "N"])],
        consts,
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8),
        str(out / f"speech_tokenizer_v{version}.onnx"),
    )


def stop_at_minimum_length(llm: Any, version: int) -> None:
    """Make the random LLM end each reply at its minimum length, and never earlier (see the module docstring)."""
    import torch

    tokens = SPEECH_TOKENS[version]
    with torch.no_grad():
        decoder = llm.llm_decoder
        if version in (1, 2):
            decoder.weight[tokens:] = 0.0
            decoder.bias[tokens:] = -100.0  # v2's other stop tokens (6562, 6563) never win
            decoder.bias[tokens] = 100.0  # masked by upstream until the minimum length, then it wins
            return
        # CosyVoice3LM: no bias. Dimension 0 of every speech-token embedding (all the LLM reads while decoding)
        # carries a constant that dominates that dimension after the final RMSNorm; the stop rows read only it.
        llm.speech_embedding.weight[:, 0] = 1.0
        decoder.weight[tokens:] = 0.0
        decoder.weight[tokens + 1 :, 0] = -20.0
        decoder.weight[tokens, 0] = 20.0  # 6561: the one upstream masks until the minimum length


def build(repo: Path, out: Path, size_name: str = "tiny", version: int = 2) -> Path:
    """Write the whole model directory for CosyVoice `version` and return it."""
    import torch

    if version != 2 and size_name != "tiny":
        raise ValueError("--size applies to CosyVoice 2 only")
    # To the front even when already on the path: an engine started earlier (another checkout, e.g. the tests'
    # stand-in) may have put its own checkout ahead of this one.
    for path in (repo / "third_party" / "Matcha-TTS", repo):
        if str(path) in sys.path:
            sys.path.remove(str(path))
        sys.path.insert(0, str(path))
    from hyperpyyaml import load_hyperpyyaml

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    size = SIZES[size_name]
    overrides = {}
    if version >= 2:
        build_blank_en(out / "CosyVoice-BlankEN", size, pad_to=END_OF_PROMPT_ID - 2 if version == 3 else 0)
        overrides["qwen_pretrain_path"] = str(out / "CosyVoice-BlankEN")
    name, template = YAMLS[version]
    text = template.format(
        tokens=SPEECH_TOKENS[version],
        dit_dim=size["dec_heads"] * size["dec_head_dim"],
        **{k: v for k, v in size.items() if not k.startswith("qwen_")},
    )
    (out / name).write_text(text)
    configs = load_hyperpyyaml(text, overrides=overrides)
    llm = configs["llm"]
    stop_at_minimum_length(llm, version)
    torch.save(llm.state_dict(), out / "llm.pt")
    torch.save(configs["flow"].state_dict(), out / "flow.pt")
    torch.save(configs["hift"].state_dict(), out / "hift.pt")
    build_onnx(out, version)
    if version == 1:
        generator = torch.Generator().manual_seed(1)
        speakers = {name: {"embedding": torch.randn(1, 192, generator=generator)} for name in BUILTIN_SPEAKERS}
        torch.save(speakers, out / "spk2info.pt")
    (out / "tiny-model.json").write_text(
        json.dumps({"note": "random weights, tests and timing only", "size": size_name, "version": version})
    )
    return out


def main(default_version: int = 2) -> None:
    """Command line entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="CosyVoice checkout")
    parser.add_argument("--out", type=Path, required=True, help="model directory to create")
    parser.add_argument("--version", type=int, choices=(1, 2, 3), default=default_version, help="CosyVoice 1, 2 or 3")
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="tiny",
        help="tiny (tests) or 0.5b (CosyVoice2-0.5B's layer sizes, for timing; version 2 only)",
    )
    args = parser.parse_args()
    print(build(args.repo.resolve(), args.out, args.size, args.version))


if __name__ == "__main__":
    main()
