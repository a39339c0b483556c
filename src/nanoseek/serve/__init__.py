"""Serving: an OpenAI-compatible HTTP server with a web chat page (`app.create_app`, `nanoseek serve`), its
Prometheus metrics, and `nanoseek chat` in the terminal. FastAPI loads only when a server is built."""
