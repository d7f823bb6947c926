"""DeepSpeed's ``mpu`` protocol answered from megatron-core's parallel_state.

DeepSpeed asks an ``mpu`` object for the data-parallel group (ZeRO partitions and reduces over it), the
model-parallel group (gradient norms are summed over it; checkpoint files are named by the rank in it)
and the tensor-parallel rank (parameters not split by TP count once, on TP rank 0). megatron-core's
model-parallel group is TP x PP, which is what DeepSpeed needs for both: a gradient norm summed over every
pipeline stage and one ``mp_rank_XX`` checkpoint file per (tp, pp) rank.
"""

from __future__ import annotations

import torch.distributed as dist


class MegatronMPU:
    """Pass as ``deepspeed.initialize(..., mpu=MegatronMPU())`` after ``init_model_parallel``."""

    def __init__(self):
        from megatron.core import parallel_state  # heavy: imported once a job builds its engine

        self._ps = parallel_state

    # model parallel = tensor x pipeline
    def get_model_parallel_group(self):
        return self._ps.get_model_parallel_group()

    def get_model_parallel_rank(self):
        return dist.get_rank(group=self._ps.get_model_parallel_group())

    def get_model_parallel_world_size(self):
        return (self._ps.get_tensor_model_parallel_world_size()
                * self._ps.get_pipeline_model_parallel_world_size())

    # tensor parallel
    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self):
        return self._ps.get_tensor_model_parallel_src_rank()

    # pipeline parallel
    def get_pipeline_model_parallel_rank(self):
        return self._ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    # data parallel
    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_rank(self):
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self._ps.get_data_parallel_group())
