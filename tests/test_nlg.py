"""NLG readers and answer extraction, on the real files of the mirror and on hand-written model outputs."""

from __future__ import annotations

import json

import pytest

from raysdpb.tasks import nlg


@pytest.fixture
def nlg_dir(shared_data_dir):
    return shared_data_dir / "nlg"


@pytest.mark.parametrize(
    "path, reader, count",
    [
        ("gsm8k/train.jsonl", nlg.read_gsm8k, 7473),
        ("gsm8k/test.jsonl", nlg.read_gsm8k, 1319),
        ("svamp/SVAMP.json", nlg.read_svamp, 1000),
        ("aqua/dev.json", nlg.read_aqua, 254),
        ("aqua/test.json", nlg.read_aqua, 254),
        ("mathqa/dev.json", nlg.read_mathqa, 4475),
        ("mathqa/test.json", nlg.read_mathqa, 2985),
        ("hellaswag/hellaswag_val_full.txt.bz2", nlg.read_hellaswag, 10042),
    ],
)
def test_readers_count_and_references_round_trip(path, reader, count, nlg_dir):
    records = reader(nlg_dir / path)
    assert len(records) == count
    extract = nlg.extract_number if path.startswith(("gsm8k", "svamp")) else nlg.extract_choice
    # every reference is defined, and extracting it back from the training answer gives the reference
    assert all(r["reference"] is not None for r in records)
    assert [extract(r["answer"]) for r in records] == [r["reference"] for r in records]


def test_gsm8k_references_match_the_raw_final_numbers(nlg_dir):
    rows = [json.loads(line) for line in (nlg_dir / "gsm8k/test.jsonl").read_text().splitlines()]
    records = nlg.read_gsm8k(nlg_dir / "gsm8k/test.jsonl")
    for row, rec in zip(rows, records):
        raw = row["answer"].split("####")[-1].strip().replace(",", "")
        assert float(rec["reference"]) == float(raw)
        assert "<<" not in rec["answer"]  # calculator annotations are stripped from the training target


def test_svamp_references_are_the_answers(nlg_dir):
    rows = json.loads((nlg_dir / "svamp/SVAMP.json").read_text())
    records = nlg.read_svamp(nlg_dir / "svamp/SVAMP.json")
    assert [float(r["reference"]) for r in records] == [pytest.approx(row["Answer"]) for row in rows]


def test_choice_tasks_have_five_options_and_letter_references(nlg_dir):
    for path, reader in (("aqua/dev.json", nlg.read_aqua), ("mathqa/dev.json", nlg.read_mathqa)):
        for r in reader(nlg_dir / path):
            assert r["reference"] in "ABCDE"
            options = r["prompt"].split("Options:\n")[1].split("\nAnswer:")[0].split("\n")
            assert [o[:2] for o in options] == ["A)", "B)", "C)", "D)", "E)"]


def test_mathqa_option_formats():
    assert nlg._mathqa_options("a ) 24 , b ) 120 , c ) 625 , d ) 720 , e ) 1024") == ["24", "120", "625", "720", "1024"]
    doubled = "a ) a ) 10,700 , b ) b ) 16,000 , c ) c ) 1 , d ) d ) 2 , e ) e ) 3"
    assert nlg._mathqa_options(doubled)[:2] == ["10,700", "16,000"]
    assert nlg._mathqa_options("['a ) 4', 'b ) 4 π', 'c ) 16', 'd ) 8 π', 'e ) 16']")[1] == "4 π"


@pytest.mark.parametrize(
    "output, expected",
    [
        ("She makes 9 * 2 = $18 every day.\nThe answer is 18.", "18"),
        ("The answer is 1,234.", "1234"),
        ("so the total is 1,234,567 dollars", "1234567"),
        ("The temperature fell to -7 degrees. The answer is -7", "-7"),
        ("Half of 5 is 2.5\nThe answer is 2.50.", "2.5"),
        ("#### 72", "72"),
        ("blah 3 apples and 4 pears #### 7 apples", "7"),
        ("He had 3 then 5 then 12.", "12"),
        ("The answer is $42.", "42"),
        ("I do not know.", None),
        ("", None),
        ("The answer is 0.333", "0.333"),
        ("The answer is 5.0", "5"),
    ],
)
def test_extract_number(output, expected):
    assert nlg.extract_number(output) == expected


@pytest.mark.parametrize(
    "output, expected",
    [
        ("The speed is 600.\nThe answer is C.", "C"),
        ("The answer is (b)", "B"),
        ("Options considered... I pick (D)", "D"),
        ("E) 10 looks right", "E"),
        ("No idea at all", None),
        ("The answer is 42", None),
    ],
)
def test_extract_choice(output, expected):
    assert nlg.extract_choice(output) == expected


@pytest.mark.parametrize("value, expected", [(51.0, "51"), ("3,000", "3000"), ("-0.50", "-0.5"), ("abc", None),
                                             (None, None), ("nan", None)])
def test_canonical_number(value, expected):
    assert nlg.canonical_number(value) == expected
