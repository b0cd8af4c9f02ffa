"""Configuration of the original GLM-4 checkpoint's architecture (``model_type`` chatglm, remote code).

Written for glm4-intel from the published config keys of THUDM/glm-4-9b-chat; the defaults are that
checkpoint's shape. A folder made by ``python -m models.chatglm_twin`` or ``python -m models.shape_model
--arch chatglm`` ships this file and ``modeling_chatglm.py`` and names them in ``auto_map``, so it loads
with ``trust_remote_code=True`` exactly as the real checkpoint does.
"""

from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    """Shape and numerics of a ChatGLM-architecture GLM-4 model."""

    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers"}

    def __init__(self, num_layers=40, padded_vocab_size=151552, hidden_size=4096, ffn_hidden_size=13696,
                 kv_channels=128, num_attention_heads=32, seq_length=131072, hidden_dropout=0.0,
                 attention_dropout=0.0, layernorm_epsilon=1.5625e-07, rmsnorm=True,
                 apply_residual_connection_post_layernorm=False, post_layer_norm=True, add_bias_linear=False,
                 add_qkv_bias=True, bias_dropout_fusion=True, multi_query_attention=True, multi_query_group_num=2,
                 rope_ratio=500, apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True,
                 fp32_residual_connection=False, **kwargs):
        self.num_layers = num_layers
        self.padded_vocab_size = padded_vocab_size
        self.vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.layernorm_epsilon = layernorm_epsilon
        self.rmsnorm = rmsnorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.post_layer_norm = post_layer_norm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.bias_dropout_fusion = bias_dropout_fusion
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.rope_ratio = rope_ratio
        self.apply_query_key_layer_scaling = apply_query_key_layer_scaling
        self.attention_softmax_in_fp32 = attention_softmax_in_fp32
        self.fp32_residual_connection = fp32_residual_connection
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
