"""Product constants: the Chinese strings that are part of the contract, kept in one place.

Prompts live in ``conf/``; everything that parsers, metrics and file layouts must agree on lives here.
"""

from __future__ import annotations

import re
from typing import Final

# Missions (SPEC §2): exact string -> slug used in metric keys and file names.
MISSIONS: Final[dict[str, str]] = {
    "BBU安装方式检查（正装）": "bbu_installation",
    "BBU接地线检查": "bbu_grounding",
    "BBU线缆布放要求": "bbu_cabling",
    "挡风板安装检查": "baffle_installation",
}
SLUG_TO_MISSION: Final[dict[str, str]] = {slug: name for name, slug in MISSIONS.items()}

# Label folders (SPEC §3) -> canonical label.
LABEL_DIRS: Final[dict[str, str]] = {
    "审核通过": "pass",
    "审核不通过": "fail",
    "pass": "pass",
    "fail": "fail",
}
LABEL_DIR_NAMES: Final[dict[str, str]] = {"pass": "审核通过", "fail": "审核不通过"}
LABELS: Final[tuple[str, str]] = ("pass", "fail")

# Group ids and images (SPEC §3).
GROUP_ID_PATTERN: Final[re.Pattern[str]] = re.compile(r"^(QC-[A-Za-z]+-[0-9]{8}-[0-9]+)")
IMAGE_EXTENSIONS: Final[frozenset[str]] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
# Photos in formats the pipeline does not read (phones' HEIC, scanners' TIFF, cameras' raw files): a group folder's
# file with one of these is warned about, not silently left out of its ticket.
OTHER_PHOTO_EXTENSIONS: Final[frozenset[str]] = frozenset(
    {".heic", ".heif", ".tif", ".tiff", ".gif", ".avif", ".jxl", ".dng", ".raw", ".cr2", ".nef", ".arw"}
)
IMAGE_KEY_PREFIX: Final[str] = "图片_"
LEGACY_IMAGE_KEY_PREFIX: Final[str] = "image_"
IRRELEVANT_IMAGE: Final[str] = "无关图片"


def image_key(index: int) -> str:
    """1-based image key as used in Stage-A output and Stage-B prompts: ``image_key(1) == "图片_1"``."""
    return f"{IMAGE_KEY_PREFIX}{index}"


def ticket_key(group_id: str, label: str | None) -> str:
    """Record identity downstream of Stage-A: ``"<group_id>::<label>"`` (label ``None`` -> ``unlabeled``)."""
    return f"{group_id}::{label if label is not None else 'unlabeled'}"


# Summary grammar (SPEC §4).
OBJECT_SEPARATOR: Final[str] = "，"
COUNT_MARK: Final[str] = "×"
REMARK_PREFIX: Final[str] = "备注: "

# The negative items the fused model grew blind to (seed 002: "对负项不敏感"), each as it shows in a summary line:
# a summary that drops one of them turns a fail ticket into a false pass downstream (stage_a/negative_item_recall).
NEGATIVE_ITEMS: Final[dict[str, str]] = {
    "弯曲半径不合理": "弯曲半径不合理",
    "不符合要求": "不符合要求",
    "无保护措施": "无保护措施",
    "标签无法识别": "标签/无法识别",
    "未按要求配备挡风板": "未按要求配备挡风板",
}

# Stage-B verdict contract (SPEC §5).
VERDICT_PASS: Final[str] = "通过"
VERDICT_FAIL: Final[str] = "不通过"
VERDICT_TO_LABEL: Final[dict[str, str]] = {VERDICT_PASS: "pass", VERDICT_FAIL: "fail"}
LABEL_TO_VERDICT: Final[dict[str, str]] = {v: k for k, v in VERDICT_TO_LABEL.items()}
REASON_PREFIXES: Final[tuple[str, str]] = ("理由:", "理由：")
MIN_COPIED_SUMMARY_CHARS: Final[int] = 12

# Qwen3 / Qwen3-VL special tokens (MODEL_NOTES.md).
PAD_TOKEN_ID: Final[int] = 151643
IM_START_ID: Final[int] = 151644
IM_END_ID: Final[int] = 151645
VISION_START: Final[str] = "<|vision_start|>"
VISION_END: Final[str] = "<|vision_end|>"
IMAGE_PAD: Final[str] = "<|image_pad|>"
THINK_OPEN: Final[str] = "<think>"
THINK_CLOSE: Final[str] = "</think>"

# metrics.json keys of a run's GPU memory peaks (GiB; bbuqc_lightning.train.gpu_memory_peaks)
GPU_ALLOCATED_KEY: Final[str] = "gpu/max_memory_allocated_gb"
GPU_RESERVED_KEY: Final[str] = "gpu/max_memory_reserved_gb"
