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
