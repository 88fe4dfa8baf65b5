"""Small trained ONNX models that ship with verikit (see `verikit models`).

Each model `NAME` is `zoo/NAME.onnx` plus `zoo/NAME.json` (how it was trained and how it
scored), so `verikit certify NAME --eps ...` works without any download.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Optional


def _zoo():
    return resources.files("verikit.models").joinpath("zoo")


def list_models() -> list[dict]:
    """Metadata of every shipped model (the json next to each ONNX file), sorted by name."""
    out = []
    zoo = _zoo()
    if not zoo.is_dir():
        return out
    for entry in sorted(zoo.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".onnx"):
            name = entry.name[: -len(".onnx")]
            meta_file = zoo.joinpath(name + ".json")
            meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
            meta.setdefault("name", name)
            meta["path"] = str(entry)
            meta["size_kb"] = round(entry.stat().st_size / 1024) if hasattr(entry, "stat") else None
            out.append(meta)
    return out


def shipped_model_path(name: str) -> Optional[str]:
    """The file path of the shipped model `name` (with or without '.onnx'), or None."""
    base = name[: -len(".onnx")] if name.endswith(".onnx") else name
    if not base or "/" in base or "\\" in base:
        return None
    entry = _zoo().joinpath(base + ".onnx")
    return str(entry) if entry.is_file() else None
