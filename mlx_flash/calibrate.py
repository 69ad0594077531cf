"""`python -m mlx_flash.calibrate`: the same command as `python -m mlx_flash.train_predictors`."""

from .train_predictors import main

if __name__ == "__main__":
    main()
