"""tools/export.py: base + a (non-trivial) LoRA adapter, merged into one folder, loads with plain
transformers and gives the same greedy tokens as base + adapter, on a text and an image prompt."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

from bbuqc_lightning.models.lora import apply_last_k_lora

TOOL = Path(__file__).resolve().parents[1] / "tools" / "export.py"


def export_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("export_tool", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def greedy(model: torch.nn.Module, processor: object, messages: list[dict]) -> list[int]:
    inputs = processor.apply_chat_template(  # type: ignore[attr-defined]
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


PROMPTS = [
    [{"role": "user", "content": "请审核工单：图片_1 电线/捆扎整齐×2"}],
    [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", (96, 64), (180, 40, 40))},
                {"type": "text", "text": "描述照片。"},
            ],
        }
    ],
]


def test_merged_folder_matches_base_plus_adapter(tmp_path: Path) -> None:
    tool = export_tool()
    base = tool.load_base("tiny", seed=0)
    peft_model = apply_last_k_lora(base.model, k=3, r=4, alpha=8, dropout=0.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at 0: give the adapter real weights, or the test proves nothing
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.eval()
    ids = base.processor.apply_chat_template(PROMPTS[0], tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(**ids).logits
    with torch.no_grad():
        assert (peft_model(**ids).logits - plain).abs().max() > 1.0  # the adapter changes the model
    adapted = [greedy(peft_model, base.processor, m) for m in PROMPTS]
    peft_model.save_pretrained(str(tmp_path / "adapter"))

    assert (
        tool.main(["--base", "tiny", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")])
        == 0
    )
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    assert (out / "chat_template.jinja").is_file()
    merged = Qwen3VLForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert [greedy(merged, processor, m) for m in PROMPTS] == adapted
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with pytest.raises(SystemExit, match="not empty"):
        tool.export("tiny", [], out)
