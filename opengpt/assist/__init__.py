"""The application layer: tools, agents, retrieval, ... talking to a model only through opengpt.LLM or an OpenAI-compatible endpoint."""
