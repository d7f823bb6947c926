"""hyperclone-dist: grow small pretrained LMs into larger ones that compute the same function.

    import hyperclone_dist
    big = hyperclone_dist.grow(model, width_factor=2, method="noisy")   # hyperclone_dist/api.py
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``hyperclone_dist.grow``, imported when first used: ``import hyperclone_dist.<module>`` stays light
    (processes that import one small module, e.g. a checkpoint writer's helper, do not pay for torch)."""
    if name == "grow":
        from hyperclone_dist.api import grow  # the one deferred project import, for the reason above

        return grow
    raise AttributeError(f"module 'hyperclone_dist' has no attribute {name!r}")
