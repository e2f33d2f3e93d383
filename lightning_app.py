"""Serve a trained InfiniteVL: OpenAI-compatible chat API, live video sessions and a web page.

python lightning_app.py [--model DIR] [--port 8000] [--host 127.0.0.1] [--device cuda|cpu] [--dtype ...]
"""

from ivl.serve.cli import main

if __name__ == "__main__":
    main()
