"""Every example, in a tiny configuration, so that none of them can rot."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import common  # noqa: E402
import large_batch  # noqa: E402
import temperature  # noqa: E402
import train_digits  # noqa: E402
import train_images  # noqa: E402
import xbm  # noqa: E402

TINY = ["--epochs", "1", "--steps-per-epoch", "4", "--m-per-class", "4", "--width", "16", "--no-progress"]
CHANCE = 0.15  # mAP@R of a random ranking of 10 balanced classes is about 0.1


def in_unit_interval(metrics):
    return all(0.0 <= value <= 1.0 for value in metrics.values())


def test_digits_splits_are_disjoint_and_stated():
    within = common.digits_splits()
    assert [len(within[part]) for part in ("train", "val", "test")] == [718, 180, 899]
    for part in within.values():
        assert set(part.y.tolist()) == set(range(10))
    disjoint = common.digits_splits(class_disjoint=True)
    assert set(disjoint["train"].y.tolist()) == set(disjoint["val"].y.tolist()) == set(range(5))
    assert set(disjoint["test"].y.tolist()) == set(range(5, 10))
    all_images = torch.cat([p.x for p in disjoint.values()]).flatten(1)
    assert len(torch.unique(all_images, dim=0)) == len(torch.unique(all_images.double(), dim=0))
    assert sum(len(p) for p in disjoint.values()) == 1797


def test_random_shift_moves_images_by_at_most_one_pixel():
    torch.manual_seed(0)
    images = torch.zeros(50, 1, 8, 8)
    images[:, :, 3:5, 3:5] = 1
    shifted = common.random_shift(images)
    assert torch.equal(shifted.sum((1, 2, 3)), images.sum((1, 2, 3)))  # the blob stays inside
    rows = shifted.sum((1, 3)).squeeze(1).argmax(1)
    assert set(rows.tolist()) <= {2, 3, 4} and len(set(rows.tolist())) > 1


def test_train_digits_trains_evaluates_and_writes_pictures(tmp_path):
    result = train_digits.main(TINY + ["--steps-per-epoch", "40", "--out", str(tmp_path)])
    metrics = result["metrics"]
    assert set(metrics) == {"raw pixels (64-d)", "untrained network", "pml_smoothap.SmoothAPLoss"}
    assert all(in_unit_interval(m) and set(m) == set(common.MAIN_METRICS) for m in metrics.values())
    trained = metrics["pml_smoothap.SmoothAPLoss"]["mean_average_precision_at_r"]
    assert trained > metrics["untrained network"]["mean_average_precision_at_r"] + 0.1
    assert 0 < result["history"][0]["loss"] < 1 and 0 <= result["history"][0]["val_map_at_r"] <= 1
    for name in ("digits_training.png", "digits_retrieval.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 200
        assert os.path.getsize(tmp_path / name) < 200_000
    reloaded = train_digits.load_checkpoint(tmp_path / "digits_model.pt")
    test_x = common.digits_splits()["test"].x[:20]
    torch.testing.assert_close(
        common.embed(reloaded, test_x, "cpu"), common.embed(result["model"], test_x, "cpu")
    )


def test_train_digits_is_reproducible_and_class_disjoint_option_works(tmp_path):
    args = train_digits.parse_args(TINY + ["--steps-per-epoch", "2", "--class-disjoint"])
    splits = common.digits_splits(class_disjoint=True)
    first, history = train_digits.train_model(args, splits, progress=False)
    second, _ = train_digits.train_model(args, splits, progress=False)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert history[0]["loss"] > 0


def test_compare_and_tune_print_tables(capsys):
    results = train_digits.main(TINY + ["--steps-per-epoch", "2", "--compare", "--compare-seeds", "2"])
    assert list(results) == list(train_digits.COMPARED_LOSSES)
    assert all(len(runs) == 2 and all(in_unit_interval(m) for m in runs) for runs in results.values())
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "±" in line]
    assert len(rows) == len(train_digits.COMPARED_LOSSES)

    scores = train_digits.main(TINY + ["--steps-per-epoch", "1", "--tune", "--tune-seeds", "1"])
    grid = train_digits.TUNING_GRID
    assert len(scores) == len(grid["temperature"]) * len(grid["lr"])
    assert all(0 <= score <= 1 for score in scores.values())


def test_large_batch_example_matches_plain_gradient_and_trains():
    report = large_batch.main(
        ["--images-per-batch", "24", "--views", "4", "--chunk-size", "20", "--steps", "3", "--device", "cpu"]
    )
    assert report["gradient_difference"] < 1e-4
    assert len(report["losses"]) == 3 and all(0 < loss < 1 for loss in report["losses"])
    assert in_unit_interval(report["before"]) and in_unit_interval(report["after"])


def test_xbm_example_ranks_against_the_memory():
    results = xbm.main(TINY + ["--memory-size", "100"])
    plain, memory = results.values()
    assert in_unit_interval(plain["test"]) and in_unit_interval(memory["test"])
    assert memory["test"]["mean_average_precision_at_r"] > CHANCE
    # same seed and batches: only the memory makes the losses differ
    assert memory["history"][0]["loss"] != plain["history"][0]["loss"]


def test_distributed_example_with_torchrun():
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [os.path.join(EXAMPLES, "distributed.py")] + TINY
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes (gloo), 40 per process, 80 ranked per query" in run.stdout
    assert "weights identical across ranks: True" in run.stdout
    map_at_r = float(re.search(r"test: mean_average_precision_at_r=([0-9.]+)", run.stdout).group(1))
    assert CHANCE < map_at_r <= 1


def test_temperature_smooth_ap_tends_to_ap(tmp_path):
    result = temperature.main(
        TINY[:4]
        + ["--checkpoint", str(tmp_path / "missing.pt"), "--points", "5", "--max-images", "300"]
        + ["--out", str(tmp_path), "--no-progress"]
    )
    np.testing.assert_allclose(result["temperatures"][[0, -1]], [1e-4, 1])
    smooth, exact = result["curves"]["trained"]
    assert abs(smooth[0] - exact) < 5e-3  # τ = 1e-4: nearly a step function
    assert smooth[-1] < exact - 0.1  # τ = 1: every rank blurred towards the middle
    assert np.all(np.diff(smooth) <= 1e-6)  # here, a larger τ only blurs more
    assert all(np.all(np.abs(d) <= 2) for d in result["differences"].values())
    assert (tmp_path / "temperature.png").stat().st_size < 200_000


def make_image_folder(root, n_classes=8, per_class=6, size=20):
    """Class k: a noisy image whose colour and stripe period depend on k."""
    rng = np.random.default_rng(0)
    for k in range(n_classes):
        folder = root / f"class_{k:02d}"
        folder.mkdir(parents=True)
        colour = np.array([k % 2, (k // 2) % 2, (k // 4) % 2]) * 200 + 30
        stripes = (np.arange(size) // (1 + k % 3)) % 2
        for i in range(per_class):
            pixels = colour * (0.5 + 0.5 * stripes[:, None, None]) + rng.normal(0, 20, (size, size, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")


def test_train_images_tiny_backbone_checkpoints_and_resumes(tmp_path):
    make_image_folder(tmp_path / "data")
    split = train_images.class_disjoint_split(tmp_path / "data")
    assert {label for _, label in split["train"]} == {0, 1, 2, 3}
    assert {label for _, label in split["test"]} == {4, 5, 6, 7}
    flags = ["--root", str(tmp_path / "data"), "--backbone", "tiny", "--image-size", "16"]
    flags += ["--batch-size", "8"]
    flags += ["--steps-per-epoch", "2", "--num-workers", "0", "--recall-ks", "1", "2", "--lr", "1e-3"]
    flags += ["--embedding-size", "16", "--device", "cpu", "--out", str(tmp_path / "out"), "--no-progress"]
    history = train_images.main(flags + ["--epochs", "1"])
    assert len(history) == 1 and 0 < history[0]["loss"] < 1
    metrics = {k: v for k, v in history[0].items() if k not in ("epoch", "loss")}
    assert set(metrics) == set(common.MAIN_METRICS) | {"recall_at_1", "recall_at_2"}
    assert in_unit_interval(metrics) and metrics["recall_at_1"] <= metrics["recall_at_2"]
    assert metrics["recall_at_1"] == pytest.approx(metrics["precision_at_1"])
    resumed = train_images.main(flags + ["--epochs", "2", "--resume"])
    assert [record["epoch"] for record in resumed] == [1, 2] and resumed[0] == history[0]
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pt")
    assert checkpoint["epoch"] == 2


def test_frozen_batchnorm_keeps_running_statistics():
    model = train_images.EmbeddingNet(train_images.TinyBackbone(), 8).train()
    batchnorm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = batchnorm.running_mean.clone()
    model(torch.rand(4, 3, 16, 16))
    assert model.training and not batchnorm.training and torch.equal(batchnorm.running_mean, before)
