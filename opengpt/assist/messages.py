"""Reading OpenAI-format chat messages (dicts): the text of a content field, and the user's question.

Shared by the safety pipeline and the server's assistant services, so that both read content parts
and find the question the same way.
"""

from __future__ import annotations


def content_text(content) -> str:
    """The text of a message's `content`: a string, or content parts (their text parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def last_user_text(messages: list[dict]) -> str | None:
    """The text of the last user message whose content is a plain string (the question being answered)."""
    return next((m["content"] for m in reversed(messages)
                 if m.get("role") == "user" and isinstance(m.get("content"), str)), None)
