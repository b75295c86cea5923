"""dyrelu: Dynamic ReLU (Chen et al., ECCV 2020) for any PyTorch model."""
from .core import Coefficients, DyReLU, set_tau

__all__ = ["DyReLU", "Coefficients", "set_tau"]
__version__ = "0.1.0"
