"""dist-train: fine-tune and pretrain transformer language models from one config.

Everything in this package runs inside a worker process; the ``launcher`` package builds the commands.
"""

__version__ = "0.1.0"
