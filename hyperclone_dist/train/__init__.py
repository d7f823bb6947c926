"""The trainer behind ``launch/pretrain.py``: megatron-core TP/PP models under DeepSpeed ZeRO."""

from hyperclone_dist.megatron.light_imports import lighten_megatron_core_import
from hyperclone_dist.quiet_imports import quiet_libraries

# before this package imports megatron-core and DeepSpeed: their known-harmless warnings stay off stderr
quiet_libraries()
lighten_megatron_core_import()  # its first import without the compiler's and wandb's (light_imports.py)
