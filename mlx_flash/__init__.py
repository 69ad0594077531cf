"""mlx-flash: LLM in a flash (Alizadeh et al., 2023) on MLX."""

__version__ = "0.1.0"
