"""Clients of servers the tool talks to (OpenAI-compatible chat completions: VLM rewards and prompt synthesis)."""
