"""`piformer presets`: list the paper's architectures, the sizes, and every config field."""

from __future__ import annotations

from dataclasses import fields

from ..config import ARCH_PRESETS, SIZE_PRESETS, ModelConfig, TrainConfig, field_docs

NAME = "presets"
HELP = "list architecture presets (the paper's names), size presets and config fields"


def add_arguments(p) -> None:
    p.add_argument("--fields", action="store_true", help="also list every ModelConfig/TrainConfig field with its meaning")


def run(args) -> int:
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
