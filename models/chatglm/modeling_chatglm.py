"""The original GLM-4 checkpoint's architecture (``ChatGLMForConditionalGeneration``), written for glm4-intel.

THUDM/glm-4-9b-chat ships its model as remote code. This is the project's own implementation of that
published architecture, so that test models of that kind can be made and run without the hub. What is
kept is the checkpoint's interface, which the tools that support the checkpoint rely on: the parameter
names (``transformer.embedding.word_embeddings``, ``transformer.encoder.layers[i].self_attention
.query_key_value`` ...), the module attributes that optimum-intel's export patcher and IPEX's ChatGLM
fusions read, batch-first hidden states, a key/value cache laid out [batch, kv groups, tokens, head dim],
and a boolean attention mask that is True where attention is blocked.

Numerics: RMSNorm; grouped (multi-query) attention with ``multi_query_group_num`` key/value groups;
rotary embedding on the first half of each head in interleaved pairs, base 10000 x ``rope_ratio``;
SwiGLU MLP with gate and up projections fused in ``dense_h_to_4h`` (gate first).
"""

import math
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_chatglm import ChatGLMConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and returned in the input's dtype."""

    def __init__(self, normalized_shape, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return (self.weight * hidden_states).to(dtype)


class RotaryEmbedding(nn.Module):
    """Cos/sin table for ``dim`` rotated channels (dim/2 interleaved pairs), base 10000 x rope_ratio."""

    def __init__(self, dim, rope_ratio=1.0, device=None, dtype=None):
        super().__init__()
        self.dim, self.rope_ratio = dim, rope_ratio
        # Holds no values the table uses: it gives the table its device, and its dtype in half precision.
        self.register_buffer("inv_freq", torch.zeros(dim // 2, device=device, dtype=dtype), persistent=False)

    def forward(self, max_seq_len):
        """[max_seq_len, dim/2, 2]: cos and sin of position x frequency."""
        device = self.inv_freq.device
        base = 10000.0 * self.rope_ratio
        theta = 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), theta)
        table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
        if self.inv_freq.dtype in (torch.float16, torch.bfloat16):
            table = table.to(self.inv_freq.dtype)
        return table


def apply_rotary_pos_emb(x, rope):
    """Rotate the first channels of ``x`` [b, heads, tokens, head dim] by ``rope`` [b, tokens, pairs, 2]."""
    b, heads, tokens, _ = x.shape
    rotated = rope.shape[-2] * 2
    x, x_pass = x[..., :rotated], x[..., rotated:]
    pairs = x.reshape(b, heads, tokens, rotated // 2, 2)
    rope = rope[:, :tokens].reshape(b, 1, tokens, rotated // 2, 2)
    cos, sin = rope[..., 0], rope[..., 1]
    out = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    return torch.cat((out.flatten(3), x_pass), dim=-1)


class CoreAttention(nn.Module):
    """softmax(q k^T / sqrt(head dim)) v over [b, heads, tokens, head dim]; returns [b, tokens, heads x head dim]."""

    def __init__(self, config, layer_number):
        super().__init__()
        self.layer_number = max(1, layer_number)
        self.hidden_size_per_attention_head = config.kv_channels
        self.num_attention_heads_per_partition = config.num_attention_heads
        self.hidden_size_per_partition = config.kv_channels * config.num_attention_heads
        # The Megatron-style split of the scale (read by IPEX): norm_factor / coeff == sqrt(head dim).
        self.coeff = self.layer_number if config.apply_query_key_layer_scaling else None
        self.norm_factor = math.sqrt(self.hidden_size_per_attention_head) * (self.coeff or 1)
        self.attention_dropout = config.attention_dropout

    def forward(self, query_layer, key_layer, value_layer, attention_mask):
        causal = attention_mask is None and query_layer.shape[2] == key_layer.shape[2] and query_layer.shape[2] > 1
        allowed = None if attention_mask is None else ~attention_mask
        context = F.scaled_dot_product_attention(query_layer, key_layer, value_layer, attn_mask=allowed,
                                                 dropout_p=self.attention_dropout if self.training else 0.0,
                                                 is_causal=causal)
        context = context.transpose(1, 2).contiguous()
        return context.reshape(context.shape[0], context.shape[1], self.hidden_size_per_partition)


class SelfAttention(nn.Module):
    """Fused q/k/v projection, rotary embedding, grouped attention and the output projection."""

    def __init__(self, config, layer_number, device=None):
        super().__init__()
        self.layer_number = max(1, layer_number)
        self.projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_attention_head = config.kv_channels
        self.num_attention_heads_per_partition = config.num_attention_heads
        self.multi_query_attention = config.multi_query_attention
        self.num_multi_query_groups_per_partition = (config.multi_query_group_num if config.multi_query_attention
                                                     else config.num_attention_heads)
        self.qkv_hidden_size = (self.projection_size + 2 * self.hidden_size_per_attention_head
                                * self.num_multi_query_groups_per_partition)
        self.query_key_value = nn.Linear(config.hidden_size, self.qkv_hidden_size,
                                         bias=config.add_bias_linear or config.add_qkv_bias, device=device)
        self.core_attention = CoreAttention(config, self.layer_number)
        self.dense = nn.Linear(self.projection_size, config.hidden_size, bias=config.add_bias_linear, device=device)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True):
        b, tokens, _ = hidden_states.shape
        heads, groups, size = (self.num_attention_heads_per_partition, self.num_multi_query_groups_per_partition,
                               self.hidden_size_per_attention_head)
        query, key, value = self.query_key_value(hidden_states).split([heads * size, groups * size, groups * size],
                                                                      dim=-1)
        query = query.view(b, tokens, heads, size).transpose(1, 2)
        key = key.view(b, tokens, groups, size).transpose(1, 2)
        value = value.view(b, tokens, groups, size).transpose(1, 2)
        if rotary_pos_emb is not None:
            query = apply_rotary_pos_emb(query, rotary_pos_emb)
            key = apply_rotary_pos_emb(key, rotary_pos_emb)
        if kv_cache is not None and use_cache:
            key, value = kv_cache.update(key, value, self.layer_number - 1)
        if heads != groups:
            key = key.repeat_interleave(heads // groups, dim=1)
            value = value.repeat_interleave(heads // groups, dim=1)
        context = self.core_attention(query, key, value, attention_mask)
        return self.dense(context), kv_cache


def swiglu(x):
    """SiLU of the first half (gate) times the second half (up)."""
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


class MLP(nn.Module):
    """hidden -> 2 x ffn (gate and up, fused) -> SwiGLU -> hidden."""

    def __init__(self, config, device=None):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size * 2, bias=config.add_bias_linear,
                                       device=device)
        self.activation_func = swiglu
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear,
                                       device=device)

    def forward(self, hidden_states):
        return self.dense_4h_to_h(self.activation_func(self.dense_h_to_4h(hidden_states)))


def make_norm(config, device=None):
    if not config.rmsnorm:
        return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device)
    return RMSNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device)


class GLMBlock(nn.Module):
    """One transformer layer: pre-norm attention and pre-norm MLP, each with a residual connection."""

    def __init__(self, config, layer_number, device=None):
        super().__init__()
        self.layer_number = layer_number
        self.apply_residual_connection_post_layernorm = config.apply_residual_connection_post_layernorm
        self.fp32_residual_connection = config.fp32_residual_connection
        self.input_layernorm = make_norm(config, device)
        self.self_attention = SelfAttention(config, layer_number, device=device)
        self.hidden_dropout = config.hidden_dropout
        self.post_attention_layernorm = make_norm(config, device)
        self.mlp = MLP(config, device=device)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True):
        normed = self.input_layernorm(hidden_states)
        attention, kv_cache = self.self_attention(normed, attention_mask, rotary_pos_emb, kv_cache=kv_cache,
                                                  use_cache=use_cache)
        residual = normed if self.apply_residual_connection_post_layernorm else hidden_states
        hidden = residual + F.dropout(attention, p=self.hidden_dropout, training=self.training)
        normed = self.post_attention_layernorm(hidden)
        residual = normed if self.apply_residual_connection_post_layernorm else hidden
        return residual + F.dropout(self.mlp(normed), p=self.hidden_dropout, training=self.training), kv_cache


class GLMTransformer(nn.Module):
    """The stack of layers and the final norm."""

    def __init__(self, config, device=None):
        super().__init__()
        self.num_layers = config.num_layers
        self.post_layer_norm = config.post_layer_norm
        self.layers = nn.ModuleList([GLMBlock(config, i + 1, device=device) for i in range(self.num_layers)])
        if self.post_layer_norm:
            self.final_layernorm = make_norm(config, device)
        self.gradient_checkpointing = False

    def _get_layer(self, layer_number):
        return self.layers[layer_number]

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_caches=None, use_cache=True,
                output_hidden_states=False):
        all_hidden_states = () if output_hidden_states else None
        for index in range(self.num_layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, kv_caches = self._get_layer(index)(hidden_states, attention_mask, rotary_pos_emb,
                                                              kv_cache=kv_caches, use_cache=use_cache)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if self.post_layer_norm:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states, kv_caches if use_cache else None, all_hidden_states, None


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GLMBlock"]
    _supports_cache_class = True
    _supports_sdpa = True
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()

    def get_position_ids(self, input_ids, device):
        batch_size, seq_length = input_ids.shape
        return torch.arange(seq_length, dtype=torch.long, device=device).unsqueeze(0).repeat(batch_size, 1)


class Embedding(nn.Module):
    """Token embeddings, batch first."""

    def __init__(self, config, device=None):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, self.hidden_size, device=device)
        self.fp32_residual_connection = config.fp32_residual_connection

    def forward(self, input_ids):
        embeddings = self.word_embeddings(input_ids)
        return embeddings.float() if self.fp32_residual_connection else embeddings


class ChatGLMModel(ChatGLMPreTrainedModel):
    """Embedding, rotary table, encoder and output layer (logits are computed by the caller)."""

    def __init__(self, config, device=None, empty_init=False):
        super().__init__(config)
        self.embedding = Embedding(config, device=device)
        self.num_layers = config.num_layers
        self.multi_query_group_num = config.multi_query_group_num
        self.kv_channels = config.kv_channels
        self.seq_length = config.seq_length
        self.pre_seq_len = None  # prefix tuning (P-tuning v2) is not implemented
        rotary_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.rotary_pos_emb = RotaryEmbedding(rotary_dim // 2, rope_ratio=config.rope_ratio, device=device)
        self.encoder = GLMTransformer(config, device=device)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False, device=device)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def get_masks(self, input_ids, past_key_values, padding_mask=None):
        """[b, 1, tokens, past + tokens] booleans, True where a token may not attend (future or padding)."""
        batch_size, seq_length = input_ids.shape
        past_length = cache_length(past_key_values)
        allowed = torch.ones(batch_size, seq_length, seq_length, device=input_ids.device).tril_()
        if past_length:
            allowed = torch.cat((torch.ones(batch_size, seq_length, past_length, device=input_ids.device), allowed),
                                dim=-1)
        if padding_mask is not None:
            allowed = allowed * padding_mask.unsqueeze(1)
            if not past_length:  # a padding row attends to itself, so that softmax never sees a row of -inf
                allowed -= padding_mask.unsqueeze(-1) - 1
        return (allowed < 0.5).bool().unsqueeze(1)

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, full_attention_mask=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, output_hidden_states=None,
                return_dict=None):
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        batch_size, seq_length = inputs_embeds.shape[:2]
        if use_cache and not isinstance(past_key_values, Cache):
            past_key_values = (DynamicCache.from_legacy_cache(past_key_values) if past_key_values
                               else DynamicCache())
        past_length = cache_length(past_key_values)
        if full_attention_mask is None and input_ids is not None:
            if (attention_mask is not None and not attention_mask.all()) or (past_length and seq_length != 1):
                full_attention_mask = self.get_masks(input_ids, past_key_values, padding_mask=attention_mask)
        rotary_pos_emb = self.rotary_pos_emb(self.seq_length)
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + seq_length, device=inputs_embeds.device)[None]
        rotary_pos_emb = rotary_pos_emb[position_ids]
        hidden_states, presents, all_hidden_states, _ = self.encoder(
            inputs_embeds, full_attention_mask, rotary_pos_emb=rotary_pos_emb,
            kv_caches=past_key_values if use_cache else None, use_cache=use_cache,
            output_hidden_states=output_hidden_states)
        if not return_dict:
            return tuple(v for v in (hidden_states, presents, all_hidden_states) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=presents,
                                       hidden_states=all_hidden_states)


def cache_length(past_key_values):
    """Tokens already in a Cache or a legacy ((key, value), ...) tuple laid out [b, groups, tokens, dim]."""
    if past_key_values is None:
        return 0
    if isinstance(past_key_values, Cache):
        return past_key_values.get_seq_length()
    return past_key_values[0][0].shape[2] if len(past_key_values) else 0


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    """The causal language model: ``transformer`` plus next-token logits and the loss."""

    def __init__(self, config, empty_init=False, device=None):
        super().__init__(config)
        self.max_sequence_length = config.seq_length
        self.transformer = ChatGLMModel(config, device=device)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def set_output_embeddings(self, value):
        self.transformer.output_layer = value

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, return_last_logit=False, **kwargs):
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        outputs = self.transformer(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                   output_hidden_states=output_hidden_states, return_dict=True)
        hidden_states = outputs.last_hidden_state
        if return_last_logit:
            hidden_states = hidden_states[:, -1:]
        logits = self.transformer.output_layer(hidden_states)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)
        if not return_dict:
            output = (logits,) + tuple(v for v in (outputs.past_key_values, outputs.hidden_states) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states)
