"""The DeepSeek-V3 network: embeddings -> decoder blocks (MLA + dense MLP | MoE) -> norm -> head, plus the
Multi-Token Prediction modules (V3 §2.2) used for the training loss and for self-speculative decoding.

State-dict names follow the checkpoint with the `model.` prefix dropped (`layers.3.self_attn.kv_b_proj.weight`),
MTP module k lives at `mtp.{k}` (checkpoint `model.layers.{num_hidden_layers + k}`), and routed experts are
stacked; model/hf.py maps between the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import overload

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.loss import IGNORE_INDEX, linear_cross_entropy
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MLP, Experts, MoE, Router
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: MoE | MLP = (
            MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                balance_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        if isinstance(self.mlp, MoE):
            out, aux = self.mlp(self.post_attention_layernorm(h), balance_loss)
            return h + out, aux
        return h + self.mlp(self.post_attention_layernorm(h)), None


class SharedHead(nn.Module):
    """`shared_head`: the MTP module's own final norm; the projection is the model's lm_head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """MTP module k: h' = eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)]), then a full MoE block, then the shared
    head predicts t_{i+k+1}. Embedding first, as in vLLM and transformers."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,  # type: ignore[override]
                balance_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h: previous depth's representation [B, T, H]; emb: embeddings of the tokens k ahead. Returns the
        normalised output (fed to lm_head and to the next depth) and the block's balance loss."""
        x = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h)), dim=-1))
        x, aux = super().forward(x, cos, sin, balance_loss)
        return self.shared_head.norm(x), aux


@dataclass
class ModelOutput:
    """What a forward pass with labels returns. Losses are token *sums* (with their token counts) so that a
    training loop can normalise by the global number of target tokens across micro-batches and ranks."""

    logits: torch.Tensor | None  # [B, T, vocab]; None when asked not to materialise them
    ce_sum: torch.Tensor  # Σ cross-entropy over target tokens (labels != -100)
    n_tokens: torch.Tensor  # number of target tokens
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k at i predicts t_{i+k+1}
    mtp_ce_sums: list[torch.Tensor] = field(default_factory=list)  # one per MTP depth
    mtp_n_tokens: list[torch.Tensor] = field(default_factory=list)
    balance_loss: torch.Tensor | None = None  # Σ over MoE layers of the sequence-wise balance term

    @property
    def loss(self) -> torch.Tensor:
        """Mean main cross-entropy per target token."""
        return self.ce_sum / self.n_tokens.clamp(min=1)

    @property
    def mtp_loss(self) -> torch.Tensor | None:
        """Mean over depths of each depth's mean cross-entropy (V3 eq. 25 without λ)."""
        if not self.mtp_ce_sums:
            return None
        per_depth = [s / n.clamp(min=1) for s, n in zip(self.mtp_ce_sums, self.mtp_n_tokens)]
        return torch.stack(per_depth).mean()


class NanoSeek(nn.Module):
    """DeepSeek-V3 for causal language modelling. `model(input_ids)` -> logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        n = config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(n))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPLayer(config, n + k) for k in range(config.num_nextn_predict_layers))
        self.rotary_emb = RotaryEmbedding(config)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the output head when the config says so (again after to_empty,
        which allocates each parameter separately)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # ---- initialisation ----------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, initializer_range) for every matrix (V3 §4.2: std 0.006), ones for norms, zeros for biases
        and the routing bias. Also (re)computes the non-persistent buffers."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, Experts):
                nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
                nn.init.normal_(module.down_proj, mean=0.0, std=std)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Non-persistent state: rotary frequencies and the expert-load counters (after loading on `meta`)."""
        self.rotary_emb.reset_parameters()
        for module in self.modules():
            if isinstance(module, Router):
                module.expert_load.zero_()

    # ---- forward -----------------------------------------------------------------------------------
    @overload
    def forward(self, input_ids: torch.Tensor, labels: None = None, *, position_ids: torch.Tensor | None = None,
                balance_loss: bool = False, return_logits: bool = True) -> torch.Tensor: ...

    @overload
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                balance_loss: bool = False, return_logits: bool = True) -> ModelOutput: ...

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, balance_loss: bool = False,
                return_logits: bool = True) -> torch.Tensor | ModelOutput:
        """input_ids [B, T] -> logits [B, T, vocab]. With labels [B, T] (the next token at each position,
        -100 to skip) -> ModelOutput with the main and MTP losses. MTP never changes the main logits.
        `return_logits=False` (training) fuses head and loss and never materialises the logits."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if self.config.max_position_embeddings < T:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)
        cos, sin = self.rotary_emb(position_ids)
        emb = self.embed_tokens(input_ids)
        h = emb
        aux_terms: list[torch.Tensor] = []
        for layer in self.layers:
            h, aux = layer(h, cos, sin, balance_loss)
            if aux is not None:
                aux_terms.append(aux)
        h = self.norm(h)
        if labels is None:
            return self.lm_head(h)

        logits = self.lm_head(h) if return_logits else None
        out = ModelOutput(logits=logits, ce_sum=self._ce_sum(h, logits, labels),
                          n_tokens=(labels != IGNORE_INDEX).sum())
        # MTP depth k at position i sees token t_{i+k} and predicts t_{i+k+1} = labels[i+k]. Rolling the inputs
        # left by k keeps the sequence length (same rope, same causal mask); the k wrapped-around positions at
        # the end are causal-invisible to the others and excluded from the loss.
        for k, mtp in enumerate(self.mtp, start=1):
            mtp_labels = labels.roll(-k, dims=1)
            mtp_labels[:, -k:] = IGNORE_INDEX
            h, aux = mtp(h, self.embed_tokens(input_ids.roll(-k, dims=1)), cos, sin, balance_loss)
            if aux is not None:
                aux_terms.append(aux)
            mtp_logits = self.lm_head(h) if return_logits else None
            if mtp_logits is not None:
                out.mtp_logits.append(mtp_logits)
            out.mtp_ce_sums.append(self._ce_sum(h, mtp_logits, mtp_labels))
            out.mtp_n_tokens.append((mtp_labels != IGNORE_INDEX).sum())
        if balance_loss and aux_terms:
            out.balance_loss = torch.stack(aux_terms).sum()
        return out

    def _ce_sum(self, h: torch.Tensor, logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Σ token cross-entropy: from the logits when they exist, else fused with the head (model/loss.py)."""
        if logits is not None:
            return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        return linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, labels.flatten())

    # ---- conveniences ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> NanoSeek:
        from nanoseek.model.hf import load_pretrained

        return load_pretrained(path, **kwargs)

    def save_pretrained(self, path: str, **kwargs) -> None:
        from nanoseek.model.hf import save_pretrained

        save_pretrained(self, path, **kwargs)

    def num_parameters(self, active: bool = False, mtp: bool = False) -> int:
        """Parameters of the main model (tied weights once); `active`: those one token uses (routed experts
        k of E); `mtp`: include the MTP modules."""
        from nanoseek.model.summary import parameter_counts

        rows = [r for r in parameter_counts(self) if mtp or r.component != "MTP modules"]
        return sum(r.active if active else r.total for r in rows)
