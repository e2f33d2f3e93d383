"""The serving app (LitServe, OpenAI-compatible chat + streaming video). Lands with the serving work."""
