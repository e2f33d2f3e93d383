"""Serving: an OpenAI-compatible chat API, live video sessions and a web page (``python lightning_app.py``)."""
