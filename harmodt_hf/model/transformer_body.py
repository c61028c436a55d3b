"""The transformer body of HarmoDT: a GPT-2 stack (pre-LayerNorm blocks, causal attention) without token or position
embeddings, whose linear layers are task-masked (:class:`~harmodt_hf.model.masked_linear.MaskedLinear`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_harmodt import HarmoDTConfig
from .masked_linear import MaskedLinear, TaskGroups

if TYPE_CHECKING:
    from .modeling_harmodt import PromptKeyValues

_ACTIVATIONS = {
    "relu": nn.ReLU,  # applied in place where that is cheaper (see HarmoDTMLP.forward)
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


class BodyLayerNorm(nn.LayerNorm):
    """LayerNorm inside the transformer body (initialised there; outer ones keep PyTorch defaults)."""


class HarmoDTAttention(nn.Module):
    """Causal self-attention with task-masked projections; padding logits get -1e4 as in GPT-2."""

    def __init__(self, config: HarmoDTConfig) -> None:
        super().__init__()
        d, masked = config.hidden_size, config.has_masks
        self.n_head = config.n_head
        self.c_attn = MaskedLinear(d, 3 * d, config.num_tasks, masked)
        self.c_proj = MaskedLinear(d, d, config.num_tasks, masked)
        self.attn_dropout = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor,
        groups: TaskGroups | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_out: list | None = None,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """Attend from ``x``'s tokens to ``past`` keys/values (prompt tokens, if given) and to ``x``'s own; with
        ``kv_out``, this block's keys and values of ``x`` are appended to it; with ``rows``, only the tokens
        ``x[:, rows]`` attend (every token still gives its key and value) and the output holds those tokens only."""
        batch, length, d = x.shape
        q, k, v = self.c_attn(x, groups).split(d, dim=-1)
        q, k, v = (t.view(batch, length, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_out is not None:
            kv_out.append((k, v))
        if rows is not None:
            q, attn_bias = q[:, :, rows], attn_bias[:, :, rows]
            length = q.shape[2]
        if past is not None:
            k, v = torch.cat((past[0].to(k.dtype), k), dim=2), torch.cat((past[1].to(v.dtype), v), dim=2)
        dropout = self.attn_dropout if self.training else 0.0
        dtype = q.dtype
        if q.device.type == "cpu" and dtype != torch.float32 and torch.is_grad_enabled():
            # On CPU, PyTorch's bf16 attention backward is ~3x slower than float32 at our sizes (75 tokens): attend in
            # float32, with autocast off so that it does not cast back. (Without gradients bf16 is the faster.)
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), attn_mask=attn_bias.float(), dropout_p=dropout
                ).to(dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(batch, length, d)
        return self.resid_dropout(self.c_proj(y, groups))


class HarmoDTMLP(nn.Module):
    def __init__(self, config: HarmoDTConfig) -> None:
        super().__init__()
        masked = config.has_masks
        self.c_fc = MaskedLinear(config.hidden_size, config.n_inner, config.num_tasks, masked)
        self.c_proj = MaskedLinear(config.n_inner, config.hidden_size, config.num_tasks, masked)
        self.act = _ACTIVATIONS[config.activation_function]()
        self.relu_in_place = config.activation_function == "relu"
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, groups: TaskGroups | None) -> torch.Tensor:
        hidden = self.c_fc(x, groups)
        # ReLU in place saves a large buffer on the masked layers' output, a tensor of its own. A plain linear's
        # output is a view (of its 2-D matmul), and an in-place op on a view makes autograd clone the whole base in
        # backward: out of place there (an unmasked all_tasks step: 22.5 -> 18.2 s here, benchmarks/RESULTS.md).
        if self.relu_in_place and hidden._base is None:
            hidden = F.relu_(hidden)
        else:
            hidden = self.act(hidden)
        return self.dropout(self.c_proj(hidden, groups))


class HarmoDTBlock(nn.Module):
    """Pre-LayerNorm GPT-2 block."""

    def __init__(self, config: HarmoDTConfig) -> None:
        super().__init__()
        self.ln_1 = BodyLayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = HarmoDTAttention(config)
        self.ln_2 = BodyLayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = HarmoDTMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor,
        groups: TaskGroups | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_out: list | None = None,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """``rows``: finish only the tokens ``x[:, rows]`` (see :meth:`HarmoDTAttention.forward`)."""
        attended = self.attn(self.ln_1(x), attn_bias, groups, past, kv_out, rows)
        x = (x if rows is None else x[:, rows]) + attended
        return x + self.mlp(self.ln_2(x), groups)


class HarmoDTTransformer(nn.Module):
    """The GPT-2 body without token or position embeddings: the part the task masks apply to."""

    def __init__(self, config: HarmoDTConfig) -> None:
        super().__init__()
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(HarmoDTBlock(config) for _ in range(config.n_layer))
        self.ln_f = BodyLayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        groups: TaskGroups | None,
        output_hidden_states: bool = False,
        past: PromptKeyValues | None = None,
        kv_out: list | None = None,
        final_rows: slice | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Run the blocks; ``past`` holds the prompt tokens' keys/values (every token may attend to the real ones),
        ``kv_out`` collects each block's keys/values of these tokens; with ``final_rows``, the last block finishes
        only the tokens ``inputs_embeds[:, final_rows]`` (the output holds those)."""
        length = inputs_embeds.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=inputs_embeds.device).tril()
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
        if past is not None:
            prefix = past.attention_mask[:, None, None, :].bool().expand(-1, 1, length, -1)
            allowed = torch.cat((prefix, allowed), dim=-1)
        attn_bias = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        attn_bias = attn_bias.masked_fill(~allowed, -1e4)
        x = self.drop(inputs_embeds)
        hidden = [x] if output_hidden_states else None
        for index, block in enumerate(self.h):
            rows = final_rows if index == len(self.h) - 1 else None
            x = block(x, attn_bias, groups, past.key_values[index] if past is not None else None, kv_out, rows)
            if hidden is not None:
                hidden.append(x)
        x = self.ln_f(x)
        return x, tuple(hidden) if hidden is not None else None
