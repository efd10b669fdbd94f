"""GGUF loading: dequantization against gguf's numpy reference, parity with transformers' own GGUF
loading (weights, config, tokenizer) on the embedded SmolLM2-135M-Instruct, a tiny llama file with
known weights (q/k permutation, untied head, sentencepiece vocabulary), and errors for bad files."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from opengpt.weights.gguf import GGUFError, dequantize, read_gguf, read_gguf_config

# ------------------------------------------------------------------------------------ dequantization

# where each block's fp16 scale(s) sit, so random bytes can be given finite scales
_SCALE_BYTES = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


def _random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block_elems, block_bytes), dtype=np.uint8)
    scales = rng.uniform(-0.1, 0.1, raw.shape[:2]).astype(np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
    for at in _SCALE_BYTES[qtype]:
        raw[:, :, at : at + 2] = scales
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_dequantize_quantized_values_match_gguf(qtype):
    x = np.random.default_rng(0).standard_normal((6, 256)).astype(np.float32) * 3
    raw = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8)
    expected = gguf.quants.dequantize(raw, qtype).reshape(6, 256)
    got = dequantize(torch.from_numpy(raw.copy()), qtype, (6, 256))
    assert got.dtype == torch.float32 and got.shape == (6, 256)
    torch.testing.assert_close(got, torch.from_numpy(np.array(expected, np.float32)), rtol=0, atol=0)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_dequantize_random_blocks_match_gguf(qtype):
    # every bit pattern of the quants, not only those a quantizer emits; K-quants take the numpy fallback
    raw = _random_blocks(qtype, 4, 512, np.random.default_rng(1))
    expected = gguf.quants.dequantize(raw, qtype)
    got = dequantize(torch.from_numpy(raw.copy()), int(qtype), (2, 2, 512))
    torch.testing.assert_close(got, torch.from_numpy(expected.reshape(2, 2, 512)), rtol=0, atol=0)


def test_dequantize_rejects_wrong_size():
    with pytest.raises(GGUFError, match="Q4_1"):
        dequantize(torch.zeros(19, dtype=torch.uint8), Q.Q4_1, (32,))


# --------------------------------------------------------------------- the embedded model vs transformers

STRINGS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    if x:\n\treturn [i ** 2 for i in range(10)]\n\n\nprint(f(3))  # done",
    "你好，世界",
    "🤗🚀",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "   leading and trailing spaces   ",
    " x",
    "12345.678",
    "<|endoftext|>tail<file_sep>",
    "",
]


@pytest.fixture(scope="module")
def ours(default_gguf):
    return read_gguf(default_gguf)


@pytest.fixture(scope="module")
def hf_model(default_gguf):
    """transformers' state dict of the same file (it dequantizes and un-permutes too)."""
    transformers = pytest.importorskip("transformers")
    d, name = str(default_gguf.parent), default_gguf.name
    try:
        import accelerate  # noqa: F401  (transformers insists on it for `gguf_file=`)
    except ImportError:
        # the same loader from_pretrained runs for llama files, minus the accelerate check
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = transformers.AutoConfig.from_pretrained(d, gguf_file=name)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        sd = load_gguf_checkpoint(str(default_gguf), return_tensors=True, model_to_load=model)["tensors"]
        return config, sd
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    return model.config, model.state_dict()


@pytest.fixture(scope="module")
def hf_tokenizer(default_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


def test_state_dict_matches_transformers(ours, hf_model):
    config, theirs = hf_model
    assert ours.hf_config["tie_word_embeddings"] is True and config.tie_word_embeddings is True
    assert "lm_head.weight" not in ours.state_dict  # the file has no output.weight: the head is the embedding
    keys = set(theirs) - {"lm_head.weight"}
    assert keys == set(ours.state_dict)
    for key in sorted(keys):
        assert ours.state_dict[key].dtype == torch.float32
        torch.testing.assert_close(ours.state_dict[key], theirs[key].float(), rtol=0, atol=0, msg=key)
    if "lm_head.weight" in theirs:
        torch.testing.assert_close(theirs["lm_head.weight"].float(), ours.state_dict["model.embed_tokens.weight"])


def test_config_matches_transformers(ours, default_gguf):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoConfig.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    cfg = ours.hf_config
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == getattr(theirs, key), key
    rope = getattr(theirs, "rope_parameters", None) or {"rope_theta": theirs.rope_theta}
    assert cfg["rope_theta"] == rope["rope_theta"] and cfg["rope_scaling"] is None
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"
    assert read_gguf_config(default_gguf) == cfg == read_gguf_config(ours)
    assert ours.eos_token_ids == [2]
    assert ours.metadata["general.architecture"] == "llama" and ours.metadata["llama.block_count"] == 30
    assert not any(isinstance(v, (list, np.ndarray)) for v in ours.metadata.values())


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_tokenizer_matches_transformers(ours, hf_tokenizer, add_special_tokens):
    for text in STRINGS:
        expected = hf_tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        got = ours.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        assert got == expected, text
        assert ours.tokenizer.decode(got, skip_special_tokens=False) == text
    assert ours.tokenizer.encode("<|im_start|>").ids == [1]


def test_tokenizer_config_matches_transformers(ours, hf_tokenizer):
    cfg = ours.tokenizer_config
    assert cfg["bos_token"] == hf_tokenizer.bos_token == "<|im_start|>"
    assert cfg["eos_token"] == hf_tokenizer.eos_token == "<|im_end|>"
    assert cfg["unk_token"] == hf_tokenizer.unk_token and cfg["pad_token"] == hf_tokenizer.pad_token
    assert cfg["chat_template"] == hf_tokenizer.chat_template and "<|im_start|>" in cfg["chat_template"]
    assert cfg["add_bos_token"] is False and cfg["add_eos_token"] is False


# --------------------------------------------------------------- a tiny llama file with known weights

PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "lo", "▁he", "llo", "▁hello", "▁w", "or",
          "▁wor", "ld", "▁world", "<|user|>", "1", "2", "▁1", "12", "x", "▁x"]


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, arch: str = "llama", tied: bool = False, rope_freqs: np.ndarray | None = None,
                    extra_tensor: str | None = None, split_count: int | None = None) -> dict[str, torch.Tensor]:
    """A 2-layer llama GGUF with a sentencepiece vocabulary; returns the HF state dict it encodes."""
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{i:02X}>" for i in range(256)], *PIECES]
    types = [2, 3, 3] + [6] * 256 + [4 if p == "<|user|>" else 1 for p in PIECES]
    scores = [0.0] * 259 + [-float(i) for i in range(len(PIECES))]
    vocab, hidden, inter, heads, kv_heads, head_dim = len(tokens), 64, 96, 4, 2, 16
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g)
    sd = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": rand(hidden)}
    if not tied:
        sd["lm_head.weight"] = rand(vocab, hidden)
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    for i in range(2):
        p = f"model.layers.{i}."
        layer = {"attn_q": ("self_attn.q_proj", (heads * head_dim, hidden)),
                 "attn_k": ("self_attn.k_proj", (kv_heads * head_dim, hidden)),
                 "attn_v": ("self_attn.v_proj", (kv_heads * head_dim, hidden)),
                 "attn_output": ("self_attn.o_proj", (hidden, heads * head_dim)),
                 "ffn_gate": ("mlp.gate_proj", (inter, hidden)), "ffn_up": ("mlp.up_proj", (inter, hidden)),
                 "ffn_down": ("mlp.down_proj", (hidden, inter)),
                 "attn_norm": ("input_layernorm", (hidden,)), "ffn_norm": ("post_attention_layernorm", (hidden,))}
        for gguf_name, (hf_name, shape) in layer.items():
            sd[f"{p}{hf_name}.weight"] = rand(*shape)
            names[f"blk.{i}.{gguf_name}"] = f"{p}{hf_name}"

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{{ messages[0]['content'] }}")
    if split_count is not None:
        w.add_uint16("split.count", split_count)
    for gguf_name, hf_name in names.items():
        if hf_name + ".weight" in sd:
            t = sd[hf_name + ".weight"]
            t = _permute(t, heads) if ".attn_q" in gguf_name else _permute(t, kv_heads) if ".attn_k" in gguf_name else t
            w.add_tensor(gguf_name + ".weight", t.numpy())
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    if extra_tensor is not None:
        w.add_tensor(extra_tensor, np.zeros((4, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_tiny_weights_unpermuted_and_untied(tiny, capsys):
    path, sd = tiny
    ck = read_gguf(path, progress=True)
    assert "tiny.gguf" in capsys.readouterr().err  # the tqdm bar
    assert set(ck.state_dict) == set(sd) and ck.hf_config["tie_word_embeddings"] is False
    for key, value in sd.items():
        torch.testing.assert_close(ck.state_dict[key], value, rtol=0, atol=0, msg=key)
    assert ck.hf_config["num_key_value_heads"] == 2 and ck.hf_config["head_dim"] == 16
    bf16 = read_gguf(path, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in bf16.state_dict.values())
    assert bf16.hf_config["torch_dtype"] == "bfloat16"


def _llama3_rope_freqs(factor: float, head_dim: int = 16, base: float = 10000.0) -> np.ndarray:
    # convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, for rope_type "llama3"
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low, high, old = 1.0, 4.0, 8192
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def test_tiny_tied_with_llama3_rope_freqs(tmp_path):
    path = tmp_path / "tied.gguf"
    sd = write_tiny_gguf(path, tied=True, rope_freqs=_llama3_rope_freqs(32.0))
    ck = read_gguf(path)
    assert set(ck.state_dict) == set(sd) and "lm_head.weight" not in ck.state_dict  # rope_freqs is config
    assert ck.hf_config["tie_word_embeddings"] is True
    assert ck.hf_config["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_tiny_sentencepiece_tokenizer_matches_transformers(tiny):
    transformers = pytest.importorskip("transformers")
    path, _ = tiny
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ck = read_gguf(path)
    assert ck.tokenizer_config["add_bos_token"] is True  # llama.cpp's default for sentencepiece
    assert ck.tokenizer_config["chat_template"] == "{{ messages[0]['content'] }}"
    for text in ["hello world", " hello", "hello<|user|>12 x\n", "héllo wörld 🤗", "<s>hello</s>", "  x  ", ""]:
        for special in (True, False):
            expected = theirs(text, add_special_tokens=special)["input_ids"]
            assert ck.tokenizer.encode(text, add_special_tokens=special).ids == expected, (text, special)


# ------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(GGUFError, match="nope.gguf"):
        read_gguf(missing)


def test_truncated_real_file(default_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as f:
        cut.write_bytes(f.read(1 << 20))  # ends inside the vocabulary
    with pytest.raises(GGUFError, match="corrupt or truncated.*convert_hf_to_gguf.py"):
        read_gguf(cut)


@pytest.mark.parametrize("keep", [16, 0.5, -1])
def test_truncated_or_corrupt_tiny_file(tiny, tmp_path, keep):
    path, _ = tiny
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(GGUFError, match="corrupt or truncated"):
        read_gguf(cut)


@pytest.mark.parametrize("content", [b"", b"GGUF", np.random.default_rng(0).bytes(4096)])
def test_not_a_gguf_file(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(GGUFError, match="corrupt or truncated"):
        read_gguf(bad)


def test_unknown_architecture(tmp_path):
    path = tmp_path / "foo.gguf"
    write_tiny_gguf(path, arch="foo")
    with pytest.raises(GGUFError, match="'foo'.*supported: llama"):
        read_gguf(path)


def test_unsupported_tensor(tmp_path):
    path = tmp_path / "moe.gguf"
    write_tiny_gguf(path, extra_tensor="blk.0.ffn_gate_inp.weight")
    with pytest.raises(GGUFError, match="blk.0.ffn_gate_inp.weight.*mixture-of-experts"):
        read_gguf(path)


def test_split_file(tmp_path):
    path = tmp_path / "model-00001-of-00002.gguf"
    write_tiny_gguf(path, split_count=2)
    with pytest.raises(GGUFError, match="2-part split GGUF.*llama-gguf-split --merge"):
        read_gguf(path)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(GGUFError, match="not a file"):
        read_gguf(tmp_path)


# ------------------------------------------------------------------ blocks kept packed (quantize="gguf")


def write_tiny_quantized_gguf(path, monkeypatch, tied: bool = False) -> None:
    """`write_tiny_gguf` with block-quantized tensors: embedding Q8_0, attention Q4_0, MLP and head Q4_1
    (the head's 286 rows are not a multiple of 16, so the int4 kernel cannot take it: it falls back to
    float). Weight matrices are scaled to std 0.15 (from 1), which keeps activations of order one."""
    add_tensor = gguf.GGUFWriter.add_tensor

    def quantized(self, name, tensor, *args, **kwargs):
        qtype = Q.Q8_0 if name.startswith("token_embd") else Q.Q4_0 if ".attn_" in name else Q.Q4_1
        if tensor.ndim == 2 and not name.startswith("rope"):
            blocks = gguf.quants.quantize(tensor.astype(np.float32) * 0.15, qtype)
            return add_tensor(self, name, blocks, raw_dtype=qtype)
        return add_tensor(self, name, tensor, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "add_tensor", quantized)
        write_tiny_gguf(path, tied=tied)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_q4_blocks_map_exactly_onto_the_int4_kernel(qtype):
    """(q, scale, zero) with group 32 reproduce gguf's weights bit for bit, in our arithmetic and in the
    kernel's own (its float32 path; the fast bf16 path rounds scales and zeros)."""
    from opengpt.quantize import dequantize_int4, gguf_int4_params
    from opengpt.weights.gguf import unpack_blocks

    x = np.random.default_rng(2).standard_normal((32, 256)).astype(np.float32)
    raw = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8)
    expected = torch.from_numpy(np.array(gguf.quants.dequantize(raw, qtype), np.float32).reshape(32, 256))
    q, scales, zeros = gguf_int4_params(unpack_blocks(torch.from_numpy(raw.copy()), qtype, (32, 256)))
    torch.testing.assert_close(dequantize_int4(q, scales, zeros), expected, rtol=0, atol=0)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    sz = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()  # (K/32, N, 2)
    w = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(256), packed, 32, sz).t()  # x = I gives W^T
    torch.testing.assert_close(w, expected, rtol=0, atol=0)


def test_default_model_q4_1_blocks_map_exactly(default_gguf, ours):
    """Every Q4_1 tensor of the embedded model, as Int4Linear's parameters, equals its dequantized weights."""
    from opengpt.quantize import dequantize_int4, gguf_int4_params
    from opengpt.weights.gguf import BlockQuant

    packed = read_gguf(default_gguf, keep_packed=True).state_dict
    kinds = {v.qtype for v in packed.values() if isinstance(v, BlockQuant)}
    assert kinds == {"Q4_1", "Q8_0"} and isinstance(packed["model.norm.weight"], torch.Tensor)
    for key, blocks in packed.items():
        if isinstance(blocks, BlockQuant) and blocks.qtype == "Q4_1":
            torch.testing.assert_close(dequantize_int4(*gguf_int4_params(blocks)), ours.state_dict[key], rtol=0,
                                       atol=0, msg=key)
    emb = packed["model.embed_tokens.weight"]
    assert emb.q.dtype == torch.int8 and emb.d.dtype == torch.float16 and emb.shape == (49152, 576)
    assert torch.equal(emb.dequantize(), ours.state_dict["model.embed_tokens.weight"])


@pytest.mark.parametrize("tied", [False, True])
def test_packed_blocks_dequantize_to_the_dequantized_state_dict(tmp_path, monkeypatch, tied):
    """keep_packed=True returns the same weights in blocks, q/k rows un-permuted like the float ones."""
    from opengpt.weights.gguf import BlockQuant

    path = tmp_path / "q.gguf"
    write_tiny_quantized_gguf(path, monkeypatch, tied=tied)
    floats, packed = read_gguf(path).state_dict, read_gguf(path, keep_packed=True).state_dict
    assert set(floats) == set(packed)
    assert {type(v).__name__ for k, v in packed.items() if k.endswith("proj.weight")} == {"BlockQuant"}
    for key, value in packed.items():
        got = value.dequantize() if isinstance(value, BlockQuant) else value
        torch.testing.assert_close(got, floats[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("tied", [False, True])
def test_packed_model_matches_the_dequantized_model(tmp_path, monkeypatch, caplog, tied):
    """quantize="gguf": packed layers, the same weights; logits within the kernels' bf16 arithmetic."""
    import logging

    from opengpt.quantize import BlockInt8Embedding, Int4Linear
    from opengpt.weights.load import load_model

    path = tmp_path / "q.gguf"
    write_tiny_quantized_gguf(path, monkeypatch, tied=tied)
    _, ref, _, _ = load_model(path)
    with caplog.at_level(logging.INFO, logger="opengpt.quantize"):
        _, model, _, _ = load_model(path, quantize="gguf")
    assert isinstance(model.embed_tokens, BlockInt8Embedding) and model.quantization == "gguf"
    assert all(isinstance(m.self_attn.q_proj, Int4Linear) and isinstance(m.mlp.down_proj, Int4Linear)
               for m in model.layers)
    if tied:
        assert model.lm_head is model.embed_tokens.table  # one Q8_0 copy serves the lookup and the head
    else:  # 286 rows: the int4 kernel needs a multiple of 16, so the Q4_1 head is dequantized
        assert type(model.lm_head).__name__ == "Linear" and "gguf: 1 layers dequantized" in caplog.text
        torch.testing.assert_close(model.lm_head.weight, ref.lm_head.weight, rtol=0, atol=0)
    ids = torch.randint(0, 286, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
        torch.testing.assert_close(model.embed_tokens(ids), ref.embed_tokens(ids), rtol=0, atol=0)
    assert (a - b).abs().max() <= 0.03 * a.abs().max()  # bf16 activations, scales and zeros in the kernels
