"""A few hand-written records per task in each public dataset's own schema, for tests, demos and
smoke runs (`write_sample_data(dir)`). They are made up, not taken from the datasets."""
from __future__ import annotations

import json
from pathlib import Path

ARC = [
    {"id": "s1", "question": "Which gas do green plants take in from the air to make food?",
     "choices": {"text": ["oxygen", "carbon dioxide", "helium", "nitrogen"], "label": ["A", "B", "C", "D"]},
     "answerKey": "B"},
    {"id": "s2", "question": "What happens to ice when it is heated?",
     "choices": {"text": ["It melts.", "It freezes.", "It gets darker."], "label": ["1", "2", "3"]},
     "answerKey": "1"},
    {"id": "s3", "question": "How many legs does a spider have?",
     "choices": {"text": ["six", "four", "eight", "ten"], "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
]
ARC_TRAIN = [
    {"id": "t1", "question": "Which object is a source of light?",
     "choices": {"text": ["a mirror", "the Sun", "the Moon", "a window"], "label": ["A", "B", "C", "D"]},
     "answerKey": "B"},
    {"id": "t2", "question": "Which unit measures mass?",
     "choices": {"text": ["metre", "second", "kilogram", "litre"], "label": ["A", "B", "C", "D"]},
     "answerKey": "C"},
    {"id": "t3", "question": "What do bees collect from flowers?",
     "choices": {"text": ["nectar", "sand", "water", "salt"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
]

HELLASWAG = [
    {"ind": 1, "activity_label": "Removing ice from car",
     "ctx_a": "A man stands beside a snowy car holding a scraper.", "ctx_b": "then",
     "ctx": "A man stands beside a snowy car holding a scraper. then",
     "endings": [", the man paints the windshield with wax.", ", the man scrapes the ice off the windshield.",
                 ", the car drives itself to the lake.", ", a dog sings on the roof of the car."],
     "source_id": "s", "split": "val", "split_type": "indomain", "label": "1"},
    {"ind": 2, "activity_label": "Home and Garden",
     "ctx_a": "[header] How to grow tomatoes [title] Choose a sunny spot. [step] Tomatoes need  at least six hours of sun.",
     "ctx_b": "",
     "ctx": "",
     "endings": ["[title] Water the plants deeply. [step] Water at the base in the morning.",
                 "[title] Paint the pots blue.", "[title] Keep them in a dark cupboard [step] Forever.",
                 "[title] Sell the seeds."],
     "source_id": "s", "split": "val", "split_type": "zeroshot", "label": "0"},
    {"ind": 3, "activity_label": "Playing the piano",
     "ctx_a": "A girl sits down at a piano in a large hall.", "ctx_b": "she",
     "ctx": "A girl sits down at a piano in a large hall. she",
     "endings": [" eats the piano keys.", " places her hands on the keys and begins to play.",
                 " throws the bench across the stage.", " falls asleep on the lid."],
     "source_id": "s", "split": "val", "split_type": "indomain", "label": "1"},
]
HELLASWAG_TRAIN = [
    {"ind": 10, "activity_label": "Washing dishes", "ctx_a": "A woman fills a sink with soapy water.", "ctx_b": "she",
     "ctx": "", "endings": [" scrubs the plates with a sponge.", " plants a tree in the sink.",
                            " reads a newspaper to the cups.", " paints the faucet red."],
     "source_id": "s", "split": "train", "split_type": "indomain", "label": "0"},
    {"ind": 11, "activity_label": "Running a marathon", "ctx_a": "Runners line up at the start.", "ctx_b": "the",
     "ctx": "", "endings": [" crowd turns into birds.", " starter fires a pistol and they set off.",
                            " road folds in half.", " runners sit down for dinner."],
     "source_id": "s", "split": "train", "split_type": "indomain", "label": "1"},
    {"ind": 12, "activity_label": "Baking cookies", "ctx_a": "[header] How to bake cookies [title] Preheat the oven.",
     "ctx_b": "", "ctx": "", "endings": ["[step] Mix butter and sugar.", "[step] Freeze the oven.",
                                         "[step] Throw away the flour.", "[step] Paint the tray."],
     "source_id": "s", "split": "train", "split_type": "indomain", "label": "0"},
]

MMLU = [
    {"question": "What is 7 * 8?", "subject": "elementary_mathematics", "choices": ["54", "56", "58", "64"],
     "answer": 1},
    {"question": "  Which organ pumps blood through the body? ", "subject": "anatomy",
     "choices": ["lung", "liver", "heart", "kidney"], "answer": 2},
    {"question": "What is 12 / 4?", "subject": "elementary_mathematics", "choices": ["3", "4", "6", "8"],
     "answer": 0},
]
MMLU_DEV = [
    {"question": "What is 2 + 3?", "subject": "elementary_mathematics", "choices": ["4", "5", "6", "7"], "answer": 1},
    {"question": "What is 9 - 4?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 2},
    {"question": "Which bone is in the upper arm?", "subject": "anatomy",
     "choices": ["femur", "humerus", "tibia", "ulna"], "answer": 1},
    {"question": "How many chambers does the human heart have?", "subject": "anatomy",
     "choices": ["two", "three", "four", "five"], "answer": 2},
]

TRUTHFULQA = [
    {"question": "What happens if you crack your knuckles a lot?",
     "mc1_targets": {"choices": ["Nothing in particular happens if you crack your knuckles a lot.",
                                 "If you crack your knuckles a lot, you will develop arthritis."], "labels": [1, 0]},
     "mc2_targets": {"choices": ["Nothing in particular happens if you crack your knuckles a lot.",
                                 "It is harmless to crack your knuckles.",
                                 "If you crack your knuckles a lot, you will develop arthritis.",
                                 "Your fingers will fall off."], "labels": [1, 1, 0, 0]}},
    {"question": "Can you see the Great Wall of China from the Moon?",
     "mc1_targets": {"choices": ["No, it is too narrow to see from the Moon.", "Yes, it is easy to see.",
                                 "Yes, at night."], "labels": [1, 0, 0]},
     "mc2_targets": {"choices": ["No, it is too narrow to see from the Moon.", "Yes, it is easy to see."],
                     "labels": [1, 0]}},
]

WINOGRANDE = [
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
     "option1": "Sarah", "option2": "Maria", "answer": "1"},
    {"sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
     "option1": "trophy", "option2": "suitcase", "answer": "1"},
    {"sentence": "I poured water from the bottle into the cup until the _ was full.",
     "option1": "bottle", "option2": "cup", "answer": "2"},
]
WINOGRANDE_TRAIN = [
    {"sentence": "The cat chased the mouse until the _ was tired.", "option1": "cat", "option2": "mouse",
     "answer": "1"},
    {"sentence": "Ian helped Dan move because _ had a big truck.", "option1": "Ian", "option2": "Dan",
     "answer": "1"},
    {"sentence": "The ice melted on the road because the _ was warm.", "option1": "ice", "option2": "road",
     "answer": "2"},
]

GSM8K = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A train travels 60 kilometres in one hour. How far does it travel in 3 hours?",
     "answer": "It travels 60 * 3 = <<60*3=180>>180 kilometres.\n#### 180"},
]
GSM8K_TRAIN = [
    {"question": "Ann reads 5 pages a day. How many pages does she read in a week?",
     "answer": "A week has 7 days, so she reads 5 * 7 = <<5*7=35>>35 pages.\n#### 35"},
    {"question": "A shirt costs $1,200 cents. How many dollars is that?",
     "answer": "100 cents make a dollar, so 1200 / 100 = <<1200/100=12>>12 dollars.\n#### 12"},
    {"question": "Lee had 10 sweets and ate 4. How many are left?",
     "answer": "10 - 4 = <<10-4=6>>6 sweets are left.\n#### 6"},
]

FILES = {
    "arc_challenge.jsonl": ARC, "arc_challenge.train.jsonl": ARC_TRAIN,
    "arc_easy.jsonl": ARC, "arc_easy.train.jsonl": ARC_TRAIN,
    "hellaswag.jsonl": HELLASWAG, "hellaswag.train.jsonl": HELLASWAG_TRAIN,
    "mmlu.jsonl": MMLU, "mmlu.dev.jsonl": MMLU_DEV,
    "truthfulqa_mc.jsonl": TRUTHFULQA,
    "winogrande.jsonl": WINOGRANDE, "winogrande.train.jsonl": WINOGRANDE_TRAIN,
    "gsm8k.jsonl": GSM8K, "gsm8k.train.jsonl": GSM8K_TRAIN,
}


def write_sample_data(directory) -> Path:
    """Write every sample file (one JSON object per line) into `directory`; returns it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name, records in FILES.items():
        with open(d / name, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return d
