"""Build a random-weight CosyVoice2 model directory with the REAL CosyVoice classes: tiny (for the opt-in test) or
with CosyVoice2-0.5B's layer sizes (for timing on a GPU without downloading the weights).

Usage: python -m tests.tiny_cosyvoice2 --repo /path/to/CosyVoice --out /tmp/tiny-cosyvoice2 [--size 0.5b]
The audio it makes is noise; every code path (tokenizer, LLM, flow, vocoder, frontend, streaming) is upstream's.
Needs CosyVoice's Python dependencies (see docs/cosyvoice.md "Integration test").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SPEECH_TOKENS = 6561

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

YAML = """\
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

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a test of the tiny model",
    "home assistant speaks with a cloned voice",
    "one two three four five six seven eight nine ten",
]


def build_blank_en(out: Path, size: dict) -> int:
    """A byte-level BPE tokenizer saved as a Qwen2 tokenizer, and a Qwen2 model of `size`; returns the vocab size."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2TokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(out))
    tokenizer = Qwen2TokenizerFast(
        vocab_file=str(out / "vocab.json"),
        merges_file=str(out / "merges.txt"),
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(str(out))
    vocab = max(len(tokenizer) + 64, size["qwen_vocab"])  # room for the special tokens CosyVoice adds
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=size["hidden"],
        intermediate_size=size["qwen_ffn"],
        num_hidden_layers=size["qwen_layers"],
        num_attention_heads=size["qwen_heads"],
        num_key_value_heads=size["qwen_kv_heads"],
        max_position_embeddings=32768,
        tie_word_embeddings=size["qwen_vocab"] > 0,
    )
    Qwen2ForCausalLM(config).save_pretrained(str(out), safe_serialization=True)
    return vocab


def build_onnx(out: Path) -> None:
    """campplus.onnx ([1,T,80] -> [1,192]) and speech_tokenizer_v2.onnx (feats [1,128,T] -> int64 [1,T/4])."""
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
        for n, v in (("starts", [0]), ("ends", [2**62]), ("axes", [1]), ("steps", [4]), ("modulus", [SPEECH_TOKENS]))
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
        str(out / "speech_tokenizer_v2.onnx"),
    )


def build(repo: Path, out: Path, size_name: str = "tiny") -> Path:
    """Write the whole model directory and return it."""
    import torch

    for path in (repo / "third_party" / "Matcha-TTS", repo):
        sys.path.insert(0, str(path))
    from hyperpyyaml import load_hyperpyyaml

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    size = SIZES[size_name]
    build_blank_en(out / "CosyVoice-BlankEN", size)
    text = YAML.format(tokens=SPEECH_TOKENS, **{k: v for k, v in size.items() if not k.startswith("qwen_")})
    (out / "cosyvoice2.yaml").write_text(text)
    configs = load_hyperpyyaml(text, overrides={"qwen_pretrain_path": str(out / "CosyVoice-BlankEN")})
    llm = configs["llm"]
    with torch.no_grad():
        # Random weights rarely pick end-of-speech: make it win as soon as the minimum length is reached.
        llm.llm_decoder.bias[SPEECH_TOKENS] = 100.0
    torch.save(llm.state_dict(), out / "llm.pt")
    torch.save(configs["flow"].state_dict(), out / "flow.pt")
    torch.save(configs["hift"].state_dict(), out / "hift.pt")
    build_onnx(out)
    (out / "tiny-model.json").write_text(
        json.dumps({"note": "random weights, tests and timing only", "size": size_name})
    )
    return out


def main() -> None:
    """Command line entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="CosyVoice checkout")
    parser.add_argument("--out", type=Path, required=True, help="model directory to create")
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="tiny",
        help="tiny (tests) or 0.5b (CosyVoice2-0.5B's layer sizes, for timing)",
    )
    args = parser.parse_args()
    print(build(args.repo.resolve(), args.out, args.size))


if __name__ == "__main__":
    main()
