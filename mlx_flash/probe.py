"""`python -m mlx_flash.probe disk|window`: the disk probe and the windowing curve (mlx_flash.bench.probe)."""

from .bench.probe import main

if __name__ == "__main__":
    main()
