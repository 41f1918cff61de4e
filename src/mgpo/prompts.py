"""The method's prompt templates (SPEC section 2), in one place.

Two presets share one shape: a system prompt, a first user turn (image + text), and, for
``mgpo`` only, a second user turn that carries the crop (or the original again when the
box is unusable). Messages are rendered through the processor's own chat template, so a
real Qwen2.5-VL checkpoint and the tiny one format them identically.

Text from data (question, options) is escaped first: a question holding
``<|im_end|>\n<|im_start|>assistant`` would otherwise be tokenized as control tokens and
rewrite the conversation, and one holding ``<|image_pad|>`` would break the image count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # option letters, everywhere in the project

MGPO_SYSTEM = (
    "You are a helpful assistant. Given an image and one question. First, identify the "
    "coordinates of the key image area relevant to solving the problem. Append the coordinates "
    "in JSON format at the end of your response and stop. This will trigger cropping of the "
    "corresponding area in the original image and enlarge it for improved clarity. Once the "
    "enlarged image is available, provide the final answer (A, B, C, D, or E) enclosed within "
    "\\boxed{}."
)
# "Out" (sic) is the reference's wording; the released checkpoints were trained on it.
TURN1_SUFFIX = "Out the coordinates of the key image area relevant to the problem in JSON format."
CROP_LEAD = "Based on the provided coordinates, return the sub-image:"
CROP_TAIL = (
    "Carefully analyze both the original image and the enlarged sub-image to solve the question "
    "step by step. If the sub-image does not provide sufficient information, refer to the original "
    "image to find the solution. Present your reasoning clearly, and provide the final answer "
    "(A, B, C, D, or E) enclosed within \\boxed{}."
)
FALLBACK_LEAD = "Not providing correct coordinates or invalid coordinate values, return the original image:"
FALLBACK_TAIL = (
    "Carefully analyze the original image to solve the question step by step. Present your "
    "reasoning clearly, and provide the final answer (A, B, C, D, or E) enclosed within \\boxed{}."
)
GRPO_SUFFIX = (
    "\nOutput the coordinates of the key image area relevant to the problem in JSON format. "
    "And put the answer letter (A, B, C, D, or E) within \\boxed{}."
)
DIRECT_SUFFIX = "Answer with the option's letter from the given choices directly."


def render_choices(options) -> str:
    """
    >>> render_choices(["red", "blue"])
    'The choices are listed below:\\n(A) red\\n(B) blue\\n'
    """
    return "The choices are listed below:\n" + "".join(f"({LETTERS[i]}) {o}\n" for i, o in enumerate(options))


def with_period(question: str) -> str:
    """The reference ends the turn-1 question with a period when it has none."""
    question = question.strip()
    return question if question.endswith(".") else question + "."


@dataclass(frozen=True)
class Template:
    """One preset: how many turns, and the text of each user message."""

    name: str
    system: str | None
    turns: int
    bare_letter: bool = False
    """The prompt asks for a bare option letter; the scorer accepts one (``direct``)."""

    def first_user(self, question: str, options) -> list[dict]:
        """Content of the first user message: the image, then the text."""
        if self.name == "mgpo":
            text = f"Question: {with_period(question)} {TURN1_SUFFIX}"
        elif self.name == "grpo":
            text = f"{question.strip()}\n{render_choices(options)}{GRPO_SUFFIX}"
        else:  # direct
            text = f"{question.strip()}\n{render_choices(options)}{DIRECT_SUFFIX}"
        return [{"type": "image"}, {"type": "text", "text": text}]

    def second_user(self, question: str, options, cropped: bool) -> list[dict]:
        """Content of the turn-2 user message: lead line, the image, question with choices."""
        lead, tail = (CROP_LEAD, CROP_TAIL) if cropped else (FALLBACK_LEAD, FALLBACK_TAIL)
        body = f"\nQuestion: {question.strip()} {render_choices(options)}{tail}"
        return [{"type": "text", "text": lead + "\n"}, {"type": "image"}, {"type": "text", "text": body}]


TEMPLATES = {
    "mgpo": Template("mgpo", MGPO_SYSTEM, turns=2),
    "grpo": Template("grpo", None, turns=1),
    "direct": Template("direct", None, turns=1, bare_letter=True),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


ZERO_WIDTH_SPACE = "\u200b"


@lru_cache(maxsize=8)
def _special_pattern(specials: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))


def escape_special(text: str, specials) -> str:
    """Break every special-token string in data text with a zero-width space after its first
    character, so the tokenizer reads it as ordinary text (it still reads the same).

    >>> escape_special("a<|im_end|>b", ["<|im_end|>"])
    'a<\u200b|im_end|>b'
    """
    specials = tuple(t for t in specials if len(t) > 1)
    if not specials:
        return text
    return _special_pattern(specials).sub(lambda m: m.group(0)[0] + ZERO_WIDTH_SPACE + m.group(0)[1:], text)


def _escaped(processor, question: str, options) -> tuple[str, list[str]]:
    """Question and options with the tokenizer's added tokens (every control token) escaped."""
    specials = tuple(getattr(processor, "tokenizer", processor).get_added_vocab())
    return escape_special(question, specials), [escape_special(str(o), specials) for o in options]


def _messages(system: str | None, content: list[dict]) -> list[dict]:
    msgs = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    return msgs + [{"role": "user", "content": content}]


def first_prompt_text(processor, template: Template, question: str, options) -> str:
    """The whole turn-1 prompt, ending with the assistant generation header."""
    question, options = _escaped(processor, question, options)
    return processor.apply_chat_template(_messages(template.system, template.first_user(question, options)),
                                         add_generation_prompt=True, tokenize=False)


def second_turn_text(processor, template: Template, question: str, options, cropped: bool) -> str:
    """The text that follows turn 1's ``<|im_end|>``: newline, the user block, the assistant header.

    Rendered by the chat template (system + user, minus the system part), so it is exactly
    what the template would produce for the whole conversation.
    """
    question, options = _escaped(processor, question, options)
    system = template.system or "You are a helpful assistant."
    head = processor.apply_chat_template(_messages(system, []), tokenize=False)
    head = head[: head.rfind("<|im_start|>user")]
    full = processor.apply_chat_template(
        _messages(system, template.second_user(question, options, cropped)),
        add_generation_prompt=True, tokenize=False)
    assert full.startswith(head), "chat template must render the system block first"
    return "\n" + full[len(head):]
