"""ivl: build, train, serve and measure InfiniteVL-style hybrid vision-language models."""

from pathlib import Path

__version__ = "0.1.0"

# In a source checkout kernels/ and callbacks/ sit beside this folder; installing maps them to ivl.kernels and
# ivl.callbacks. When Python finds this folder before the installed package (run from the repository root with a
# regular install), look for them beside it too, so that ``ivl.kernels`` imports from any working directory.
_checkout = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "kernels").exists() and (_checkout / "kernels" / "gated_delta.py").exists():
    __path__.append(str(_checkout))
