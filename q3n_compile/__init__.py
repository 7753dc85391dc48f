"""q3n: a torch.compile backend for transformer inference.

    import torch
    model = torch.compile(model, backend="q3n", options={"attention": "tiled"})

The backend is found through the ``torch_dynamo_backends`` entry point, so nothing of q3n needs
importing first. :func:`reports` returns one report per compiled graph, newest last.
"""

__version__ = "0.1.0"

from .config import Q3NConfig, Q3NConfigError  # noqa: E402
from .report import reports, reset_reports  # noqa: E402


def __getattr__(name):
    # The backend pulls in AOTAutograd; import it only when asked for, keeping `import q3n_compile`
    # cheap for tools that only read reports or configs.
    if name == "q3n_backend":
        from .backend import q3n_backend

        return q3n_backend
    if name == "FrozenWeightChanged":  # raised by a compiled graph whose folded weights changed
        from .runtime import FrozenWeightChanged

        return FrozenWeightChanged
    if name == "release_quantized_weights":
        from .quant.release import release_quantized_weights

        return release_quantized_weights
    raise AttributeError(f"module 'q3n_compile' has no attribute {name!r}")


__all__ = ["FrozenWeightChanged", "Q3NConfig", "Q3NConfigError", "q3n_backend", "release_quantized_weights", "reports",
           "reset_reports", "__version__"]
