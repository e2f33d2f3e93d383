"""ivl: build, train, serve and measure InfiniteVL-style hybrid vision-language models."""

__version__ = "0.1.0"
