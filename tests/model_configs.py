"""config.json contents of public models the reference folder does not hold, shared by
the estimator and planner tests (facts from the models' published configs)."""

LLAMA_70B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=8192,
                 intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256,
                 tie_word_embeddings=False, max_position_embeddings=131072, torch_dtype="bfloat16")
QWEN25_72B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=8192,
                  intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False,
                  max_position_embeddings=32768, torch_dtype="bfloat16")
QWEN3_32B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=5120,
                 intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936,
                 tie_word_embeddings=False, max_position_embeddings=40960, torch_dtype="bfloat16")
MIXTRAL = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
               intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
               num_experts_per_tok=2, tie_word_embeddings=False,
               max_position_embeddings=32768, torch_dtype="bfloat16")
GEMMA_7B = dict(architectures=["GemmaForCausalLM"], model_type="gemma", hidden_size=3072,
                intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
                num_key_value_heads=16, head_dim=256, vocab_size=256000,
                max_position_embeddings=8192, torch_dtype="bfloat16")

# Vision-language models (published config.json values; text_config + vision_config).
QWEN3_VL_8B = dict(
    architectures=["Qwen3VLForConditionalGeneration"], model_type="qwen3_vl", torch_dtype="bfloat16",
    tie_word_embeddings=False,
    text_config=dict(model_type="qwen3_vl_text", hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=262144),
    vision_config=dict(model_type="qwen3_vl", depth=27, hidden_size=1152, intermediate_size=4304,
                       num_heads=16, out_hidden_size=4096, patch_size=16, spatial_merge_size=2,
                       temporal_patch_size=2, num_position_embeddings=2304,
                       deepstack_visual_indexes=[8, 16, 24]))
QWEN3_VL_4B = dict(
    architectures=["Qwen3VLForConditionalGeneration"], model_type="qwen3_vl", torch_dtype="bfloat16",
    tie_word_embeddings=True,
    text_config=dict(model_type="qwen3_vl_text", hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=262144),
    vision_config=dict(model_type="qwen3_vl", depth=24, hidden_size=1024, intermediate_size=4096,
                       num_heads=16, out_hidden_size=2560, patch_size=16, spatial_merge_size=2,
                       temporal_patch_size=2, num_position_embeddings=2304,
                       deepstack_visual_indexes=[5, 11, 17]))
QWEN25_VL_7B = dict(
    architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
    torch_dtype="bfloat16", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
    max_position_embeddings=128000,
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                       out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]))
QWEN2_VL_7B = dict(
    architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl", torch_dtype="bfloat16",
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
    max_position_embeddings=32768,
    vision_config=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=3584,
                       in_chans=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2))
GEMMA3_27B = dict(
    architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3", mm_tokens_per_image=256,
    text_config=dict(model_type="gemma3_text", hidden_size=5376, intermediate_size=21504,
                     num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16,
                     head_dim=128, vocab_size=262208, sliding_window=1024, sliding_window_pattern=6,
                     max_position_embeddings=131072),
    vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                       num_hidden_layers=27, num_attention_heads=16, image_size=896, patch_size=14),
    torch_dtype="bfloat16")
MISTRAL_SMALL_31 = dict(
    architectures=["Mistral3ForConditionalGeneration"], model_type="mistral3", spatial_merge_size=2,
    multimodal_projector_bias=False, torch_dtype="bfloat16",
    text_config=dict(model_type="mistral", hidden_size=5120, intermediate_size=32768,
                     num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=131072, max_position_embeddings=131072,
                     tie_word_embeddings=False, sliding_window=None),
    vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096,
                       num_hidden_layers=24, num_attention_heads=16, head_dim=64, image_size=1540,
                       patch_size=14))

# Other attention kinds.
DEEPSEEK_V3 = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=7168,
    intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1,
    num_experts_per_tok=8, first_k_dense_replace=3, moe_layer_freq=1, q_lora_rank=1536,
    kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
    vocab_size=129280, tie_word_embeddings=False, max_position_embeddings=163840,
    torch_dtype="bfloat16")
DEEPSEEK_V2_LITE = dict(
    architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", hidden_size=2048,
    intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
    num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2,
    num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1, q_lora_rank=None,
    kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
    vocab_size=102400, tie_word_embeddings=False, max_position_embeddings=163840,
    torch_dtype="bfloat16")
GPT_OSS_20B = dict(
    architectures=["GptOssForCausalLM"], model_type="gpt_oss", hidden_size=2880,
    intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8,
    head_dim=64, num_local_experts=32, num_experts_per_tok=4, experts_per_token=4,
    vocab_size=201088, tie_word_embeddings=False, sliding_window=128, attention_bias=True,
    layer_types=["sliding_attention", "full_attention"] * 12, max_position_embeddings=131072,
    quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
    torch_dtype="bfloat16")
QWEN3_NEXT_80B = dict(
    architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next", hidden_size=2048,
    intermediate_size=5120, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2,
    head_dim=256, full_attention_interval=4, linear_num_value_heads=32, linear_num_key_heads=16,
    linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=512,
    num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
    decoder_sparse_step=1, vocab_size=151936, tie_word_embeddings=False,
    partial_rotary_factor=0.25, max_position_embeddings=262144, torch_dtype="bfloat16")
