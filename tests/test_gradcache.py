"""Gradient caching (train.micro_batch_size, xray_match.train.gradcache): the gradient of a step that
runs the encoders in chunks equals that of the loss over the whole batch, on 1 and 2 workers.

BatchNorm normalises each chunk (the stated meaning): the reference is the same function in one
autograd graph (every chunk's forward kept, the loss over their concatenation, one backward); with
BatchNorm in eval mode and no dropout it is also the plain full-batch step."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from xray_match.config import load_config
from xray_match.configfile import ConfigError
from xray_match.losses.ranking import hinge_hardest_negatives
from xray_match.train.gradcache import cached_backward, split_batch, total_loss
from xray_match.train.loop import Trainer
from xray_match.train.recipe import DataInfo

B, M, SIZE = 8, 2, 32
WORDS = ["red", "blue", "green", "one", "two", "seven", "left", "of", "a", "digit"]
TOL = 1e-5


def samples(n: int, seed: int = 0) -> list[dict]:
    """Decoded samples (what the shard reader yields): random pixels, saliency, 3 captions each."""
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)

    def pil(c: int) -> Image.Image:
        a = (torch.rand(SIZE, SIZE, c, generator=g) * 255).to(torch.uint8).squeeze(-1).numpy()
        return Image.fromarray(a, "RGB" if c == 3 else "L")

    return [{"image": pil(3), "saliency": pil(1), "key": f"k{i}",
             "meta": {"image_id": i, "captions": [" ".join(rnd.choices(WORDS, k=5)) for _ in range(3)]}}
            for i in range(n)]


def moco_trainer(*over: str, world_size: int = 1, rank: int = 0, wrap=lambda m: m) -> Trainer:
    cfg = load_config("moco_cpu", [f"data.image_size={SIZE}", f"data.batch_size={B // world_size}",
                                   f"ray.num_workers={world_size}", "moco.vision_width=8", "moco.teacher_hidden=[32]",
                                   "moco.embed_dim=16", "moco.queue_size=32", "moco.rerank_top_n=8", *over])
    return Trainer(cfg, DataInfo("", "synthetic", {"train": 64}), rank=rank, world_size=world_size,
                   wrap_model=wrap, log=lambda s: None)


def moco_batch(tr: Trainer, n: int = B, seed: int = 0) -> dict:
    t = tr.recipe.transform(True)
    random.seed(seed)
    return tr.recipe.collate([t(s) for s in samples(n, seed)])


def fill_queue(tr: Trainer) -> None:
    """Keys in every slot of the queue (a queue in use), two of them of a batch image (masked)."""
    s = tr.loss_fn.sampler
    g = torch.Generator().manual_seed(1)
    s.image_queue.copy_(F.normalize(torch.randn(s.image_queue.shape, generator=g), dim=1))
    s.text_queue.copy_(F.normalize(torch.randn(s.text_queue.shape, generator=g), dim=1))
    s.queue_ids.copy_(torch.arange(s.size) + 10_000)
    s.queue_text_ids.copy_(torch.arange(s.size) + 20_000)
    s.queue_ids[:2] = torch.tensor([0, 1])


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def bn_buffers(model: nn.Module, clone: bool = True) -> list[torch.Tensor]:
    return [b.clone() if clone else b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in m.buffers()]


def chunked_reference(recipe, model, loss_fn, batch, chunks: list[dict]) -> torch.Tensor:
    """The per-chunk-BatchNorm function's gradient in one graph: keys once over the batch, every
    chunk's forward with its graph kept, the loss over their concatenation, one backward."""
    once = recipe.embed_once(model, batch)
    parts = [recipe.embed(model, c) for c in chunks]
    loss = total_loss(loss_fn({k: torch.cat([p[k] for p in parts]) for k in parts[0]} | once, batch))
    loss.backward()
    return loss


def hand_chunks(batch: dict, item_fields, caption_fields, per_item: int, m: int = M) -> list[dict]:
    """Chunks cut by hand: items [s, s + m) and their captions [s * per_item, (s + m) * per_item)."""
    n = batch[item_fields[0]].shape[0]
    return [{f: batch[f][s : s + m] for f in item_fields} | {f: batch[f][s * per_item : (s + m) * per_item]
                                                             for f in caption_fields} for s in range(0, n, m)]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], relative: bool = False) -> None:
    """Every gradient entry within TOL (``relative``: TOL times the largest entry, for sums that
    float32 adds in another order, as DDP's all-reduce does)."""
    assert a.keys() == b.keys() and a
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    largest = max(b[k].abs().max().item() for k in b)
    assert worst <= TOL * (max(largest, 1.0) if relative else 1.0), (worst, largest)
    assert largest > 100 * TOL  # gradients far above the tolerance


def check_equal_to_chunked_reference(tr: Trainer, batch: dict, per_item: int = 1, loss_fn: nn.Module | None = None):
    """Cached step == per-chunk reference: gradients, loss, and BatchNorm running averages (updated
    once per chunk by the re-run only), from the same RNG state (dropout on)."""
    loss_fn = loss_fn or tr.loss_fn
    torch.manual_seed(5)
    bn0 = bn_buffers(tr.model)
    tr.optimizer.zero_grad(set_to_none=True)
    _, _, loss = cached_backward(tr.recipe, tr.model, loss_fn, batch, M)
    got, bn_got = grads(tr.model), bn_buffers(tr.model)
    for b, b0 in zip(bn_buffers(tr.model, clone=False), bn0):  # back to the start for the reference
        b.copy_(b0)
    torch.manual_seed(5)
    tr.optimizer.zero_grad(set_to_none=True)
    ref_loss = chunked_reference(tr.recipe, tr.model, loss_fn, batch,
                                 hand_chunks(batch, tr.recipe.item_fields, tr.recipe.caption_fields, per_item))
    assert_same(got, grads(tr.model))
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(bn_got, bn_buffers(tr.model)))
    return got


@pytest.mark.parametrize("sampler", ["batch", "queue", "rerank"])
@pytest.mark.parametrize("gaze", [0.0, 1.0])
def test_infonce_cached_gradient_equals_the_chunked_reference(sampler, gaze):
    tr = moco_trainer(f"moco.sampler={sampler}", f"moco.gaze_prob={gaze}", "moco.dropout=0.3")
    batch = moco_batch(tr)
    if sampler != "batch":
        fill_queue(tr)
    got = check_equal_to_chunked_reference(tr, batch)
    assert any(k.startswith("image.student") for k in got) and any(k.startswith("text.") for k in got)


def test_gaze_batches_are_the_gazed_images():
    """Gaze (Eq. (2)) acts on the input pixels (the transform), not on the model: the cached step
    sees it in the batch. The gazed batch differs from the plain one."""
    plain, gazed = moco_batch(moco_trainer()), moco_batch(moco_trainer("moco.gaze_prob=1.0"))
    assert not torch.allclose(plain["image"], gazed["image"])


@pytest.mark.parametrize("sampler", ["batch", "queue", "rerank"])
def test_cached_step_equals_the_plain_full_batch_step_without_batch_statistics(sampler):
    """BatchNorm in eval mode, no dropout: the model is per-sample, so the cached gradient is the
    plain step's over the whole batch (Trainer.backward with and without train.micro_batch_size)."""
    plain, cached = (moco_trainer(f"moco.sampler={sampler}", "moco.dropout=0.0", f"train.micro_batch_size={m}")
                     for m in (0, M))
    batch = moco_batch(plain)
    out = []
    for tr in (plain, cached):
        if sampler != "batch":
            fill_queue(tr)
        for m in tr.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        outputs, losses, loss = tr.backward(batch)
        out.append((grads(tr.model), outputs, loss))
    assert_same(out[0][0], out[1][0])
    assert out[0][2].item() == pytest.approx(out[1][2].item(), abs=1e-6)
    assert set(out[0][1]) == set(out[1][1])


def test_vsepp_hardest_negative_loss_on_embeddings():
    """VSE++ (RDAN's Eq. (13)) as a loss of embeddings (scores = image_emb @ text_emb.T)."""

    class VSELoss(nn.Module):
        def forward(self, outputs, batch):
            t, i = hinge_hardest_negatives(outputs["image_emb"] @ outputs["text_emb"].T, 0.2)
            return {"rank_loss": t + i}

    tr = moco_trainer("moco.dropout=0.3")
    check_equal_to_chunked_reference(tr, moco_batch(tr), loss_fn=VSELoss())


def test_dspe_cached_gradient_equals_the_chunked_reference():
    """DSPE's Eq. (5) with two sentences per image (the structure terms need them)."""
    from xray_match.recipes.dspe import DSPERecipe, fit_text

    cfg = load_config("dspe_cpu", [f"data.image_size={SIZE}", f"data.batch_size={B}", "dspe.image_hidden=32",
                                   "dspe.text_hidden=32", "dspe.embed_dim=16", "dspe.dropout=0.3", "dspe.top_k=3"])
    data = samples(B)
    info = DataInfo("", "synthetic", {"train": 64}, {"text": fit_text(cfg, [c for s in data for c in s["meta"]["captions"]])})
    tr = Trainer(cfg, info, log=lambda s: None)
    t = tr.recipe.transform(True)
    batch = tr.recipe.collate([t(s) for s in data])
    assert batch["text"].shape[0] == 2 * B and DSPERecipe.caption_fields == ("text",)
    check_equal_to_chunked_reference(tr, batch, per_item=2)


def test_split_batch_groups_captions_by_item():
    batch = {"image": torch.arange(3), "text": torch.arange(6) * 10, "caption_image": torch.tensor([0, 0, 0, 1, 2, 2])}
    chunks = split_batch(batch, 2, ("image",), ("text",))
    assert [c["image"].tolist() for c in chunks] == [[0, 1], [2]]
    assert [c["text"].tolist() for c in chunks] == [[0, 10, 20, 30], [40, 50]]
    assert [c["caption_image"].tolist() for c in chunks] == [[0, 0, 0, 1], [0, 0]]
    for bad in ([1, 0, 0, 1, 2, 2], [0, 0, 0, 1, 2, 3]):
        with pytest.raises(ValueError, match="caption_image sorted"):
            split_batch(batch | {"caption_image": torch.tensor(bad)}, 2, ("image",), ("text",))


def test_queue_is_enqueued_once_per_step_with_the_whole_batch_keys():
    """One training step (the loop's) with caching enqueues the batch's keys once, as the plain step."""
    trs = [moco_trainer("moco.sampler=queue", "moco.dropout=0.0", "data.steps_per_epoch=1", f"train.micro_batch_size={m}")
           for m in (0, M)]
    batch = moco_batch(trs[0])
    for tr in trs:
        tr.train_epoch(batches=[dict(batch)])
    plain, cached = (tr.loss_fn.sampler for tr in trs)
    assert int(cached.ptr) == B and int(cached.filled) == B
    assert torch.equal(cached.queue_ids[:B], batch["image_id"]) and bool((cached.queue_ids[B:] == -1).all())
    assert torch.allclose(cached.image_queue, plain.image_queue, atol=1e-6)
    assert torch.allclose(cached.text_queue, plain.text_queue, atol=1e-6)


def _two_worker_step(rank: int, batch: dict, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.set_num_threads(1)
    n = B // 2
    half = {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}  # one caption per item
    half["caption_image"] = half["caption_image"] - rank * n
    tr = moco_trainer("moco.dropout=0.0", f"train.micro_batch_size={M}", world_size=2, rank=rank,
                      wrap=lambda m: nn.parallel.DistributedDataParallel(m))
    _, _, loss = tr.backward(half)
    torch.save({"loss": loss.item(), "grads": grads(tr.model.module)}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters import torch and load the text model: ~12 s of CPU each
def test_two_workers_cached_gradient_equals_the_global_batch_gradient(tmp_path):
    """2 processes, gloo, DDP (no_sync for all but the last chunk): each rank caches its half of the
    global batch of 8 in chunks of 2, the loss gathers negatives across ranks; the all-reduced
    gradient equals the one-process gradient of the loss over the global batch, per-chunk BatchNorm."""
    import torch.multiprocessing as mp

    tr = moco_trainer("moco.dropout=0.0")
    batch = moco_batch(tr)
    out = str(tmp_path / "grads")
    mp.spawn(_two_worker_step, args=(batch, f"file://{tmp_path / 'store'}", out), nprocs=2)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]
    tr.optimizer.zero_grad(set_to_none=True)
    ref = chunked_reference(tr.recipe, tr.model, tr.loss_fn, batch, hand_chunks(batch, ("image",), ("input_ids", "attention_mask"), 1))
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(ref.item(), abs=1e-6)
    assert_same(ranks[0]["grads"], grads(tr.model), relative=True)
    assert_same(ranks[1]["grads"], grads(tr.model), relative=True)  # DDP all-reduced: every rank holds the same


@pytest.mark.parametrize("preset", ["rdan_cpu", "scan_cpu", "grounding_cpu", "dspe_phrase_cpu"])
def test_models_without_per_sample_embeddings_refuse_the_key(preset):
    with pytest.raises(ConfigError, match=r"^train.micro_batch_size: model '\w+' cannot cache gradients: ") as e:
        load_config(preset, ["train.micro_batch_size=1"])
    assert "\n" not in str(e.value)
    assert load_config(preset).train.micro_batch_size == 0


@pytest.mark.parametrize("override, message", [
    ("train.micro_batch_size=-1", "train.micro_batch_size: -1 is out of range"),
    ("train.micro_batch_size=5", "train.micro_batch_size: 5 does not divide the per-worker batch data.batch_size=32"),
    ("train.micro_batch_size=2.5", "train.micro_batch_size: expected an integer"),
])
def test_micro_batch_size_is_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config("moco_cpu", [override])
    assert load_config("moco_cpu", ["train.micro_batch_size=8"]).train.micro_batch_size == 8
    assert load_config("dspe_cpu", ["train.micro_batch_size=16"]).train.micro_batch_size == 16
