"""What only training runs through the model: the LM head's chunked losses (``losses``) and the recipes by which
the blocks that activation checkpointing keeps recompute their cheap activations (``cheap_recompute``).

They live beside the model rather than with the stages because the model's own code calls them: the training
forward (``InfiniteVL(labels=...)``, ``head_losses``) computes its loss here, and the layers mark their cheap
outputs. ``ivl.model`` imports nothing above it (no Lightning, no stages); the stages apply checkpointing and
recomputation from outside (``ivl.stages.distributed``).
"""
