"""`[lora]`: low-rank adapters on a frozen base (LoRA), the base in 4 bits (QLoRA)."""

from __future__ import annotations

from dataclasses import dataclass

from packtune.config.toml import suggest
from packtune.errors import ConfigError

ALL_LINEAR = "all-linear"
"""`lora.targets` that adapts every linear of the decoder blocks (PEFT's "all-linear")."""
BASE_DTYPES = ("auto", "float32", "bfloat16", "nf4")
EXPORT_MODES = ("adapter", "merged", "both")
"""What a LoRA run's `train.export` may name besides true / false."""

@dataclass
class LoRAConfig:
    """LoRA / QLoRA: train low-rank adapters on a frozen base (see packtune.lora)."""

    rank: int = 0
    """Adapter rank r; 0 (or no [lora] table): full fine-tuning."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapters' input only, in [0, 1)."""
    targets: str | list[str] = "all-linear"
    """all-linear (every linear of the decoder blocks), or a list of the family's projection names:
    q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (Llama, Mistral, Qwen, Gemma);
    qkv_proj, o_proj, gate_up_proj, down_proj (Phi-3); query_key_value, dense, dense_h_to_4h,
    dense_4h_to_h (BLOOM)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(rank)."""
    base_dtype: str = "auto"
    """The frozen base's storage: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, or nf4 (QLoRA:
    4-bit NormalFloat through torchao, the `qlora` extra)."""
    init_from: str = ""
    """A PEFT adapter directory to continue training from (its rank, alpha and targets must match)."""

    @property
    def enabled(self) -> bool:
        """Rank 0 (or no [lora] table) is full fine-tuning."""
        return self.rank > 0

    def check(self) -> None:
        """Every [lora] key; QLoRA's torchao is looked for now, before the data is tokenized."""
        if self.rank < 0:
            raise ConfigError(f"lora.rank must be >= 0 (0: full fine-tuning), got {self.rank}")
        if not self.enabled:
            return
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.base_dtype not in BASE_DTYPES:
            hint = suggest(self.base_dtype, list(BASE_DTYPES))
            raise ConfigError(f"lora.base_dtype: {self.base_dtype!r}{hint}")
        self.resolved_targets()
        if self.base_dtype == "nf4":
            from packtune.lora.qlora import check_nf4_available

            check_nf4_available()

    def resolved_targets(self) -> str | tuple[str, ...]:
        """`all-linear`, or the named projections checked against every family's names."""
        from packtune.model.families import lora_target_names
        from packtune.model.families.decoder import DECODER_LINEARS

        if isinstance(self.targets, str):
            if self.targets != ALL_LINEAR:
                raise ConfigError(f"lora.targets must be \"{ALL_LINEAR}\" or a list of projection names "
                                  f"(e.g. {', '.join(DECODER_LINEARS)}), got {self.targets!r}")
            return ALL_LINEAR
        known = list(lora_target_names())
        for name in self.targets:
            if name not in known:
                raise ConfigError(f"lora.targets: unknown projection {name!r}{suggest(name, known)}")
        if not self.targets:
            raise ConfigError(f"lora.targets is empty; use \"{ALL_LINEAR}\" or name the projections")
        return tuple(dict.fromkeys(self.targets))
