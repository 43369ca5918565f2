"""mlx-diffgemma: Google's DiffusionGemma (block-diffusion Gemma 4 MoE) in MLX."""

from .generate import generate, stream_generate
from .loading import load

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "__version__"]
