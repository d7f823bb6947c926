"""megatron-core integration: model mapping, per-rank conversion, checkpoint formats, CPU shims."""

import warnings

# megatron-core warns at import that the optional TransformerEngine/Apex kernels are absent, and on every
# TransformerConfig about a deprecated default it sets itself; neither is actionable for a user here, and
# both would bury the one-line errors this tool prints.
warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=r".*Apex is not installed.*")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
