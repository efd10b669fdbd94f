"""ModelConfig: every architectural choice of a decoder-only Transformer, as data.

One dataclass describes every model we build: dense Llama-style stacks, sliding-window variants
(Mistral, Qwen2), per-head or full q/k norm (Qwen3, OLMoE), and sparse Mixture-of-Experts layers
(Mixtral, Qwen2-MoE with shared experts, Qwen3-MoE, OLMoE). It is built from a Hugging Face
`config.json` dict (`from_hf_config`), from GGUF metadata (through `weights.gguf`, which turns the
metadata into the same dict), or from a named preset, and round-trips through `to_dict`/`from_dict`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The checkpoint's declared architecture -> the HF `model_type` it implies. Dispatch is on this
# string, never on file or folder names.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
}


class ConfigError(ValueError):
    """A config.json or GGUF header that we cannot turn into a model."""


@dataclass
class ModelConfig:
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: multi-head attention (= num_attention_heads)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # RoPE: base and the HF scaling dict ({"rope_type": "linear"|"dynamic"|"yarn"|"llama3", ...}).
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    # Attention variants.
    qkv_bias: bool = False  # Qwen2 has q/k/v bias but no o_proj bias
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str | None = None  # "head": RMSNorm per head (Qwen3); "full": over the projection (OLMoE)
    clip_qkv: float | None = None  # OLMoE clamps q, k, v to [-clip, clip]
    sliding_window: int | None = None  # a token sees itself and the window - 1 tokens before it
    layer_types: list[str] | None = None  # per layer "full_attention" | "sliding_attention"
    # Mixture of Experts: 0 experts means a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # None: intermediate_size
    norm_topk_prob: bool = True  # renormalise the top-k softmax weights to sum to 1
    shared_expert_intermediate_size: int = 0  # > 0: a shared expert with a sigmoid gate (Qwen2-MoE)
    decoder_sparse_step: int = 1  # every n-th layer is MoE, the others dense
    mlp_only_layers: list[int] = field(default_factory=list)  # layers forced dense
    router_aux_loss_coef: float = 0.001
    # Token ids the tokenizer does not own but generation needs.
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unknown architecture {self.architecture!r}; supported: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        if self.layer_types is None:
            kind = "full_attention" if self.sliding_window is None else "sliding_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..{self.num_experts}"
            )
        if self.hidden_act not in ("silu", "gelu", "gelu_pytorch_tanh"):
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r}; supported: silu, gelu")

    # -- derived ------------------------------------------------------------------------------
    def is_moe_layer(self, i: int) -> bool:
        return (
            self.num_experts > 0
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )

    def window(self, i: int) -> int | None:
        """The sliding window of layer i, or None for full attention."""
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    # -- serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict (transformers 4.x and 5.x spellings)."""
        archs = hf.get("architectures") or []
        if not archs:
            raise ConfigError(
                "config.json has no 'architectures' entry; add e.g. "
                '"architectures": ["LlamaForCausalLM"] (supported: ' + ", ".join(SUPPORTED_ARCHITECTURES) + ")"
            )
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unknown architecture {arch!r} in config.json; supported: " + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        mt = SUPPORTED_ARCHITECTURES[arch]
        get = hf.get
        n_layers = get("num_hidden_layers")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if get(k) is None]
        if missing:
            raise ConfigError(f"config.json for {arch} is missing {', '.join(missing)}")

        # transformers 5 folds rope_theta and the scaling dict into `rope_parameters`.
        rope = dict(get("rope_parameters") or get("rope_scaling") or {})
        theta = rope.pop("rope_theta", get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = rope if kind != "default" else None

        attention_bias = bool(get("attention_bias", False))
        qkv_bias, o_bias = attention_bias, attention_bias
        if mt in ("qwen2", "qwen2_moe"):
            qkv_bias, o_bias = bool(get("qkv_bias", True)), False

        sliding = get("sliding_window")
        layer_types = get("layer_types")
        if mt in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and layer_types is None:
            use = get("use_sliding_window", False) and sliding
            layer_types = [
                "sliding_attention" if use and i >= get("max_window_layers", 0) else "full_attention"
                for i in range(n_layers)
            ]
        if layer_types is not None and "sliding_attention" not in layer_types:
            sliding = None
        if mt in ("mistral", "mixtral") and layer_types is None:
            layer_types = ["sliding_attention" if sliding else "full_attention"] * n_layers
        if not sliding:
            sliding, layer_types = None, ["full_attention"] * n_layers

        moe: dict[str, Any] = {}
        if mt in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
            moe = dict(
                num_experts=get("num_experts") or get("num_local_experts"),
                num_experts_per_tok=get("num_experts_per_tok", 2),
                moe_intermediate_size=get("moe_intermediate_size") or get("intermediate_size"),
                norm_topk_prob=True if mt == "mixtral" else bool(get("norm_topk_prob", False)),
                shared_expert_intermediate_size=get("shared_expert_intermediate_size", 0) if mt == "qwen2_moe" else 0,
                decoder_sparse_step=get("decoder_sparse_step", 1) or 1,
                mlp_only_layers=list(get("mlp_only_layers") or []),
                router_aux_loss_coef=get("router_aux_loss_coef", 0.001),
            )
        eos = get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size", 4 * get("hidden_size")),
            num_hidden_layers=n_layers,
            num_attention_heads=get("num_attention_heads"),
            num_key_value_heads=get("num_key_value_heads"),
            head_dim=get("head_dim"),
            hidden_act=get("hidden_act", "silu"),
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            max_position_embeddings=get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(get("mlp_bias", False)),
            qk_norm={"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(mt),
            clip_qkv=get("clip_qkv"),
            sliding_window=sliding,
            layer_types=list(layer_types),
            bos_token_id=get("bos_token_id"),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            torch_dtype=str(get("torch_dtype") or get("dtype") or "float32"),
            **moe,
        )

    @classmethod
    def from_gguf(cls, metadata_or_path: Any) -> ModelConfig:
        """Build from a GGUF file (path) via the HF-style dict that `weights.gguf` derives."""
        from .weights.gguf import read_gguf_config

        return cls.from_hf_config(read_gguf_config(metadata_or_path))

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])


# Small named shapes for training from scratch and for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
    ),
    "tiny-moe": dict(
        architecture="MixtralForCausalLM", vocab_size=49152, hidden_size=256, intermediate_size=384,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        num_experts=8, num_experts_per_tok=2, tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=[2],
    ),
}
