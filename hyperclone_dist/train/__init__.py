"""The trainer behind ``launch/pretrain.py``: megatron-core TP/PP models under DeepSpeed ZeRO."""

from hyperclone_dist.quiet_imports import quiet_libraries

# before this package imports megatron-core and DeepSpeed: their known-harmless warnings stay off stderr
quiet_libraries()
