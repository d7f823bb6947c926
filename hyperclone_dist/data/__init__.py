"""Pretraining data: an embedded default corpus, a sentencepiece tokenizer, megatron-core indexed datasets.

    hyperclone data tokenizer --out data/tok --vocab-size 4096     # default corpus: the stdlib's source
    hyperclone data prepare --tokenizer data/tok.model --out data/stdlib
    hyperclone data inspect data/stdlib

The trainer reads the result through ``hyperclone_dist.data.loader`` (``DataConfig``, ``build_datasets``,
``batch_at``). Modules here import megatron-core lazily: it takes seconds, and the CLI's input checks should
fail before paying for it.
"""

from hyperclone_dist.megatron.light_imports import lighten_megatron_core_import
from hyperclone_dist.quiet_imports import quiet_libraries

# before this package's lazy megatron-core imports: their import-time warnings would land under the CLI's output
quiet_libraries()
lighten_megatron_core_import()  # its first import without the compiler's and wandb's (light_imports.py)
