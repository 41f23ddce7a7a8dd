"""slimlm: smaller, faster LLMs by automated structural sub-network search."""

import logging

# transformers imports torchao (the int8 extra) whenever it is installed, and torchao then warns that
# its CUDA kernels do not load on CPU-only machines, and torch that it registers enums the old way;
# slimlm's int8 path uses neither, and the noise would hide slimlm's own messages on every command
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
