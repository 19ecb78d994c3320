"""Pure prompt builders for the three alignment modes: none, ICA and PBA.

Persona, chat history and the new user message go in; role/content messages come out,
to be rendered by the model's own chat template. The layouts are the published AlignX
evaluation prompts: ICA conditions on the raw persona (UGC, pairwise choices, demographic
text), PBA on the rendered profile alone. For a multi-turn chat, earlier turns stay as the
user wrote them and the persona framing wraps only the newest user turn, so a long chat
carries the persona once, next to the question it is meant to shape.

This module knows no model, tokenizer or storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from personalign.persona import Persona

ICA_SYSTEM = "Generate a task-specific response based on user historical behavior and preferences.\n"
PBA_SYSTEM = "Generate a task-specific response based on user preferences.\n"

Message = dict[str, str]


class Mode(str, Enum):
    """How the model is aligned to the persona."""

    NONE = "none"
    ICA = "ica"
    PBA = "pba"

    @property
    def label(self) -> str:
        return {"none": "None (plain chat)", "ica": "ICA: raw persona in context", "pba": "PBA: inferred profile"}[self.value]


def task_block(post: str) -> str:
    """The published `***Task***` block around a post."""
    return f"***Task***\n\n**Post:**\n{post}\n\n"


def ugc_block(persona: Persona) -> str:
    """'This person has commented on some posts:' with numbered Post/Comment items, or ''."""
    if not persona.ugc:
        return ""
    items = "".join(f"{n}. *Post:*\n{i.post}\n\n*Comment:*\n{i.comment}\n\n" for n, i in enumerate(persona.ugc, 1))
    return f"**This person has commented on some posts:**\n\n{items}"


def pairwise_block(persona: Persona) -> str:
    """'This person has chosen or rejected comments on some posts:' with numbered items, or ''."""
    if not persona.pairwise:
        return ""
    items = "".join(
        f"{n}. *Post:*\n{i.post}\n\n*Chosen:*\n{i.chosen}\n\n*Rejected:*\n{i.rejected}\n\n"
        for n, i in enumerate(persona.pairwise, 1)
    )
    return f"**This person has chosen or rejected comments on some posts:**\n\n{items}"


def ica_turn(post: str, persona: Persona) -> str:
    """The ICA user turn: task, then historical behaviour and demographics, then the response cue."""
    history = f"{ugc_block(persona)}{pairwise_block(persona)}{persona.demographics}"
    return f"{task_block(post)}***Historical Behavior and User Preferences***\n\n{history}\n\n***Response:***\n\n"


def pba_turn(post: str, profile: str) -> str:
    """The PBA user turn: task, then the rendered profile, then the response cue."""
    return f"{task_block(post)}***User Preferences***\n\n{profile}\n\n***Response:***\n\n"


def build_messages(
    mode: Mode | str,
    persona: Persona | None,
    history: Sequence[Message],
    user_message: str,
    *,
    profile: str | None = None,
) -> list[Message]:
    """The chat messages for the next reply.

    `history` holds earlier {"role", "content"} turns as shown to the user. `profile`
    overrides the persona's rendered profile in PBA mode (for an inferred profile).
    """
    mode = Mode(mode)
    turns = [{"role": m["role"], "content": m["content"]} for m in history]
    if mode is Mode.NONE:
        return [*turns, {"role": "user", "content": user_message}]
    if persona is None:
        raise ValueError(f"{mode.value.upper()} mode needs a persona")
    if mode is Mode.ICA:
        return [{"role": "system", "content": ICA_SYSTEM}, *turns, {"role": "user", "content": ica_turn(user_message, persona)}]
    text = persona.profile if profile is None else profile
    return [{"role": "system", "content": PBA_SYSTEM}, *turns, {"role": "user", "content": pba_turn(user_message, text)}]
