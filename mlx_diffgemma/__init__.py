"""mlx-diffgemma: Google's DiffusionGemma (block-diffusion Gemma 4 MoE) in MLX."""

from .loading import load

__version__ = "0.1.0"
__all__ = ["load", "__version__"]
