"""Chat templates: render a list of messages with the checkpoint's own Jinja template."""

from __future__ import annotations

from typing import Any, Sequence

# ChatML, used when a checkpoint carries no template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def apply_chat_template(template: str | None, messages: Sequence[dict[str, str]], *,
                        add_generation_prompt: bool = True, **extra: Any) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, …]).

    Rendered in a sandboxed Jinja environment with trim_blocks/lstrip_blocks, as
    Hugging Face does, so the text (and hence the token ids) match `transformers`.
    """
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"each message needs 'role' and 'content', got {m!r}")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template or DEFAULT_CHAT_TEMPLATE).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **extra)
