"""Merge LoRA adapter(s) into their base and save one folder that plain ``transformers`` loads.

Production holds one model (SPEC §9): the merged folder has the weights (safetensors), the processor
(tokenizer, image processor, the project's chat template) and the generation config, and loads with::

    model = Qwen3VLForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)

Commands::

    python tools/export.py --base /models/Qwen3-VL-4B-Instruct \\
        --adapter outputs/fusion_sft/runs/<run>/adapter --out /models/bbuqc-fused
    # fusion SFT started from base + summary adapter (module.init.adapter_mode=merge): merge both, in order
    python tools/export.py --base /models/Qwen3-VL-4B-Instruct --adapter /runs/summary/adapter \\
        --adapter outputs/fusion_sft/runs/<run>/adapter --out /models/bbuqc-fused
    # the tiny demo model: --base names a preset of conf/model/ (random weights from --seed, as in training)
    python tools/export.py --base tiny --adapter outputs/fusion_sft/runs/<run>/adapter --out /tmp/tiny-fused

``--base`` is a folder (a base or an earlier merged export) or a ``conf/model`` preset name. Without
``--base``, the first adapter's ``bbuqc_base.json`` (written by training beside every adapter) says how to
rebuild its base: the real folder / hub id, or a random-init base's architecture and seed, plus any adapter
that was merged into it before training::

    python tools/export.py --adapter outputs/grpo/runs/<run>/adapter --out /tmp/tiny-fused

Weights are merged in the base's dtype unless ``--dtype`` says otherwise (``float32`` merges without rounding).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch, transformers and peft load inside the functions: `--help` answers at once
    from bbuqc_lightning.models.factory import ModelBundle

log = logging.getLogger("export")
BASE_FILE = "bbuqc_base.json"  # = bbuqc_lightning.callbacks.adapter_checkpoint.BASE_FILE


def load_base(base: str, seed: int = 0, dtype: str | None = None) -> ModelBundle:
    """A base folder (its own dtype unless ``dtype``) or a ``conf/model/<base>.yaml`` preset."""
    from omegaconf import OmegaConf

    from bbuqc_lightning.config import config_dir
    from bbuqc_lightning.models.chat_template import QWEN3_VL_CHAT_TEMPLATE
    from bbuqc_lightning.models.factory import load_model

    folder = Path(base).expanduser()
    if folder.is_dir():
        # Keep the folder's processor (pixel bounds included); ship the project's chat template, the one
        # the adapters were trained with.
        bundle = load_model(
            kind="vl",
            model_name_or_path=str(folder),
            dtype=dtype or _folder_dtype(folder),
            use_project_chat_template=False,
        )
        bundle.processor.chat_template = QWEN3_VL_CHAT_TEMPLATE
        return bundle
    preset = config_dir() / "model" / f"{base}.yaml"
    if not preset.is_file():
        known = sorted(p.stem for p in preset.parent.glob("*.yaml"))
        raise SystemExit(f"error: --base {base!r} is neither a folder nor a model preset ({known})")
    root = OmegaConf.create({"seed": seed, "model": OmegaConf.load(preset)})
    kwargs: dict[str, Any] = OmegaConf.to_container(root.model, resolve=True)  # type: ignore[assignment]
    kwargs.pop("_target_", None)
    if kwargs.get("kind", "vl") != "vl":
        raise SystemExit(f"error: preset {base!r} is not a Qwen3-VL model (kind={kwargs.get('kind')})")
    if dtype:
        kwargs["dtype"] = dtype
    return load_model(**kwargs)


def _folder_dtype(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or {}
    value = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return value if value in ("float32", "bfloat16", "float16") else "float32"


def merge_adapters(bundle: ModelBundle, adapters: Sequence[str | Path]) -> Any:
    """The base with every adapter merged in, in order (each adapter was trained on the previous merge)."""
    from peft import PeftModel

    model = bundle.model
    for adapter in adapters:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise SystemExit(f"error: {adapter} is not a peft adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model


def base_from_adapter(adapter: str | Path, dtype: str | None = None) -> tuple[ModelBundle, list[str], str]:
    """Rebuild the base an adapter was trained on from its ``bbuqc_base.json``: (bundle, adapters merged
    into the base before training, a description for the provenance file)."""
    from bbuqc_lightning.models.factory import load_model

    path = Path(adapter) / BASE_FILE
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: name the base with --base <folder or preset>")
    info = json.loads(path.read_text(encoding="utf-8"))
    kwargs = dict(info["model"])
    if kwargs.get("kind", "vl") != "vl":
        raise SystemExit(f"error: {path}: the base is not a Qwen3-VL model (kind={kwargs.get('kind')})")
    if dtype:
        kwargs["dtype"] = dtype
    if kwargs.get("random_init"):
        kwargs.pop("model_name_or_path", None)
        described = f"preset {info.get('preset')} (random init, seed {kwargs.get('seed')})"
    else:
        kwargs.pop("architecture", None)
        described = str(kwargs.get("model_name_or_path"))
    return load_model(**kwargs), list(info.get("merged_adapters") or []), described


def export(
    base: str | None,
    adapters: Sequence[str | Path],
    out: str | Path,
    seed: int = 0,
    dtype: str | None = None,
) -> Path:
    """Merge and save; returns the output folder. ``base=None``: the first adapter's ``bbuqc_base.json``."""
    from bbuqc_lightning.models.factory import save_model_folder

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: --out {out} exists and is not empty")
    if not adapters and base is None:
        raise SystemExit("error: give --adapter (and --base, unless the adapter has a bbuqc_base.json)")
    provenance: dict[str, Any] = {"base": base, "seed": seed}
    if base is None:
        bundle, merged_first, provenance["base"] = base_from_adapter(adapters[0], dtype)
        adapters = [*merged_first, *adapters]
        del provenance["seed"]  # part of the description
    else:
        bundle = load_base(base, seed, dtype)
    model = merge_adapters(bundle, adapters)
    save_model_folder(model, bundle.processor, out)
    provenance["adapters"] = [str(a) for a in adapters]
    (out / "bbuqc_export.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    log.info("merged %s + %s -> %s", provenance["base"], list(map(str, adapters)), out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base",
        help="base model folder or conf/model preset name (default: the adapter's bbuqc_base.json)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        help="peft adapter folder (repeat to merge several, in order)",
    )
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random-init preset (the run's seed)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="merge/save dtype")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export(args.base, args.adapter, args.out, args.seed, args.dtype)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
