"""Decoder-only (NLG) tasks: readers of the original file formats, prompt templates and answer extraction.

Records are `{"idx", "prompt", "answer", "reference"}`: the model is trained on `prompt + answer` (loss and
vocabulary map over the answer tokens only) and evaluated by generating from `prompt` and comparing the
extracted answer with `reference` (a canonical number string, or an option letter).

Answers always end with "The answer is X." so that extraction has one pattern to look for first; it
falls back to GSM8K's `#### X`, then to the last number (or option letter) in the text.

The tasks built from these (`nlg/gsm8k`, ...) are registered in `nlg_tasks.py`.
"""

from __future__ import annotations

import bz2
import json
import re
from pathlib import Path

__all__ = [
    "canonical_number", "extract_number", "extract_choice", "gsm8k_reference", "LETTERS",
    "gsm8k_example", "svamp_example", "aqua_example", "mathqa_example", "hellaswag_example", "hellaswag_hub_row",
    "hellaswag_rows", "read_gsm8k", "read_svamp", "read_aqua", "read_mathqa", "read_hellaswag",
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


def _records(examples: list[dict]) -> list[dict]:
    return [{"idx": i, **e} for i, e in enumerate(examples)]


def _load_json_or_lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- one record from one source row (the same for the hub's rows and the mirror's files) -------------------

def gsm8k_example(row: dict) -> dict:
    """`question`, `answer` (a rationale with `<<calc>>` annotations, then `#### n`)."""
    reference = gsm8k_reference(row["answer"])
    if reference is None:
        raise ValueError("answer: no '#### <number>' final answer")
    rationale = _strip_calculator(row["answer"].split("####")[0]).strip()
    return {"prompt": f"Question: {row['question'].strip()}\nAnswer:",
            "answer": f" {rationale}\nThe answer is {reference}.", "reference": reference}


def svamp_example(row: dict) -> dict:
    """`Body`, `Question`, `Equation`, `Answer` (a float)."""
    reference = canonical_number(row["Answer"])
    if reference is None:
        raise ValueError(f"Answer: {row['Answer']!r} is not a number")
    question = f"{row['Body'].strip()} {row['Question'].strip()}"
    return {"prompt": f"Question: {question}\nAnswer:",
            "answer": f" {row['Equation'].strip()} = {reference}\nThe answer is {reference}.", "reference": reference}


def _choice_prompt(question: str, options: list[str]) -> str:
    lines = "\n".join(f"{LETTERS[i]}) {opt}" for i, opt in enumerate(options))
    return f"Question: {question.strip()}\nOptions:\n{lines}\nAnswer:"


def _letter(value: str, n_options: int) -> str:
    letter = str(value).strip().upper()
    if len(letter) != 1 or letter not in LETTERS[:n_options]:
        raise ValueError(f"correct: {value!r} is not one of the option letters {LETTERS[:n_options]}")
    return letter


def aqua_example(row: dict) -> dict:
    """`question`, `options` (["A)...", ...]), `rationale`, `correct` (a letter)."""
    options = [re.sub(r"^[A-E]\)\s*", "", o).strip() for o in row["options"]]
    letter = _letter(row["correct"], len(options))
    return {"prompt": _choice_prompt(row["question"], options),
            "answer": f" {row['rationale'].strip()}\nThe answer is {letter}.", "reference": letter,
            "candidates": options}


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


def mathqa_example(row: dict) -> dict:
    """`Problem`, `Rationale`, `options` ("a ) 24 , b ) 120 , ..."), `correct` (a-e)."""
    options = _mathqa_options(row["options"])
    letter = _letter(row["correct"], len(options))
    rationale = row["Rationale"].strip().strip('"')
    return {"prompt": _choice_prompt(row["Problem"], options),
            "answer": f" {rationale}\nThe answer is {letter}.", "reference": letter, "candidates": options}


def hellaswag_example(row: dict) -> dict:
    """`context`, `label` (0-3), `endings` (four). The hub's rows are mapped to these by `hellaswag_hub_row`."""
    context, endings = row["context"], [e.strip() for e in row["endings"]]
    label = int(row["label"])
    if not 0 <= label < len(endings):
        raise ValueError(f"label: {row['label']!r} is not an ending index 0-{len(endings) - 1}")
    letter = LETTERS[label]
    return {"prompt": _choice_prompt(f"Choose the most plausible ending.\n{context}", endings),
            "answer": f" {endings[label]}\nThe answer is {letter}.", "reference": letter,
            # log-likelihood scoring (choice_scoring: loglikelihood) scores each ending after the context alone
            "candidates": endings, "scoring_context": context}


def hellaswag_hub_row(row: dict) -> dict:
    """A `Rowan/hellaswag` row (activity_label, ctx, endings, label as a string) in the form above."""
    return {"context": f"{row['activity_label']}: {row['ctx']}", "label": row["label"], "endings": row["endings"]}


def hellaswag_rows(path: Path) -> list[dict]:
    """The derived text release: 6 lines per task (context, gold label 0-3, four endings)."""
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, label, 4 endings)")
    return [{"context": lines[k], "label": lines[k + 1], "endings": lines[k + 2:k + 6]}
            for k in range(0, len(lines), 6)]


# --- whole files (the mirror's formats) --------------------------------------------------------------------

def read_gsm8k(path: Path) -> list[dict]:
    return _records([gsm8k_example(r) for r in _load_json_or_lines(path)])


def read_svamp(path: Path) -> list[dict]:
    return _records([svamp_example(r) for r in _load_json_or_lines(path)])


def read_aqua(path: Path) -> list[dict]:
    return _records([aqua_example(r) for r in _load_json_or_lines(path)])


def read_mathqa(path: Path) -> list[dict]:
    return _records([mathqa_example(r) for r in _load_json_or_lines(path)])


def read_hellaswag(path: Path) -> list[dict]:
    return _records([hellaswag_example(r) for r in hellaswag_rows(path)])
