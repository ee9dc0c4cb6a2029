"""Prompt templates per model family, in one place: instruction (and, for π0.5, discretized state) -> text.

    prompt = get_prompt("pi0")
    prompt("pick_up the cup\\n")                     # "pick up the cup\\n"
    ids, mask = tokenize_prompts(tokenizer, prompt, ["pick up the cup"], max_len=48)

Known names: ``plain`` (the instruction as is), ``pi0`` / ``paligemma`` (instruction cleaned, then a newline
tokenized on its own as the start-of-answer token), ``pi05`` (``Task: ..., State: <bins>;\\nAction: ``),
``pi0_fast`` (openpi's FAST prompt ``Task: ..., State: <bins>;\\n``, instruction lower-cased),
``openvla`` (``In: What action should the robot take to ...?\\nOut:``, instruction lower-cased as in its training
data) and ``smolvla`` (instruction ending in a newline). A string containing ``{instruction}`` (optionally
``{state}``) is a custom template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from vlax.tokenizers import Tokenizer, as_text, encode_texts, pad_ids


def _identity(text: str) -> str:
    return text


def clean_paligemma(text: str) -> str:
    """π0 / π0.5 cleaning: surrounding whitespace dropped, underscores and newlines become spaces."""
    return text.strip().replace("_", " ").replace("\n", " ")


def _lower(text: str) -> str:
    return text.lower()


def clean_openpi_fast(text: str) -> str:
    """openpi's FASTTokenizer cleaning: lower-cased, surrounding whitespace dropped, underscores become spaces."""
    return text.lower().strip().replace("_", " ")


def discretize_state(state: np.ndarray, bins: int = 256) -> str:
    """π0.5's text state: each value of a state normalized to ``[-1, 1]`` as its bin index in ``0..bins-1``,
    space separated. ``state``: ``[S]``. Values outside ``[-1, 1]`` take the end bins (openpi would print ``-1``
    below the range, a token sequence the model never saw in training)."""
    state = np.asarray(state, np.float64).reshape(-1)
    index = np.clip(np.digitize(state, bins=np.linspace(-1.0, 1.0, bins + 1)[:-1]) - 1, 0, bins - 1)
    return " ".join(str(int(i)) for i in index)


@dataclass(frozen=True)
class PromptTemplate:
    """``template`` formatted with the cleaned ``{instruction}`` (and ``{state}``, discretized); ``suffix`` follows
    it and is tokenized on its own, without special tokens (π0's start-of-answer newline)."""

    name: str
    template: str = "{instruction}"
    clean: Callable[[str], str] = _identity
    suffix: str = ""
    ensure_suffix: str = ""          # appended to the instruction unless it already ends with it (SmolVLA)
    state_bins: int = 256

    @property
    def uses_state(self) -> bool:
        return "{state}" in self.template

    def text(self, instruction: str | bytes, state: np.ndarray | None = None) -> str:
        """The prompt without the separately tokenized suffix."""
        instruction = self.clean(as_text(instruction))
        if self.ensure_suffix and not instruction.endswith(self.ensure_suffix):
            instruction += self.ensure_suffix
        if self.uses_state:
            if state is None:
                raise ValueError(f"prompt template {self.name!r} formats the state; pass state= (normalized to "
                                 "[-1, 1])")
            return self.template.format(instruction=instruction, state=discretize_state(state, self.state_bins))
        return self.template.format(instruction=instruction)

    def __call__(self, instruction: str | bytes, state: np.ndarray | None = None) -> str:
        """The whole prompt as one string."""
        return self.text(instruction, state) + self.suffix

    def to_json(self) -> str:
        """What :func:`get_prompt` takes back: the registry name, or the template text of a custom one."""
        return self.name if self.name in PROMPTS else self.template


PROMPTS: dict[str, PromptTemplate] = {
    "plain": PromptTemplate("plain"),
    "pi0": PromptTemplate("pi0", clean=clean_paligemma, suffix="\n"),
    "paligemma": PromptTemplate("paligemma", clean=clean_paligemma, suffix="\n"),
    "pi05": PromptTemplate("pi05", "Task: {instruction}, State: {state};\nAction: ", clean=clean_paligemma),
    # π0-FAST: the answer ("Action: ...") is the model's to write
    "pi0_fast": PromptTemplate("pi0_fast", "Task: {instruction}, State: {state};\n", clean=clean_openpi_fast),
    "openvla": PromptTemplate("openvla", "In: What action should the robot take to {instruction}?\nOut:", clean=_lower),
    "smolvla": PromptTemplate("smolvla", ensure_suffix="\n"),
}


def get_prompt(name: str | PromptTemplate) -> PromptTemplate:
    """A registered template by name, or a custom one from a string containing ``{instruction}``."""
    if isinstance(name, PromptTemplate):
        return name
    if name in PROMPTS:
        return PROMPTS[name]
    if isinstance(name, str) and "{instruction}" in name:
        try:
            name.format(instruction="x", state="0")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"custom prompt template {name!r} is not a valid format string ({e}); use only "
                             "{instruction} and {state} fields and double other braces") from e
        return PromptTemplate("custom", name)
    raise ValueError(f"unknown prompt template {name!r}; known: {sorted(PROMPTS)}, or a string containing "
                     "'{instruction}'")


def tokenize_prompts(tokenizer: Tokenizer, prompt: str | PromptTemplate, instructions: Sequence[str | bytes],
                     max_len: int, states: np.ndarray | None = None,
                     state_dims: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Formatted and tokenized prompts: ids ``[B, max_len]`` int32, mask ``[B, max_len]`` bool (right-padded,
    truncated at ``max_len``). ``states``: ``[B, S]`` normalized, for templates that format the state;
    ``state_dims``: each example's real state dims (the rest is padding, left out of the prompt as π0.5 does).

    A pure function of its inputs (safe inside ``tf.numpy_function``); repeated instructions are memoised.
    """
    template = get_prompt(prompt)
    if template.uses_state and states is None:
        raise ValueError(f"prompt template {template.name!r} formats the state; pass states [B, S]")
    def state_of(i):
        if states is None or not template.uses_state:
            return None
        return states[i] if state_dims is None else states[i][:int(state_dims[i])]

    texts = [template.text(t, state_of(i)) for i, t in enumerate(instructions)]
    # Prompts carrying a state are almost all distinct: memoising them would only churn the cache.
    seqs = encode_texts(tokenizer, texts, cache=not template.uses_state)
    if template.suffix:
        tail = encode_texts(tokenizer, [template.suffix], add_special_tokens=False)[0]
        seqs = [s + tail for s in seqs]
    return pad_ids(seqs, max_len, tokenizer.pad_id)
