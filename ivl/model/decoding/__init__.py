"""The decode engine: fixed-shape decoding and the engine every generation runs on.

``packing`` stores each group of projections that read the same input as one matrix; ``static_cache`` holds every
layer's decoding buffers at their final shape and advances them by one token per step (each mixer's ``step``),
the step a CUDA graph captures; ``generation`` runs continuous batching over a pool of those cache slots for
``InfiniteVL.generate``, the server and live sessions.
"""
