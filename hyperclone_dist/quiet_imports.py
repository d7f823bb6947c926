"""The library warnings known to be harmless here, filtered where this package imports those libraries.

Each filter names the warning's message *and* the library module that issues it (``warnings``' ``module``
is the ``__name__`` of the code that called ``warn``), so a user's own code that trips the same
deprecation still hears about it, and every other warning of these libraries still shows. What is left
on stderr after a clean ``hyperclone`` or ``pretrain.py`` run is then something worth reading.

``quiet_libraries()`` is called by the packages that import megatron-core, DeepSpeed and
``torch.distributed.checkpoint`` (``hyperclone_dist.megatron``, ``.train``, ``.data``) before they do;
it is idempotent (``warnings.filterwarnings`` replaces an identical filter instead of adding one).
"""

from __future__ import annotations

import warnings

# (category, message regex, issuing module regex, why it is harmless here)
HARMLESS_WARNINGS: tuple[tuple[type[Warning], str, str, str], ...] = (
    (UserWarning, r"Transformer Engine and Apex are not installed", r"megatron\.core\.",
     "the fused kernels are optional; the torch fallbacks are what a CPU run uses"),
    (UserWarning, r"Apex is not installed", r"megatron\.core\.", "the torch norm fallback is the local spec's"),
    (UserWarning, r"full scope is deprecated", r"megatron\.core\.transformer\.transformer_config",
     "TransformerConfig's own default (cuda_graph_scope='full') warns on every config; no CUDA graphs here"),
    (UserWarning, r"When using async grad allreduce it is recommended to set the environment variable "
                  r"CUDA_DEVICE_MAX_CONNECTIONS", r"megatron\.core\.tensor_parallel\.",
     "a CUDA stream-scheduling tip, printed per layer at TP > 1, also on CPU"),
    (FutureWarning, r"`load_state_dict` is deprecated", r"megatron\.core\.dist_checkpointing\.",
     "megatron-core's dist_checkpointing calls torch's old DCP entry point; not ours to change"),
    (FutureWarning, r"`save_state_dict` is deprecated", r"megatron\.core\.dist_checkpointing\.", "the same, saving"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor", r"torch\.distributed\.",
     "megatron-core's dist_checkpointing is built on ShardedTensor; torch warns from inside DCP"),
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated", r"torch\.distributed\.c10d_logger",
     "megatron-core's TP gathers call it; torch's logging wrapper issues it, whoever the caller"),
    (UserWarning, r"torch\.distributed is (disabled, )?unavailable or uninitialized, assuming the intent is to "
                  r"(load|save) in a single process", r"torch\.distributed\.checkpoint\.",
     "one reader or writer without a process group (no_dist) is how a single-process conversion works"),
)


def quiet_libraries() -> None:
    """Install the filters above (cheap; call before importing the libraries, again at will)."""
    for category, message, module, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
