"""Growing and combining checkpoints without building a model: Depth Up-Scaling, block expansion, merges."""
from .upscale import plan_layers, upscale  # noqa: F401
from .merge import merge, plan_merge  # noqa: F401
