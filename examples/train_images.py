"""The Smooth-AP recipe on your own images, in the usual folder layout.

    pip install torchvision
    python examples/train_images.py --root /data/CUB_200_2011/images --device cuda --amp

``--root`` holds one folder per class (``root/<class>/<image>.jpg``), as for CUB-200-2011,
Cars196 or Stanford Online Products once arranged that way. The split is class-disjoint, as in
the literature: the classes sorted by folder name, the first half for training and the second
half for testing (CUB: classes 1-100 / 101-200).

The recipe of Brown et al. (ECCV 2020): an ImageNet-pretrained ResNet-50 with its BatchNorm
layers frozen (running statistics fixed; PML's ``set_layers_to_eval``), a linear 512-d layer,
L2-normalised embeddings, Adam, τ = 0.01, and batches of 4 images per class from
MPerClassSampler. Evaluation: Recall@K (``--recall-ks``; CUB/Cars use 1 2 4 8, SOP 1 10 100
1000) and mAP@R, with PML's AccuracyCalculator (faiss; faiss-gpu when installed and on CUDA).
A checkpoint is written after every epoch (``--out``/checkpoint.pt, ``--resume`` continues).

``--backbone tiny`` is a small CNN defined here, for a quick try and for the tests; it needs no
torchvision (PIL loads the images), whereas ``resnet50`` imports torchvision lazily.
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils import common_functions as c_f

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from pml_smoothap import SmoothAPLoss  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def class_disjoint_split(root):
    """{"train": [(path, label)], "test": [...]}: the first half of the sorted class folders
    for training, the second half for testing; labels are the class's sorted index."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if len(classes) < 4:
        raise ValueError(f"{root} needs at least 4 class folders, found {len(classes)}")
    samples = {"train": [], "test": []}
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        part = "train" if label < len(classes) // 2 else "test"
        samples[part] += [(os.path.join(folder, f), label) for f in files]
    return samples


class ImageFolderDataset(torch.utils.data.Dataset):
    """(image tensor, label) for each (path, label) sample, loaded with PIL."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform
        self.labels = np.array([label for _, label in samples])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


class ResizeToTensor:
    """PIL image -> (3, size, size) float tensor in [0, 1], mirrored at random when ``flip``."""

    def __init__(self, size, flip):
        self.size, self.flip = size, flip

    def __call__(self, image):
        image = image.resize((self.size, self.size), Image.BILINEAR)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        if self.flip and torch.rand(()) < 0.5:
            tensor = tensor.flip(-1)
        return tensor


def transforms(backbone, image_size, train):
    if backbone == "tiny":
        return ResizeToTensor(image_size, flip=train)
    from torchvision import transforms as T

    if train:
        resize = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        resize = [T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size)]
    return T.Compose(resize + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class TinyBackbone(torch.nn.Sequential):
    """Three conv blocks and global pooling: (N, 3, H, W) -> (N, 64)."""

    def __init__(self, width=16):
        layers = []
        for in_channels, out_channels in ((3, width), (width, 2 * width), (2 * width, 64)):
            layers += [
                torch.nn.Conv2d(in_channels, out_channels, 3, padding=1),
                torch.nn.BatchNorm2d(out_channels),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
            ]
        super().__init__(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.output_size = 64


def resnet50_backbone(pretrained):
    from torchvision.models import ResNet50_Weights, resnet50

    trunk = resnet50(weights=ResNet50_Weights.IMAGENET1K_V1 if pretrained else None)
    trunk.output_size = trunk.fc.in_features
    trunk.fc = torch.nn.Identity()
    return trunk


class EmbeddingNet(torch.nn.Module):
    """backbone -> linear -> L2-normalised (N, embedding_size)."""

    def __init__(self, backbone, embedding_size):
        super().__init__()
        self.backbone = backbone
        self.embedding = torch.nn.Linear(backbone.output_size, embedding_size)

    def forward(self, images):
        return F.normalize(self.embedding(self.backbone(images)).float(), dim=1)

    def train(self, mode=True):
        """Train mode everywhere except the BatchNorm layers, whose statistics stay frozen."""
        super().train(mode)
        self.backbone.apply(c_f.set_layers_to_eval("BatchNorm"))
        return self


@torch.no_grad()
def embed_dataset(model, dataset, device, batch_size, num_workers, amp):
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    embeddings, labels = [], []
    for images, batch_labels in loader:
        with torch.autocast(device.type, enabled=amp):
            embeddings.append(model(images.to(device)).float())
        labels.append(batch_labels.to(device))
    return torch.cat(embeddings), torch.cat(labels)


def parse_args(argv=None):
    parser = common.new_parser(__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder with one sub-folder per class")
    parser.add_argument("--backbone", choices=("resnet50", "tiny"), default="resnet50")
    parser.add_argument("--no-pretrained", action="store_true", help="resnet50 from scratch")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate")
    parser.add_argument("--weight-decay", type=float, default=4e-4)
    parser.add_argument("--batch-size", type=int, default=224)
    parser.add_argument("--m-per-class", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="default: one pass")
    parser.add_argument("--recall-ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("out", "images"))
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    common.seed_everything(args.seed)
    samples = class_disjoint_split(args.root)
    train_set = ImageFolderDataset(samples["train"], transforms(args.backbone, args.image_size, train=True))
    test_set = ImageFolderDataset(samples["test"], transforms(args.backbone, args.image_size, train=False))
    print(f"{len(train_set)} training images, {len(test_set)} test images (class-disjoint)")

    backbone = TinyBackbone() if args.backbone == "tiny" else resnet50_backbone(not args.no_pretrained)
    model = EmbeddingNet(backbone, args.embedding_size).to(device)
    loss_fn = SmoothAPLoss(temperature=args.temperature)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    else:
        scaler = torch.cuda.amp.GradScaler(enabled=args.amp and device.type == "cuda")
    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    start_epoch, history = 1, []
    if args.resume:
        checkpoint = torch.load(checkpoint_path, map_location=device)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, history = checkpoint["epoch"] + 1, checkpoint["history"]

    steps = args.steps_per_epoch or len(train_set) // args.batch_size
    sampler = MPerClassSampler(
        train_set.labels,
        args.m_per_class,
        batch_size=args.batch_size,
        length_before_new_iter=steps * args.batch_size,
    )
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.num_workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
    )
    os.makedirs(args.out, exist_ok=True)
    for epoch in range(start_epoch, args.epochs + 1):
        model.train()
        start, losses = time.perf_counter(), []
        for images, labels in tqdm(loader, desc=f"epoch {epoch}", disable=args.no_progress, leave=False):
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            with torch.autocast(device.type, enabled=args.amp):
                loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
        embeddings, labels = embed_dataset(
            model, test_set, device, args.batch_size, args.num_workers, args.amp
        )
        metrics = common.retrieval_metrics(embeddings, labels, recall_ks=args.recall_ks)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), **metrics})
        print(
            f"epoch {epoch}: loss {history[-1]['loss']:.4f} ({time.perf_counter() - start:.0f} s)  "
            + common.format_metrics(metrics),
            flush=True,
        )
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
        }
        torch.save({**state, "epoch": epoch, "history": history, "args": vars(args)}, checkpoint_path)
    return history


if __name__ == "__main__":
    main()
