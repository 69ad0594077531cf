"""mlx-flash: LLM in a flash (Alizadeh et al., 2023) on MLX."""

__version__ = "0.1.0"

import os as _os

# transformers (used for tokenizers only) warns at import that PyTorch is absent
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
