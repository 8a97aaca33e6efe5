"""The GRPO LightningModule with the real tiny Qwen3-VL: trainable boundary, a real update, shared-prefix
forward equality, exact resume, and learning on a reward the tiny model can move.

The two resume tests here drive a bare ``L.Trainer`` and are slow; the default run resumes GRPO through
``train(cfg)`` in ``test_resume.py`` (mid-epoch with dropout from ``last.ckpt`` and from a step checkpoint,
and at an epoch end, checking that a checkpoint stores only the adapters)."""

from __future__ import annotations

import functools
import json
import multiprocessing
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from bbuqc_lightning.config import config_dir
from bbuqc_lightning.grpo.config import GRPOConfig
from bbuqc_lightning.grpo.forward import run_frozen_prefix, run_suffix, select_rows
from bbuqc_lightning.grpo.module import GRPOModule
from bbuqc_lightning.models.decoder import output_embedding
from bbuqc_lightning.models.factory import ModelBundle, build_tokenizer, load_model
from bbuqc_lightning.models.lora import apply_last_k_lora
from bbuqc_lightning.stage_b.datamodule import StageBDataModule
from bbuqc_lightning.stage_b.rewards import format_reward, label_reward
from bbuqc_lightning.train import skipped_inputs

MISSIONS = ["BBU接地线检查", "挡风板安装检查", "BBU线缆布放要求", "BBU安装方式检查（正装）"]


def write_stage_a(path: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        label = "pass" if i % 2 else "fail"
        gid = f"QC-TEMP-20250101-{i:07d}"
        rows.append(
            {
                "group_id": gid,
                "ticket_key": f"{gid}::{label}",
                "mission": MISSIONS[i % 4],
                "label": label,
                "images": ["IMG_1.jpg", "IMG_2.jpg"],
                "per_image": {"图片_1": f"电线/捆扎整齐×{i + 1}", "图片_2": "标签/可以识别×2"},
            }
        )
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def char_length_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """Varies between random completions, so advantages are non-zero and LoRA receives gradients."""
    return [len(c) / 100.0 for c in completions]


class AlignedReward:
    """Mean cosine of the completion's tokens with a fixed random direction of the embedding space.

    A tiny random model's next-token distribution can be tilted towards such a direction by its last
    layers, so GRPO must raise this reward; Stage-B rewards stay at 0 for a random model.
    """

    __name__ = "aligned"

    def __init__(self, embedding: torch.Tensor, seed: int = 0) -> None:
        direction = torch.randn(embedding.shape[1], generator=torch.Generator().manual_seed(seed))
        weights = embedding.detach().float()
        self.scores = (weights @ direction) / weights.norm(dim=1) / direction.norm()
        self.tokenizer = build_tokenizer()

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        ids = [self.tokenizer(c, add_special_tokens=False).input_ids or [0] for c in completions]
        return [10.0 * float(self.scores[i].mean()) for i in ids]


def tiny(init: float = 0.02, seed: int = 0) -> ModelBundle:
    arch = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / "tiny.yaml").architecture)
    arch["text"]["initializer_range"] = init
    return load_model(kind="vl", random_init=True, architecture=arch, seed=seed)


def make_module(bundle: ModelBundle, rewards: dict, lr: float = 1e-2, **grpo: Any) -> GRPOModule:
    config = GRPOConfig(**{"num_generations": 4, "max_new_tokens": 6, "temperature": 1.0, **grpo})
    return GRPOModule(
        bundle,
        config,
        rewards,
        functools.partial(torch.optim.AdamW, lr=lr),
        lora=functools.partial(apply_last_k_lora, k=2, r=4, alpha=8, dropout=0.0),
        micro_batch_size=4,
    )


def make_data(bundle: ModelBundle, tmp_path: Path, n: int = 4, batch_size: int = 2) -> StageBDataModule:
    templates = OmegaConf.to_container(OmegaConf.load(config_dir() / "prompts" / "stage_b.yaml"))
    train = write_stage_a(tmp_path / "train.jsonl", n)
    return StageBDataModule(
        str(train), str(train), templates, processor=bundle.processor, batch_size=batch_size, val_batch_size=4
    )


def trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(tmp_path),
    }
    return L.Trainer(**{**defaults, **kwargs})


def test_only_last_k_lora_parameters_train() -> None:
    module = make_module(tiny(), {"length": char_length_reward})
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in names})
    assert layers == [4, 5]  # tiny has 6 layers; k=2
    assert all(".language_model.layers." in n and ("lora_A" in n or "lora_B" in n) for n in names)
    projections = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in names}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(names) == 2 * 7 * 2  # layers x projections x (A, B)
    assert not any("visual" in n for n, p in module.named_parameters() if p.requires_grad)


def _grouped_batch(groups: int, g: int, prompt: int, completion: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped by prompt (left padding differs per prompt), distinct completions padded after EOS."""
    torch.manual_seed(0)
    prompts = torch.randint(0, 5000, (groups, prompt)).repeat_interleave(g, dim=0)
    completions = torch.randint(0, 5000, (groups * g, completion))
    ids = torch.cat([prompts, completions], dim=1)
    mask = torch.ones_like(ids)
    mask[:g, :3] = 0  # left padding of the first prompt
    mask[1, prompt + 2 :] = 0  # a completion that ended early (right padding)
    return ids, mask


def _policy_with_nonzero_adapters() -> GRPOModule:
    module = make_module(tiny(init=0.3), {"length": char_length_reward})
    for name, param in module.model.named_parameters():  # non-zero adapters, so policy != reference
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    module.model.eval()
    return module


def test_shared_prefix_forward_equals_full_forward() -> None:
    module = _policy_with_nonzero_adapters()
    model = module.model
    g, completion = 3, 5
    ids, mask = _grouped_batch(groups=2, g=g, prompt=10, completion=completion)
    prefix = run_frozen_prefix(model, ids, mask, completion, g, module.num_frozen)
    with torch.no_grad():
        policy = output_embedding(model)(run_suffix(model, prefix))
        full = model(input_ids=ids, attention_mask=mask).logits[:, -completion - 1 : -1]
        with model.disable_adapter():
            reference = output_embedding(model)(run_suffix(model, prefix))
            full_reference = model(input_ids=ids, attention_mask=mask).logits[:, -completion - 1 : -1]
    real = mask[:, -completion - 1 : -1].bool()  # the positions that predict a real completion token
    torch.testing.assert_close(policy[real], full[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reference[real], full_reference[real], rtol=1e-4, atol=1e-4)
    assert (policy[real] - reference[real]).abs().max() > 1e-2  # the adapters do matter


def test_shared_prefix_gradients_equal_full_forward_gradients() -> None:
    """Micro-batches that split a group (2 rows of a 3-row group) still give the full forward's gradients."""
    module = _policy_with_nonzero_adapters()
    model = module.model
    g, completion = 3, 4
    ids, mask = _grouped_batch(groups=2, g=g, prompt=9, completion=completion)
    weights = torch.randn(ids.shape[0], completion, model.config.text_config.vocab_size)
    weights *= mask[:, -completion - 1 : -1, None]  # padded positions differ by design (they see themselves)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return [x.clone() for x in torch.autograd.grad(loss, trainable)]

    full = model(input_ids=ids, attention_mask=mask).logits[:, -completion - 1 : -1]
    expected = grads((full * weights).sum())
    prefix = run_frozen_prefix(model, ids, mask, completion, g, module.num_frozen)
    total = [torch.zeros_like(p) for p in trainable]
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
        logits = output_embedding(model)(run_suffix(model, select_rows(prefix, rows)))
        for acc, grad in zip(total, grads((logits * weights[rows]).sum()), strict=True):
            acc += grad
    for got, want in zip(total, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    assert any(grad.abs().max() > 0 for grad in total)


def test_shared_prefix_rejects_rows_not_grouped_by_prompt() -> None:
    module = _policy_with_nonzero_adapters()
    ids, mask = _grouped_batch(groups=2, g=2, prompt=6, completion=2)
    with pytest.raises(ValueError, match="share their prompt"):
        run_frozen_prefix(module.model, ids[[0, 2, 1, 3]], mask, 2, 2, module.num_frozen)


def test_training_changes_every_trainable_parameter_and_no_frozen_one(tmp_path: Path) -> None:
    bundle = tiny(init=0.3)
    module = make_module(bundle, {"length": char_length_reward, "label": label_reward}, beta=0.04)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            losses.append(float(trainer.callback_metrics["train/loss"]))

    # Two steps: LoRA B starts at zero, so A only receives gradient once B has moved.
    trainer(tmp_path, max_steps=2, callbacks=[Record()]).fit(module, make_data(bundle, tmp_path))
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    for name, param in module.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == param.requires_grad, f"{name}: changed={changed}, trainable={param.requires_grad}"


def test_gpu_trainer_precision_keeps_lora_weights_in_fp32(tmp_path: Path) -> None:
    """``trainer=gpu`` (bf16-mixed) over a bf16 base: LoRA weights stay fp32 and every one of them trains.

    Under bf16-true Lightning would cast them to bf16, where small AdamW steps round away.
    """
    gpu = OmegaConf.load(config_dir() / "trainer" / "gpu.yaml")
    bundle = tiny(init=0.3)
    bundle.model.to(torch.bfloat16)
    module = make_module(bundle, {"length": char_length_reward}, lr=1e-5)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert before and all(p.dtype == torch.float32 for p in before.values())
    trainer(tmp_path, max_steps=2, precision=gpu.precision).fit(module, make_data(bundle, tmp_path))
    for name, param in module.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32, name
            assert not torch.equal(before[name], param.detach()), f"{name} did not change at lr 1e-5"
        else:
            assert param.dtype == torch.bfloat16, name


def test_validation_logs_verdict_metrics(tmp_path: Path) -> None:
    bundle = tiny()
    module = make_module(bundle, {"label": label_reward, "format": format_reward}, reward_weights=[1.0, 0.2])
    t = trainer(tmp_path, max_steps=1, limit_val_batches=1, val_check_interval=1)
    t.fit(module, make_data(bundle, tmp_path))
    metrics = t.callback_metrics
    # A random model writes no valid verdict: invalid answers are never passes.
    assert float(metrics["val/invalid_rate"]) == 1.0
    assert float(metrics["val/false_pass_rate"]) == 0.0
    assert float(metrics["val/accuracy"]) == 0.0
    assert "val/invalid_rate/bbu_grounding" in metrics
    for key in (
        "train/reward",
        "train/rewards/label/mean",
        "train/frac_reward_zero_std",
        "train/kl",
        "train/fail_groups_without_fail",
    ):
        assert key in metrics


@pytest.mark.slow  # default run: test_resume.py::test_grpo_resume_with_more_epochs_starts_the_next_epoch
def test_resume_reproduces_the_next_step(tmp_path: Path) -> None:
    def run(max_steps: int, ckpt: str | None, root: Path) -> list[float]:
        L.seed_everything(0)
        bundle = tiny(init=0.3)
        module = make_module(bundle, {"length": char_length_reward})
        losses: list[float] = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
                losses.append(float(trainer.callback_metrics["train/loss"]))

        saver = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=root, save_last=True, every_n_epochs=1, save_top_k=-1
        )
        t = trainer(root, max_steps=max_steps, callbacks=[Record(), saver], enable_checkpointing=True)
        t.fit(module, make_data(bundle, tmp_path, n=2, batch_size=2), ckpt_path=ckpt)
        return losses

    full = run(2, None, tmp_path / "full")  # one step per epoch: the checkpoint falls on an epoch end
    first = run(1, None, tmp_path / "half")
    resumed = run(2, str(tmp_path / "half" / "last.ckpt"), tmp_path / "half")
    assert first[0] == pytest.approx(full[0], abs=1e-7)
    assert resumed == pytest.approx([full[1]], abs=1e-7)
    checkpoint = torch.load(tmp_path / "half" / "last.ckpt", weights_only=False)
    assert all("lora_" in k for k in checkpoint["state_dict"])  # only the adapters are stored


@pytest.mark.slow  # default run: test_resume.py::test_grpo_resumes_from_last_ckpt_and_from_a_step_checkpoint
def test_resume_mid_epoch_with_dropout_reproduces_the_next_steps(tmp_path: Path) -> None:
    """A checkpoint of step 1 of a 4-step epoch resumes on the same prompts, samples and loss, bit for bit."""

    def run(max_steps: int, ckpt: str | None, root: Path) -> list[tuple[float, list[str]]]:
        L.seed_everything(0)
        bundle = tiny(init=0.3)
        module = GRPOModule(
            bundle,
            GRPOConfig(num_generations=2, max_new_tokens=4, temperature=1.0),
            {"length": char_length_reward},
            functools.partial(torch.optim.AdamW, lr=1e-2),
            lora=functools.partial(apply_last_k_lora, k=2, r=4, alpha=8, dropout=0.2),
        )
        steps: list[tuple[float, list[str]]] = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer: L.Trainer, m: Any, out: Any, batch: Any, i: int) -> None:
                loss = float(trainer.callback_metrics["train/loss"])
                steps.append((loss, [s.ticket_key for s in batch]))

        saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1)
        t = trainer(root, max_steps=max_steps, callbacks=[Record(), saver], enable_checkpointing=True)
        t.fit(module, make_data(bundle, tmp_path, n=4, batch_size=1), ckpt_path=ckpt)
        return steps

    full = run(3, None, tmp_path / "full")
    assert len({keys[0] for _, keys in full}) == 3  # a shuffled order: three different prompts
    assert run(1, None, tmp_path / "half") == full[:1]
    assert run(3, str(tmp_path / "half" / "last.ckpt"), tmp_path / "half") == full[1:]


@pytest.mark.slow
def test_mean_reward_rises_on_a_learnable_reward(tmp_path: Path) -> None:
    L.seed_everything(0)
    bundle = tiny(init=0.3)
    reward = AlignedReward(bundle.model.get_input_embeddings().weight)
    module = make_module(bundle, {"aligned": reward}, num_generations=8, max_new_tokens=4, beta=0.0)
    rewards: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            rewards.append(float(trainer.callback_metrics["train/reward"]))

    data = make_data(bundle, tmp_path, n=8, batch_size=4)
    trainer(tmp_path, max_steps=30, max_epochs=100, callbacks=[Record()]).fit(module, data)
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    print(f"mean reward: first 10 steps {first:.3f}, last 10 steps {last:.3f}")
    assert last > first + 0.1


def test_padded_causal_mask_leaves_no_query_blind() -> None:
    from bbuqc_lightning.grpo.forward import padded_causal_mask

    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    additive = padded_causal_mask(mask, torch.float32)[:, 0]
    allowed = additive == 0
    assert allowed.any(dim=-1).all()  # every query row attends to something: no NaN rows on CUDA
    assert not allowed[0, 3, :2].any()  # real tokens never see padding
    assert allowed[0, 3, 2:].all() and not allowed[1].triu(1).any()  # causal


class _RankReport(L.Callback):
    """Each rank writes how many prompts/rollouts it saw and a fingerprint of its trainable weights."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows: list[int] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: Any, *a: Any
    ) -> None:
        self.rows.append(len(batch))

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        weights = [p.detach().double().sum().item() for p in module.parameters() if p.requires_grad]
        report = {
            "prompts": self.rows,
            "weights": weights,
            "loss": float(trainer.callback_metrics["train/loss"]),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def _ddp_fit(tmp: str) -> None:
    """Two forked DDP ranks fit GRPO for 2 steps; each writes ``rank<r>.json``, the parent ``before.json``."""
    tmp_path = Path(tmp)
    bundle = tiny(init=0.3)
    module = make_module(bundle, {"length": char_length_reward}, scale_rewards="batch", loss_type="dapo")
    before = [p.detach().double().sum().item() for p in module.parameters() if p.requires_grad]
    (tmp_path / "before.json").write_text(json.dumps(before))
    t = trainer(tmp_path, max_steps=2, devices=2, strategy="ddp_fork", callbacks=[_RankReport(tmp_path)])
    t.fit(module, make_data(bundle, tmp_path, n=8, batch_size=2))


def test_ddp_two_cpu_processes_keep_groups_whole_and_weights_in_sync(tmp_path: Path) -> None:
    # Forked ranks cannot run autograd once their parent has (PyTorch refuses autograd after fork), and other
    # tests in this process run backward passes: the ranks fork from a fresh spawned process instead.
    child = multiprocessing.get_context("spawn").Process(target=_ddp_fit, args=(str(tmp_path),))
    child.start()
    child.join()
    assert child.exitcode == 0
    before = json.loads((tmp_path / "before.json").read_text())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Each rank sampled its own prompts (2 per step) with all G rollouts: a group never straddles ranks.
    assert ranks[0]["prompts"] == ranks[1]["prompts"] == [2, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in ranks)
    # DDP averaged the gradients: both ranks hold the same adapters, and they moved.
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=1e-6, abs=1e-9)
    assert ranks[0]["weights"] != pytest.approx(before, rel=1e-9, abs=1e-12)


def test_training_data_without_labels_or_tickets_is_an_error_naming_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unlabelled ticket (``label: null``, inference only) cannot be rewarded: an error naming the file and the
    ticket, or with ``strict=false`` a counted, logged skip; a split left without tickets is an error too."""
    templates = OmegaConf.to_container(OmegaConf.load(config_dir() / "prompts" / "stage_b.yaml"))
    rows = [
        json.loads(line) for line in write_stage_a(tmp_path / "labelled.jsonl", 4).read_text().splitlines()
    ]
    rows[1] |= {"label": None, "ticket_key": rows[1]["group_id"] + "::unlabeled"}
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    processor = build_tokenizer()
    with pytest.raises(
        ValueError, match=rf"{mixed}: 1 of 4 tickets have no label \(first: QC-TEMP-20250101-0000001"
    ):
        StageBDataModule(str(mixed), None, templates, processor=processor).setup("fit")
    with caplog.at_level("WARNING", logger="bbuqc_lightning.stage_b.datamodule"):
        data = StageBDataModule(str(mixed), None, templates, processor=processor, strict=False)
        data.setup("fit")
    assert len(data.samples["train"]) == 3 and data.skipped["train"] == 1 and "skipped" in caplog.text
    assert skipped_inputs(data) == {"data/skipped/train": 1.0}  # what metrics.json gets
    data = StageBDataModule(None, None, templates, processor=processor, test_jsonl=str(mixed))
    data.setup("test")  # evaluation reads unlabelled tickets (inference), training does not
    assert len(data.samples["test"]) == 4
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{empty}: no Stage-B test tickets to use \(0 skipped\)"):
        StageBDataModule(None, None, templates, processor=processor, test_jsonl=str(empty)).setup("test")
