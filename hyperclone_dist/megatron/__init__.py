"""megatron-core integration: model mapping, per-rank conversion, checkpoint formats, CPU shims."""

from hyperclone_dist.quiet_imports import quiet_libraries

# before any module of this package imports megatron-core: some of its harmless warnings come at import time
quiet_libraries()
