"""dist-train: fine-tune and pretrain transformer language models from one config.

Everything in this package runs inside a worker process; the ``launcher`` package builds the commands.
The Python API: ``from dist_train import load_config, train, evaluate, predict`` (docs/python-api.md).
"""

__version__ = "0.1.0"

__all__ = ["Config", "UserError", "__version__", "evaluate", "load_config", "predict", "train"]


def __getattr__(name: str):
    # The Python API (dist_train/api.py), imported on first use: `import dist_train` stays light for the CLI.
    if name in __all__ and name != "__version__":
        from dist_train import api

        return getattr(api, name)
    raise AttributeError(f"module 'dist_train' has no attribute {name!r}")
