"""megatron-core runtime: CPU shims, distributed/model-parallel init and GPTModel construction."""
