"""What DRDFL-VF's class moments reveal, beside DRDFL's Learngene and a FedNova/FedAvg
gradient (issue 29; the attacks of notebook 03 and :mod:`drdfl_flwr.privacy`).

One CIFAR-10 node (partition 0 of 10, shards of 5 classes, 500 images), one round of
DRDFL-VF trained on it, then each attacker tries to rebuild the node's training images
from what it receives (one target image of each of ``--images`` classes; DLG's success
depends on the image, so one image is not a measurement):

* **FedNova / FedAvg**: DLG (200 L-BFGS iterations) on the classifier gradient of one
  image, DLG's sigmoid LeNet (the notebook's case 1);
* **DRDFL**: DLG on the gradient of the Learngene's losses on that image, the attacker
  rehearsing what it can (the notebook's case 3; a worst case for DRDFL);
* **DRDFL-VF, one image**: feature inversion (:func:`drdfl_flwr.privacy.feature_inversion`)
  of the trunk feature of that image, as a class held by a single image sends it (its
  class mean is that image's feature): the worst case;
* **DRDFL-VF, class mean**: the inversion of the class mean the node sends for that
  image's class (over all its images of the class), scored against the closest of those
  images and against their mean image.

For scale: the PSNR of uniform noise and of the node's mean image against the target,
and of the class's mean image against the closest image of the class (what the class
mean inversion is to be read against: knowing what a class looks like on average).
Prints a table; PSNR in dB, higher means closer to the original.

    python benchmarks/privacy_vf.py --data-dir ../shared/datasets/cifar10
    python benchmarks/privacy_vf.py --smoke       # digits, a few iterations
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from drdfl_flwr import privacy
from drdfl_flwr.config import RunConfig
from drdfl_flwr.data import load_client_data
from drdfl_flwr.node import node_round
from drdfl_flwr.registry import build_learner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/datasets/cifar10")
    parser.add_argument("--dlg-steps", type=int, default=200)
    parser.add_argument("--inversion-steps", type=int, default=500)
    parser.add_argument("--images", type=int, default=3, help="target images, one per class")
    parser.add_argument("--smoke", action="store_true", help="digits, few iterations (a test)")
    args = parser.parse_args(argv)
    if args.smoke:
        cfg = RunConfig(dataset="digits", partitioner="shard", classes_per_client=5)
        args.dlg_steps, args.inversion_steps = 3, 5
    else:
        cfg = RunConfig(
            dataset="cifar10",
            data_dir=args.data_dir,
            partitioner="shard",
            classes_per_client=5,
            subset_train=5000,
            subset_test=1000,
        )
    cfg = cfg.replace(method="drdfl-vf", device="cpu", seed=0)
    torch.manual_seed(0)
    data = load_client_data(cfg, 0, 10)
    node = build_learner(cfg, data.input_shape, data.num_classes)
    node_round(node, [], data, 1, evaluate=False)  # one trained round: the trunk it sends
    classes = data.y_train.unique()[: args.images].tolist()
    print(
        f"{cfg.dataset}: node 0, {len(data.y_train)} training images; one target image "
        f"of each of classes {classes}"
    )
    rows: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    trunk = node.classifier.trunk
    lenet = privacy.DLGLeNet(data.input_shape, data.num_classes)

    def record(name: str, score: float, start: float | None = None) -> None:
        rows.setdefault(name, []).append(score)
        if start is not None:
            seconds[name] = seconds.get(name, 0.0) + time.time() - start

    for k in classes:
        same = data.x_train[data.y_train == k]
        x, y = same[:1], torch.tensor([k])
        start = time.time()
        attack = privacy.dlg(
            privacy.classifier_gradient(lenet, x, y),
            privacy.classifier_rehearsal(lenet),
            x.shape,
            data.num_classes,
            args.dlg_steps,
        )
        record(
            "FedNova / FedAvg: DLG on the classifier gradient", privacy.psnr(attack.image, x), start
        )
        start = time.time()
        attack = privacy.dlg(
            privacy.learngene_gradient(node, x, y),
            privacy.learngene_rehearsal(node.learngene),
            x.shape,
            data.num_classes,
            args.dlg_steps,
        )
        record("DRDFL: DLG on the Learngene's gradient", privacy.psnr(attack.image, x), start)
        with torch.no_grad():
            feature = trunk(x)[0]
        start = time.time()
        image = privacy.feature_inversion(trunk, feature, x.shape[1:], args.inversion_steps).image
        record(
            "DRDFL-VF: inversion of one image's feature (a class of one)",
            privacy.psnr(image, x),
            start,
        )
        start = time.time()
        image = privacy.feature_inversion(
            trunk, node.ring.mean[k], x.shape[1:], args.inversion_steps
        ).image
        closest = max(privacy.psnr(image, img[None]) for img in same)
        record(
            "DRDFL-VF: inversion of the class mean sent, closest image of the class", closest, start
        )
        class_mean = same.mean(0, keepdim=True)
        record(
            "DRDFL-VF: the same, against the class's mean image", privacy.psnr(image, class_mean)
        )
        noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(k)) * 2 - 1
        record("(scale) uniform noise against the target image", privacy.psnr(noise, x))
        record(
            "(scale) the node's mean training image against the target image",
            privacy.psnr(data.x_train.mean(0, keepdim=True), x),
        )
        record(
            "(scale) the class's mean image, closest image of the class",
            max(privacy.psnr(class_mean, img[None]) for img in same),
        )
    print(
        "\n| what the attacker gets | PSNR (dB), mean [min, max] over "
        f"{len(classes)} images | seconds each |"
    )
    print("|---|---:|---:|")
    for name, scores in rows.items():
        spread = f"{sum(scores) / len(scores):.2f} [{min(scores):.2f}, {max(scores):.2f}]"
        each = f"{seconds[name] / len(scores):.0f}" if name in seconds else ""
        print(f"| {name} | {spread} | {each} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
