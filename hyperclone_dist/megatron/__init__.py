"""megatron-core integration: model mapping, per-rank conversion, checkpoint formats, CPU shims."""

from hyperclone_dist.megatron.light_imports import lighten_megatron_core_import
from hyperclone_dist.quiet_imports import quiet_libraries

# before any module of this package imports megatron-core: some of its harmless warnings come at import time
quiet_libraries()
lighten_megatron_core_import()  # its first import without the compiler's and wandb's (light_imports.py)
