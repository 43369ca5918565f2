"""mlx-diffgemma: Google's DiffusionGemma (block-diffusion Gemma 4 MoE) in MLX."""

import warnings

__version__ = "0.1.0"

# `python -m mlx_diffgemma.generate` (as mlx-lm users type it) runs a module this package has already imported;
# Python's note about that is noise here: the module's main block only calls the command line.
warnings.filterwarnings("ignore", r"'mlx_diffgemma\.\w+' found in sys\.modules", RuntimeWarning)

from .generate import generate, stream_generate  # noqa: E402
from .loading import load  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "__version__"]
