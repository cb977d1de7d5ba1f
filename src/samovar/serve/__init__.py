"""Serving: the continuous-batching scheduler (scheduler.py), the OpenAI-compatible HTTP server and its
web page (server.py, static/chat.html), and the Telegram bot (telegram.py), all over one LLM."""
