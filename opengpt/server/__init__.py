"""The OpenAI-compatible HTTP server: `create_app(llm, ServerConfig())` builds the FastAPI app, `serve` runs it."""
