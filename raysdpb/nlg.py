"""Decoder-only (NLG) tasks: readers of the original file formats, prompt templates and answer extraction.

Records are `{"idx", "prompt", "answer", "reference"}`: the model is trained on `prompt + answer` (loss and
vocabulary map over the answer tokens only) and evaluated by generating from `prompt` and comparing the
extracted answer with `reference` (a canonical number string, or an option letter).

Answers always end with "The answer is X." so that extraction has one pattern to look for first; it
falls back to GSM8K's `#### X`, then to the last number (or option letter) in the text.
"""

from __future__ import annotations

import bz2
import json
import re
from pathlib import Path

__all__ = [
    "canonical_number", "extract_number", "extract_choice", "gsm8k_reference",
    "read_gsm8k", "read_svamp", "read_aqua", "read_mathqa", "read_hellaswag", "LETTERS",
]

LETTERS = "ABCDE"
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"answer is[:\s]*\(?\s*(-?\$?[\d,]*\.?\d+)", re.IGNORECASE)
_CHOICE_IS = re.compile(r"answer is[:\s]*\(?\s*([A-Ea-e])\b")


def canonical_number(text: str | float | int | None) -> str | None:
    """'1,234.50' -> '1234.5', '-3.0' -> '-3', '$5' -> '5'; None when it is not a number."""
    if text is None:
        return None
    s = str(text).strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    if value == int(value):
        return str(int(value))
    return repr(round(value, 6)).rstrip("0").rstrip(".")


def extract_number(output: str) -> str | None:
    """The final numeric answer in a model output: 'The answer is X', else '#### X', else the last number."""
    m = _ANSWER_IS.findall(output)
    if m:
        return canonical_number(m[-1])
    if "####" in output:
        numbers = _NUMBER.findall(output.split("####")[-1])
        if numbers:
            return canonical_number(numbers[0])
    numbers = _NUMBER.findall(output)
    return canonical_number(numbers[-1]) if numbers else None


def extract_choice(output: str, letters: str = LETTERS) -> str | None:
    """The chosen option letter: 'The answer is (C)', else the last standalone letter like '(C)' or 'C)'."""
    m = _CHOICE_IS.findall(output)
    if m and m[-1].upper() in letters:
        return m[-1].upper()
    candidates = re.findall(r"(?:^|[\s(])([A-E])(?:[).:\s]|$)", output)
    candidates = [c for c in candidates if c in letters]
    return candidates[-1] if candidates else None


def gsm8k_reference(answer: str) -> str | None:
    """The final number of a GSM8K reference solution (`... #### 72`)."""
    return canonical_number(answer.split("####")[-1].strip()) if "####" in answer else None


def _strip_calculator(text: str) -> str:
    return re.sub(r"<<[^>]*>>", "", text)


def _records(items: list[tuple[str, str, str]]) -> list[dict]:
    return [{"idx": i, "prompt": p, "answer": a, "reference": r} for i, (p, a, r) in enumerate(items)]


def _load_json_or_lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_gsm8k(path: Path) -> list[dict]:
    items = []
    for row in _load_json_or_lines(path):
        reference = gsm8k_reference(row["answer"])
        rationale = _strip_calculator(row["answer"].split("####")[0]).strip()
        items.append((f"Question: {row['question'].strip()}\nAnswer:",
                      f" {rationale}\nThe answer is {reference}.", reference))
    return _records(items)


def read_svamp(path: Path) -> list[dict]:
    items = []
    for row in _load_json_or_lines(path):
        reference = canonical_number(row["Answer"])
        question = f"{row['Body'].strip()} {row['Question'].strip()}"
        equation = row["Equation"].strip()
        items.append((f"Question: {question}\nAnswer:", f" {equation} = {reference}\nThe answer is {reference}.",
                      reference))
    return _records(items)


def _choice_prompt(question: str, options: list[str]) -> str:
    lines = "\n".join(f"{LETTERS[i]}) {opt}" for i, opt in enumerate(options))
    return f"Question: {question.strip()}\nOptions:\n{lines}\nAnswer:"


def read_aqua(path: Path) -> list[dict]:
    items = []
    for row in _load_json_or_lines(path):
        options = [re.sub(r"^[A-E]\)\s*", "", o).strip() for o in row["options"]]
        letter = row["correct"].strip().upper()
        items.append((_choice_prompt(row["question"], options),
                      f" {row['rationale'].strip()}\nThe answer is {letter}.", letter))
    return _records(items)


def _mathqa_options(text: str) -> list[str]:
    """'a ) 24 , b ) 120 , ...' -> ['24', '120', ...]; some records repeat the marker ('a ) a ) 3'), some
    are a Python list literal ("['a ) 4', 'b ) 4 π', ...]")."""
    if text.startswith("[") and text.endswith("]"):
        import ast

        return [re.sub(r"^[a-e]\s?\)\s?", "", item).strip() for item in ast.literal_eval(text)]
    starts = []
    for letter in "abcde":
        m = re.compile(rf"(?:^|\s,\s*){letter}\s?\)\s?").search(text, starts[-1][1] if starts else 0)
        if m is None:
            break
        starts.append((m.start(), m.end()))
    options = []
    for k, (_, end) in enumerate(starts):
        stop = starts[k + 1][0] if k + 1 < len(starts) else len(text)
        option = text[end:stop].strip()
        option = re.sub(rf"^{'abcde'[k]}\s?\)\s?", "", option).strip()
        options.append(option)
    return options


def read_mathqa(path: Path) -> list[dict]:
    items = []
    for row in _load_json_or_lines(path):
        options = _mathqa_options(row["options"])
        letter = row["correct"].strip().upper()
        rationale = row["Rationale"].strip().strip('"')
        items.append((_choice_prompt(row["Problem"], options), f" {rationale}\nThe answer is {letter}.", letter))
    return _records(items)


def read_hellaswag(path: Path) -> list[dict]:
    """The derived text release: 6 lines per task (context, gold label 0-3, four endings)."""
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, label, 4 endings)")
    items = []
    for k in range(0, len(lines), 6):
        context, label, endings = lines[k], int(lines[k + 1]), lines[k + 2:k + 6]
        letter = LETTERS[label]
        prompt = _choice_prompt(f"Choose the most plausible ending.\n{context}", endings)
        items.append((prompt, f" {endings[label].strip()}\nThe answer is {letter}.", letter))
    records = _records(items)
    for k, r in enumerate(records):
        r["endings"] = lines[6 * k + 2:6 * k + 6]
        r["context"] = lines[6 * k]
    return records
