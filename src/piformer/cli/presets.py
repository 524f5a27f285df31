"""`piformer presets`: list the paper's architectures, the sizes, and every config field."""

from __future__ import annotations

import json
from dataclasses import fields

from ..config import ARCH_PRESETS, SIZE_PRESETS, ModelConfig, TrainConfig, field_docs

NAME = "presets"
HELP = "list architecture presets (the paper's names), size presets and config fields"


def add_arguments(p) -> None:
    p.add_argument("--fields", action="store_true", help="also list every ModelConfig/TrainConfig field with its meaning")
    p.add_argument("--json", action="store_true",
                   help="print architectures, sizes and every field (name, default, meaning) as JSON")


def as_dict() -> dict:
    """Everything `piformer presets --fields` prints, as data."""
    return {
        "architectures": ARCH_PRESETS,
        "sizes": SIZE_PRESETS,
        "fields": {section: [{"name": f.name, "default": f.default, "doc": field_docs(cls).get(f.name, "")}
                             for f in fields(cls)]
                   for section, cls in (("model", ModelConfig), ("train", TrainConfig))},
    }


def run(args) -> int:
    if args.json:
        print(json.dumps(as_dict(), indent=1, default=str))
        return 0
    print("architectures (--preset):")
    for name, values in ARCH_PRESETS.items():
        print(f"  {name:<22} " + ", ".join(f"{k}={v}" for k, v in values.items()))
    print("\nsizes (--size):")
    for name, values in SIZE_PRESETS.items():
        print(f"  {name:<12} " + ", ".join(f"{k}={v}" for k, v in values.items()))
    if args.fields:
        for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
            docs = field_docs(cls)
            print(f"\n{section} fields (--set {section}.NAME=VALUE):")
            for f in fields(cls):
                print(f"  {f.name:<20} {f.default!r:<12} {docs.get(f.name, '')}")
    return 0
