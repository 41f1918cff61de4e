"""The method's prompt templates (the paper's preset, its exact strings), in one place.

Two presets share one shape: a system prompt, a first user turn (image + text), and, for
``mgpo`` only, a second user turn that carries the crop (or the original again when the
box is unusable). ``mgpo_k`` (beyond the paper) lets every turn zoom or answer, up to
``rollout.max_turns`` turns; its strings are ours, not the paper's. Messages are rendered through the processor's own chat template, so a
real Qwen2.5-VL checkpoint and the tiny one format them identically.

Text from data (question, options) is escaped first: a question holding
``<|im_end|>\n<|im_start|>assistant`` would otherwise be tokenized as control tokens and
rewrite the conversation, and one holding ``<|image_pad|>`` would break the image count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from ..data.records import LETTERS
from ..runtime.family import processor_family

MGPO_SYSTEM = (
    "You are a helpful assistant. Given an image and one question. First, identify the "
    "coordinates of the key image area relevant to solving the problem. Append the coordinates "
    "in JSON format at the end of your response and stop. This will trigger cropping of the "
    "corresponding area in the original image and enlarge it for improved clarity. Once the "
    "enlarged image is available, provide the final answer (A, B, C, D, or E) enclosed within "
    "\\boxed{}."
)
# "Out" (sic) is the authors' code's wording; the released checkpoints were trained on it.
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

# ``mgpo_k`` (beyond the paper): the model zooms as often as it needs, then answers.
# These strings are this project's own wording, NOT the paper's or the authors' code's; no
# released checkpoint was trained on them.
ZOOM_SYSTEM = (
    "You are a helpful assistant. You are given an image and a multiple-choice question. Before "
    "answering you may look closer: write the coordinates of one image region in JSON format, as "
    '{"bbox_2d": [x1, y1, x2, y2]} {units} of the latest image you were shown, and stop. That region '
    "is then cut from the full-resolution image, enlarged and shown to you, and you may zoom into it "
    "again the same way. As soon as you are sure, give the final answer (A, B, C, D, or E) enclosed "
    "within \\boxed{} instead of coordinates."
)
# How ZOOM_SYSTEM names the coordinates: the family's own convention (pixels, or a 0..N grid).
ZOOM_UNITS = {None: "in pixels", 1000: "on a 0-1000 scale"}
ZOOM_ASK = "Either give the coordinates of a region to enlarge in JSON format, or the final answer within \\boxed{}."
ZOOM_CROP_LEAD = "Here is the region you asked for, enlarged:"
ZOOM_FALLBACK_LEAD = "The coordinates were missing or unusable, so here is the previous image again:"
ZOOM_CAPPED = "No more images can be shown."
ZOOM_LAST = (
    "This is the last image. Answer now: reason step by step from what you have seen and give the "
    "final answer (A, B, C, D, or E) enclosed within \\boxed{}."
)


def render_choices(options) -> str:
    """
    >>> render_choices(["red", "blue"])
    'The choices are listed below:\\n(A) red\\n(B) blue\\n'
    """
    return "The choices are listed below:\n" + "".join(f"({LETTERS[i]}) {o}\n" for i, o in enumerate(options))


def with_period(question: str) -> str:
    """The authors' code ends the turn-1 question with a period when it has none."""
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
    zoom_loop: bool = False
    """Each turn zooms or answers, up to ``rollout.max_turns`` turns (``mgpo_k``); ``turns`` is then unused."""

    def first_user(self, question: str, options) -> list[dict]:
        """Content of the first user message: the image, then the text."""
        if self.name == "mgpo":
            text = f"Question: {with_period(question)} {TURN1_SUFFIX}"
        elif self.zoom_loop:
            text = f"Question: {question.strip()}\n{render_choices(options)}{ZOOM_ASK}"
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


    def zoom_user(self, question: str, options, shown: str, last: bool) -> list[dict]:
        """A K-turn user message (``mgpo_k``): ``shown`` is "crop" (the new crop), "fallback" (the
        previous image again) or "capped" (no image: the image-token cap is reached, answer now)."""
        tail = ZOOM_LAST if last or shown == "capped" else ZOOM_ASK
        body = f"Question: {question.strip()}\n{render_choices(options)}{tail}"
        if shown == "capped":
            return [{"type": "text", "text": f"{ZOOM_CAPPED} {body}"}]
        lead = ZOOM_CROP_LEAD if shown == "crop" else ZOOM_FALLBACK_LEAD
        return [{"type": "text", "text": lead + "\n"}, {"type": "image"}, {"type": "text", "text": "\n" + body}]


TEMPLATES = {
    "mgpo": Template("mgpo", MGPO_SYSTEM, turns=2),
    "mgpo_k": Template("mgpo_k", ZOOM_SYSTEM, turns=2, zoom_loop=True),
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
    return re.compile("|".join(re.escape(token) for token in sorted(specials, key=len, reverse=True)))


def escape_special(text: str, specials) -> str:
    """Break every special-token string in data text with a zero-width space after its first
    character, so the tokenizer reads it as ordinary text (it still reads the same).

    >>> escape_special("a<|im_end|>b", ["<|im_end|>"])
    'a<\u200b|im_end|>b'
    """
    specials = tuple(token for token in specials if len(token) > 1)
    if not specials:
        return text
    return _special_pattern(specials).sub(lambda m: m.group(0)[0] + ZERO_WIDTH_SPACE + m.group(0)[1:], text)


def escape_data(processor, text: str) -> str:
    """``text`` from a record (a question, an option, a category in an SFT target) with the
    tokenizer's added tokens (every control token) escaped, so it reaches the model as text."""
    return escape_special(text, tuple(getattr(processor, "tokenizer", processor).get_added_vocab()))


def _escaped(processor, question: str, options) -> tuple[str, list[str]]:
    """Question and options with the tokenizer's added tokens (every control token) escaped."""
    specials = tuple(getattr(processor, "tokenizer", processor).get_added_vocab())
    return escape_special(question, specials), [escape_special(str(o), specials) for o in options]


def _messages(system: str | None, content: list[dict]) -> list[dict]:
    msgs = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    return msgs + [{"role": "user", "content": content}]


def system_text(processor, template: Template) -> str | None:
    """The template's system prompt, its coordinates named in the model family's convention."""
    if template.system is None or "{units}" not in template.system:
        return template.system
    return template.system.replace("{units}", ZOOM_UNITS[processor_family(processor).box_grid])


def first_prompt_text(processor, template: Template, question: str, options) -> str:
    """The whole turn-1 prompt, ending with the assistant generation header."""
    question, options = _escaped(processor, question, options)
    return processor.apply_chat_template(_messages(system_text(processor, template),
                                                   template.first_user(question, options)),
                                         add_generation_prompt=True, tokenize=False)


def _next_user_text(processor, template: Template, content: list[dict]) -> str:
    """What follows an assistant turn's ``<|im_end|>``: newline, the user block ``content``,
    the next assistant header. Rendered by the chat template (system + user, minus the
    system part), so it is exactly what the template would produce for the whole conversation."""
    system = system_text(processor, template) or "You are a helpful assistant."
    head = processor.apply_chat_template(_messages(system, []), tokenize=False)
    head = head[: head.rfind("<|im_start|>user")]
    full = processor.apply_chat_template(_messages(system, content), add_generation_prompt=True, tokenize=False)
    assert full.startswith(head), "chat template must render the system block first"
    return "\n" + full[len(head):]


def chat_pieces(processor, messages) -> list[tuple[str, bool]]:
    """A ``chat`` record (``Sample.messages``) as the chat template renders it, cut into
    (text, is_target) pieces: the text before each assistant message (system, user blocks
    with their image placeholders, the assistant header) and the assistant message itself,
    whose closing ``<|im_end|>`` the caller appends as a token. Data text is escaped like
    every prompt's; the pieces joined with the ``<|im_end|>`` are the template's own rendering."""
    specials = tuple(getattr(processor, "tokenizer", processor).get_added_vocab())
    chat = [{"role": role, "content": [{"type": "image"} if kind == "image" else
                                       {"type": "text", "text": escape_special(value, specials)}
                                       for kind, value in parts]} for role, parts in messages]
    pieces, done = [], ""
    for a, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        head = processor.apply_chat_template(chat[:a], add_generation_prompt=True, tokenize=False)
        target = "".join(part["text"] for part in message["content"])
        if not head.startswith(done):
            raise ValueError("the chat template renders an earlier turn differently once later turns follow")
        pieces += [(head[len(done):], False), (target, True)]
        done = head + target + "<|im_end|>"
    if not processor.apply_chat_template(chat, tokenize=False).startswith(done):
        raise ValueError("the chat template does not close an assistant message with <|im_end|>")
    return pieces


def second_turn_text(processor, template: Template, question: str, options, cropped: bool) -> str:
    """The turn-2 user block of the paper's template (crop or fallback), after turn 1's ``<|im_end|>``."""
    question, options = _escaped(processor, question, options)
    return _next_user_text(processor, template, template.second_user(question, options, cropped))


def zoom_turn_text(processor, template: Template, question: str, options, shown: str, last: bool) -> str:
    """A K-turn user block (``Template.zoom_user``), after the previous assistant turn's ``<|im_end|>``."""
    question, options = _escaped(processor, question, options)
    return _next_user_text(processor, template, template.zoom_user(question, options, shown, last))
