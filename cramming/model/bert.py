"""The crammed BERT (Geiping & Goldstein, 2022): config dataclass first, then small modules.

Defaults are the crammed recipe: no bias in any linear layer, GEGLU feed-forward at the original
width (3072 split into two halves of 1536), pre-LayerNorm blocks with a final LayerNorm, scaled
sinusoidal positions with LayerNorm after the embedding, tied input/output embeddings and a plain
(no transform, no bias) MLM head that scores only the masked positions; given fixed masked
positions, the last block computes only those rows too. Every other choice of the
original BERT is an option, for the paper's ablations. Knows nothing of Hydra.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cramming.checks import validate
from cramming.errors import ConfigError
from cramming.model import random_ltd
from cramming.model.attention import AttentionBackend, get_backend, varlen_attention
from cramming.model.unpadding import Rows, Unpadded, unpad


@dataclass
class ModelConfig:
    """Architecture of a crammed BERT; one field per `arch.*` key."""

    name: str = "crammed-bert"
    """Preset name (the arch config file this came from)."""
    vocab_size: int = 32768
    """Tokenizer vocabulary size (2^15 in the paper)."""
    hidden_size: int = 768
    """Width of the residual stream."""
    num_layers: int = 16
    """Transformer blocks (the reference crammed BERT uses 16)."""
    num_heads: int = 12
    """Attention heads; must divide hidden_size."""
    intermediate_size: int = 3072
    """Feed-forward projection width; GEGLU splits it into two halves (value, gate)."""
    max_seq_len: int = 128
    """Longest sequence the position embedding covers."""
    position: Literal["scaled-sinusoidal", "sinusoidal", "learned", "rotary"] = "scaled-sinusoidal"
    """Positions: fixed sinusoid times one learned scalar, plain sinusoid, learned table, or rotary in attention."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation layer type."""
    norm_position: Literal["pre", "post"] = "pre"
    """Pre-LN (normalise the branch input) or post-LN (normalise after the residual add, original BERT)."""
    final_norm: bool = True
    """A norm after the last block (needed with pre-LN)."""
    ffn: Literal["geglu", "gelu"] = "geglu"
    """Feed-forward: gated GELU unit or the original GELU MLP."""
    bias: bool = False
    """Biases in the linear layers (QKV, attention output, FFN, head transform)."""
    head: Literal["simple", "nonlinear"] = "simple"
    """MLM head: straight to the decoder, or BERT's dense + GELU + norm transform first."""
    decoder_bias: bool = False
    """A bias on the vocabulary projection."""
    tie_embeddings: bool = True
    """Decode with the input embedding matrix instead of a separate one."""
    embedding_norm: bool = True
    """Normalise the summed embeddings."""
    token_types: int = 0
    """Segment (token type) embeddings; original BERT has 2 and, without type ids, always adds type 0."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities, branch outputs and the classifier input; 0 in pretraining."""
    attention_backend: AttentionBackend = "sdpa"
    """Attention kernel: sdpa (torch fused kernels), eager (reference), flash (flash-attn package)."""
    sparse_prediction: bool = True
    """Project and score only the masked positions (labels != -100) in training."""
    init_std: float = 0.02
    """Standard deviation of the normal init of linear and embedding weights."""
    layer_norm_eps: float = 1e-12
    """Epsilon of the norm layers."""
    pad_token_id: int = 0
    """Id of [PAD] (the tokenizer's first special token)."""
    rotary_base: float = 10000.0
    """Base of the rotary frequencies (position=rotary only)."""

    def __post_init__(self) -> None:
        sizes = {k: getattr(self, k) for k in
                 ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_seq_len")}
        # The sizes first: the rules below divide by them.
        validate(self, "arch", [(isinstance(v, int) and v >= 1, f"{k} must be a positive integer, got {v!r}")
                                for k, v in sizes.items()])
        validate(self, "arch", [
            (self.hidden_size % self.num_heads == 0,
             f"hidden_size={self.hidden_size} must be divisible by arch.num_heads={self.num_heads}"),
            (self.position != "rotary" or self.head_dim % 2 == 0,
             f"position=rotary needs an even head size (hidden_size / num_heads), got {self.head_dim}"),
            (self.ffn != "geglu" or self.intermediate_size % 2 == 0,
             f"ffn=geglu splits intermediate_size in two; {self.intermediate_size} is odd"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.init_std > 0, f"init_std must be > 0, got {self.init_std}"),
            (self.layer_norm_eps > 0, f"layer_norm_eps must be > 0, got {self.layer_norm_eps}"),
            (self.token_types >= 0, f"token_types must be >= 0, got {self.token_types}"),
            (0 <= self.pad_token_id < self.vocab_size,
             f"pad_token_id={self.pad_token_id} must be inside the vocabulary [0, arch.vocab_size={self.vocab_size})"),
        ])

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """The fixed sinusoid of Vaswani et al.: [length, dim], sin on even and cos on odd channels."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table


class Embeddings(nn.Module):
    """Token embedding + positions (+ segment 0), then norm and dropout."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.position_kind = config.position
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position == "learned":
            self.position_embeddings = nn.Embedding(config.max_seq_len, config.hidden_size)
        elif config.position in ("sinusoidal", "scaled-sinusoidal"):
            # Persistent so that exported folders are self-contained (loaders never recompute it).
            self.register_buffer("sinusoid", sinusoid_table(config.max_seq_len, config.hidden_size))
            if config.position == "scaled-sinusoidal":
                self.position_scale = nn.Parameter(torch.tensor(1.0 / math.sqrt(config.hidden_size)))
        if config.token_types:
            self.token_type_embeddings = nn.Embedding(config.token_types, config.hidden_size)
        self.norm = make_norm(config) if config.embedding_norm else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, batch: Unpadded | None = None) -> torch.Tensor:
        """input_ids [B, L] -> [B, L, H]; or the packed real tokens [T] of `batch` -> [T, H]."""
        x = self.word_embeddings(input_ids)
        positions = slice(0, input_ids.shape[1]) if batch is None else batch.positions
        if self.position_kind == "learned":
            x = x + self.position_embeddings.weight[positions]
        elif self.position_kind == "sinusoidal":
            x = x + self.sinusoid[positions]
        elif self.position_kind == "scaled-sinusoidal":
            x = x + self.position_scale * self.sinusoid[positions]
        if hasattr(self, "token_type_embeddings"):
            x = x + self.token_type_embeddings.weight[0]
        x = self.norm(x)
        return self.dropout(x) if batch is None else batch.dropout(x, self.dropout.p, self.training)


class Rotary(nn.Module):
    """cos/sin tables of rotary position embedding (Su et al.), applied to q and k in attention."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / config.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        angles = torch.arange(config.max_seq_len, dtype=torch.float32)[:, None] * inv_freq  # [L, D/2]
        angles = torch.cat([angles, angles], dim=-1)  # [L, D]
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def forward(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[None, None, :length], self.sin[None, None, :length]  # [1, 1, L, D] each

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables at each packed token's position [T] -> [T, 1, D] each (broadcast over heads)."""
        return self.cos[positions, None], self.sin[positions, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.dropout = config.num_heads, config.dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)
        self.out = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.backend = get_backend(config.attention_backend)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | Unpadded | None, rope: tuple | None,
        query_idx: torch.Tensor | Rows | None = None,
    ) -> torch.Tensor:
        """x [B, L, H] -> [B, L, H], or [B, K, H] for only the queries at `query_idx` [B, K].

        Unpadded (`mask` is the batch's layout): packed tokens x [T, H] -> [T, H], or [N, H] for the
        `query_idx` rows only; `rope` is then the tables at each token's position, [T, 1, D] each.
        """
        if isinstance(mask, Unpadded):
            return self._packed(x, mask, rope, query_idx)
        batch = x.shape[0]
        q, k, v = self._project(x, None if query_idx is None else random_ltd.gather(x, query_idx))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, nh, L or K, D]
        if rope is not None:
            q_rope = rope if query_idx is None else random_ltd.gather_rope(rope, query_idx, batch)
            q, k = apply_rotary(q, *q_rope), apply_rotary(k, *rope)
        out = self.backend(q, k, v, mask, self.dropout, self.training)  # [B, nh, L or K, D]
        return self.out(out.transpose(1, 2).flatten(2))

    def _packed(self, x: torch.Tensor, batch: Unpadded, rope: tuple | None, queries: Rows | None) -> torch.Tensor:
        q, k, v = self._project(x, None if queries is None else x.index_select(0, queries.packed))  # [T or N, nh, D]
        if rope is not None:
            q_rope = rope if queries is None else tuple(r.index_select(0, queries.packed) for r in rope)
            q, k = apply_rotary(q, *q_rope), apply_rotary(k, *rope)
        out = varlen_attention(q, k, v, batch, queries, self.dropout, self.training, self.backend)
        return self.out(out.flatten(1))

    def _project(self, x: torch.Tensor, query_x: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """q, k, v [..., nh, D] from x [..., H]; with `query_x`, q from those rows only."""
        hidden = x.shape[-1]
        heads = (self.num_heads, hidden // self.num_heads)
        if query_x is None:
            return self.qkv(x).unflatten(-1, (3, *heads)).unbind(-3)
        # Keys and values from every token, queries only where outputs are wanted: the same weight
        # split as the fused projection, so results equal the full layer's at those rows.
        weight, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(query_x, weight[:hidden], None if bias is None else bias[:hidden]).unflatten(-1, heads)
        kv = F.linear(x, weight[hidden:], None if bias is None else bias[hidden:])
        return q, *kv.unflatten(-1, (2, *heads)).unbind(-3)


class FeedForward(nn.Module):
    """GEGLU (GELU(x W) * x V, each half of the projection) or the original GELU MLP."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gated = config.ffn == "geglu"
        inner = config.intermediate_size // 2 if self.gated else config.intermediate_size
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.down = nn.Linear(inner, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # [B, L, I]
        if self.gated:
            value, gate = x.chunk(2, dim=-1)  # 2 x [B, L, I/2]
            return self.down(F.gelu(gate) * value)
        return self.down(F.gelu(x))


class Block(nn.Module):
    """Attention and feed-forward branches with residuals; pre-LN or post-LN."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.norm1, self.norm2 = make_norm(config), make_norm(config)
        self.attn = Attention(config)
        self.ffn = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | Unpadded | None = None, rope: tuple | None = None,
        query_idx: torch.Tensor | Rows | None = None,
    ) -> torch.Tensor:
        """x [B, L, H] -> [B, L, H]; with `query_idx` [B, K], only those rows' outputs: [B, K, H].

        Unpadded (`mask` is the batch's layout): packed x [T, H] -> [T, H], or [N, H] for the Rows `query_idx`.
        """
        # Every sub-layer but attention's keys and values is per token, so rows nobody reads
        # (unmasked positions after the last block) need no residual, norm or feed-forward work.
        if isinstance(mask, Unpadded):
            rows = x if query_idx is None else x.index_select(0, query_idx.packed)
            drop = functools.partial(mask.dropout, p=self.dropout.p, training=self.training, rows=query_idx)
        else:
            rows = x if query_idx is None else random_ltd.gather(x, query_idx)
            drop = self.dropout
        if self.pre_norm:
            rows = rows + drop(self.attn(self.norm1(x), mask, rope, query_idx))
            return rows + drop(self.ffn(self.norm2(rows)))
        rows = self.norm1(rows + drop(self.attn(x, mask, rope, query_idx)))
        return self.norm2(rows + drop(self.ffn(rows)))


class Encoder(nn.Module):
    """Embeddings, blocks and the final norm: input ids [B, L] -> hidden states [B, L, H]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(config)
        self.rotary = Rotary(config) if config.position == "rotary" else None
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = make_norm(config) if config.final_norm else nn.Identity()
        self.unpadded = False
        """Run batches with an attention mask on their real tokens only (`use_unpadding`)."""

    def use_unpadding(self, enabled: bool = True) -> None:
        """Given an attention mask, compute on the real tokens only: see `_forward_unpadded`."""
        self.unpadded = enabled

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, keep_tokens: int | None = None,
        output_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, L, H], or [B, K, H] at `output_positions` [B, K] only.

        With output positions the last block computes only those rows (its keys and values still
        come from every token), which gives the same values as gathering them from the full output.
        """
        length = input_ids.shape[1]
        drop = self.training and keep_tokens is not None and keep_tokens < length
        if self.unpadded and attention_mask is not None:
            if drop:
                raise ValueError("random-LTD (keep_tokens) drops positions of the padded batch; turn unpadding off")
            return self._forward_unpadded(input_ids, attention_mask, output_positions)
        x = self.embeddings(input_ids)
        # [B, L] with 1 = real token -> a boolean key mask [B, 1, 1, L] broadcast over heads and queries.
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        rope = self.rotary(length) if self.rotary is not None else None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if drop and 0 < i < last:
                x = random_ltd.apply_layer(layer, x, keep_tokens, mask, rope)
            else:
                x = layer(x, mask, rope, output_positions if i == last else None)
        return self.final_norm(x)

    def _forward_unpadded(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_positions: torch.Tensor | None
    ) -> torch.Tensor:
        """`forward` on the real tokens only: the same values at real positions (zeros at padding).

        Embeddings, projections, feed-forward, norms and residuals run on the packed tokens [T, H];
        attention places them by sequence (`varlen_attention`). Dropout draws the padded path's masks.
        """
        batch = unpad(attention_mask)
        x = self.embeddings(batch.pack(input_ids), batch)  # [T, H]
        rope = self.rotary.at(batch.positions) if self.rotary is not None else None
        queries = None if output_positions is None else batch.rows(output_positions)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, batch, rope, queries if i == last else None)
        x = self.final_norm(x)  # [T, H], or [B * K, H] at the output positions
        return batch.pad(x) if queries is None else x.view(*output_positions.shape, -1)


def init_weights(module: nn.Module, std: float) -> None:
    """Normal(0, std) for linear and embedding weights, zeros for biases (BERT's init)."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, std=std)
        if isinstance(sub, nn.Linear) and sub.bias is not None:
            nn.init.zeros_(sub.bias)


class MLMHead(nn.Module):
    """Optional BERT transform, then the vocabulary projection (tied to the input embedding by default)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.head == "nonlinear":
            self.transform = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias), nn.GELU(), make_norm(config)
            )
        else:
            self.transform = nn.Identity()
        if not config.tie_embeddings:
            self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size)) if config.decoder_bias else None

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        # Tying by using the embedding matrix here (not by sharing a Parameter) keeps state dicts,
        # safetensors and transformers' loaders free of aliased tensors.
        weight = self.decoder.weight if hasattr(self, "decoder") else embedding
        return F.linear(self.transform(hidden), weight, self.bias)


def target_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of hidden [B, L, H] that are targets (labels [B, L] != -100) and their labels: [N, H], [N]."""
    labels = labels.reshape(-1)
    selected = labels != -100  # data-dependent shape: fine in eager, a graph break under compile
    return hidden.reshape(-1, hidden.shape[-1])[selected], labels[selected]


class CrammedBertForMLM(nn.Module):
    """Encoder + MLM head. Training scores only masked positions when `sparse_prediction` is on."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = Encoder(config)
        self.head = MLMHead(config)
        init_weights(self, config.init_std)

    def use_sparse_embedding_grad(self, enabled: bool = True) -> bool:
        """Let the input lookup hand its gradient back as rows instead of a dense [V, H] table.

        With tied embeddings the decoder already gives the table a dense gradient, and autograd adds
        the rows into it in place: no zero-filled second table and no table-sized add, 8% of an
        eager CPU step at hidden 768 / vocab 32768 (docs/benchmarks.md). The optimizer still sees a
        dense gradient. Off by default: DistributedDataParallel rejects a sparse-flagged embedding
        whose gradient arrives dense, and compiled graphs gain nothing from it. Returns the setting
        in effect (always off for untied embeddings, whose only gradient would be sparse).
        """
        on = enabled and self.config.tie_embeddings
        self.bert.embeddings.word_embeddings.sparse = on
        return on

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        keep_tokens: int | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """input_ids [B, L]; labels [B, L] (-100 = not a target); masked_positions [B, K] (distinct).

        Returns `logits` [B, L, V] (dense), [B, K, V] (masked_positions) or [N, V] (sparse, N masked
        tokens of the batch), and the mean cross-entropy over targets as `loss` when labels are given.
        With `sparse_prediction` off, masked_positions is ignored: the head scores every position.
        """
        sparse = self.config.sparse_prediction
        if masked_positions is not None and sparse:
            # Static shapes for compile: a fixed number K of positions per row. The encoder's last
            # block computes only these rows (see Encoder.forward).
            hidden = self.bert(input_ids, attention_mask, keep_tokens, output_positions=masked_positions)  # [B, K, H]
            if labels is not None:
                labels = labels.gather(1, masked_positions)  # [B, K]
            return self._scored(hidden, labels)
        hidden = self.bert(input_ids, attention_mask, keep_tokens)  # [B, L, H]
        if labels is not None and sparse:
            hidden, labels = target_rows(hidden, labels)
        return self._scored(hidden, labels)

    def _scored(self, hidden: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        logits = self.head(hidden, self.bert.embeddings.word_embeddings.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        return {"loss": loss, "logits": logits}


class CrammedBertForSequenceClassification(nn.Module):
    """Encoder + [CLS] pooler (dense, tanh) + dropout + linear; one label means regression (MSE)."""

    def __init__(self, config: ModelConfig, num_labels: int) -> None:
        super().__init__()
        if num_labels < 1:
            raise ConfigError(f"num_labels must be >= 1, got {num_labels}")
        self.config, self.num_labels = config, num_labels
        self.bert = Encoder(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        init_weights(self, config.init_std)

    def use_unpadding(self, enabled: bool = True) -> None:
        """Skip the padding of batches that come with an attention mask: same outputs and gradients.

        Token-wise work runs on the real tokens only, the last block on [CLS] only. For eager steps: the
        token count is a data-dependent shape, so torch.compile breaks the graph where the layout is
        built (and with dynamic=False compiles again for each new count), and vmap rejects it.
        """
        self.bert.use_unpadding(enabled)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        # Only [CLS] is pooled: unpadded, the last block computes that row alone (Encoder.forward).
        cls = input_ids.new_zeros(input_ids.shape[0], 1) if self.bert.unpadded else None
        hidden = self.bert(input_ids, attention_mask, output_positions=cls)  # random-LTD is never used in finetuning
        pooled = torch.tanh(self.pooler(hidden[:, 0]))  # [B, H]
        logits = self.classifier(self.dropout(pooled))  # [B, num_labels]
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return {"loss": loss, "logits": logits}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_flops_per_sequence(
    config: ModelConfig, seq_len: int, num_masked: int, fixed_positions: bool = False
) -> float:
    """Model FLOPs of one forward + backward pass over one sequence (for MFU).

    Counts matrix multiplications only, 2 FLOPs per multiply-add, and the backward pass as twice
    the forward (the usual 6 * params * tokens rule): per token and layer the QKV, output and
    feed-forward projections, plus attention's q k^T and probs @ v (2 * L * H multiply-adds per
    query); the head's transform and vocabulary projection over the predicted positions only
    (`num_masked` with sparse prediction, all `seq_len` otherwise). With sparse prediction and
    `fixed_positions` (the model is given masked_positions), the last block computes queries,
    output projection and feed-forward for the `num_masked` positions only, as the model does.
    Embedding lookups, norms, activations and softmax are not counted; random-LTD savings are not
    subtracted.
    """
    h, inter = config.hidden_size, config.intermediate_size
    ffn = h * inter + (inter // 2) * h if config.ffn == "geglu" else 2 * h * inter
    per_query = 2 * h * h + ffn + 2 * seq_len * h  # Q and output projections, FFN, the two attention products
    per_token_layer = 2 * h * h + per_query  # + K and V projections
    predicted = num_masked if config.sparse_prediction else seq_len
    head = (h * h if config.head == "nonlinear" else 0) + h * config.vocab_size
    if config.sparse_prediction and fixed_positions:
        layers = seq_len * (config.num_layers - 1) * per_token_layer + seq_len * 2 * h * h + num_masked * per_query
    else:
        layers = seq_len * config.num_layers * per_token_layer
    return 6.0 * (layers + predicted * head)
