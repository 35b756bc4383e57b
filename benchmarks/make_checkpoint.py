"""Write an MMEngine-shaped training checkpoint of a given scale (run as a child process).

``python benchmarks/make_checkpoint.py OUT.pth --model frcnn-r50 --optimizer adamw``

The keys and their contents follow what MMEngine 0.10.7's ``Runner.save_checkpoint`` writes
(see docs/DESIGN.md): ``meta`` (epoch, iter, cfg text, seed, experiment_name, time,
mmengine_version, dataset_meta with the 80 COCO class names), ``state_dict`` (the model's
parameters and BatchNorm buffers), ``message_hub`` (``HistoryBuffer`` objects holding numpy
arrays of every iteration's scalars, as MessageHub keeps them, plus runtime_info),
``optimizer`` (torch's optimizer state_dict after real steps) and ``param_schedulers``.

Models: ``frcnn-r50`` is the parameter list of MMDetection's Faster R-CNN R50-FPN (41.7M
parameters, 290 tensors); ``vit-l-det`` is a ViT-L/16 backbone with a detection head (~305M
parameters), for the multi-GB case. Prints one JSON line describing what was written.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import torch

from ckptd.simulate import HistoryBuffer  # pickles like mmengine's HistoryBuffer

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)  # fmt: skip
TRAIN_SCALARS = (
    "train/lr", "train/data_time", "train/time", "train/loss", "train/loss_rpn_cls",
    "train/loss_rpn_bbox", "train/loss_cls", "train/acc", "train/loss_bbox", "train/grad_norm",
)  # fmt: skip
VAL_SCALARS = ("coco/bbox_mAP", "coco/bbox_mAP_50", "coco/bbox_mAP_75", "val/time")

Shapes = list[tuple[str, tuple[int, ...], bool]]  # name, shape, is a parameter


def _bn(prefix: str, channels: int) -> Shapes:
    return [
        (f"{prefix}.weight", (channels,), True),
        (f"{prefix}.bias", (channels,), True),
        (f"{prefix}.running_mean", (channels,), False),
        (f"{prefix}.running_var", (channels,), False),
        (f"{prefix}.num_batches_tracked", (), False),
    ]


def frcnn_r50() -> Shapes:
    """MMDetection faster-rcnn_r50_fpn_1x_coco: ResNet-50, FPN, RPN head, 2-fc box head."""
    out: Shapes = [("backbone.conv1.weight", (64, 3, 7, 7), True), *_bn("backbone.bn1", 64)]
    inplanes = 64
    for stage, (planes, blocks) in enumerate(
        zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True), 1
    ):
        for b in range(blocks):
            p = f"backbone.layer{stage}.{b}"
            out += [(f"{p}.conv1.weight", (planes, inplanes, 1, 1), True), *_bn(f"{p}.bn1", planes)]
            out += [(f"{p}.conv2.weight", (planes, planes, 3, 3), True), *_bn(f"{p}.bn2", planes)]
            out += [(f"{p}.conv3.weight", (planes * 4, planes, 1, 1), True)]
            out += _bn(f"{p}.bn3", planes * 4)
            if b == 0:
                out += [(f"{p}.downsample.0.weight", (planes * 4, inplanes, 1, 1), True)]
                out += _bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    for i, channels in enumerate((256, 512, 1024, 2048)):
        out += [(f"neck.lateral_convs.{i}.conv.weight", (256, channels, 1, 1), True)]
        out += [(f"neck.lateral_convs.{i}.conv.bias", (256,), True)]
    for i in range(4):
        out += [(f"neck.fpn_convs.{i}.conv.weight", (256, 256, 3, 3), True)]
        out += [(f"neck.fpn_convs.{i}.conv.bias", (256,), True)]
    out += [
        ("rpn_head.rpn_conv.weight", (256, 256, 3, 3), True),
        ("rpn_head.rpn_conv.bias", (256,), True),
    ]
    out += [
        ("rpn_head.rpn_cls.weight", (3, 256, 1, 1), True),
        ("rpn_head.rpn_cls.bias", (3,), True),
    ]
    out += [
        ("rpn_head.rpn_reg.weight", (12, 256, 1, 1), True),
        ("rpn_head.rpn_reg.bias", (12,), True),
    ]
    head = "roi_head.bbox_head"
    out += [(f"{head}.fc_cls.weight", (81, 1024), True), (f"{head}.fc_cls.bias", (81,), True)]
    out += [(f"{head}.fc_reg.weight", (320, 1024), True), (f"{head}.fc_reg.bias", (320,), True)]
    out += [(f"{head}.shared_fcs.0.weight", (1024, 12544), True)]
    out += [(f"{head}.shared_fcs.0.bias", (1024,), True)]
    out += [(f"{head}.shared_fcs.1.weight", (1024, 1024), True)]
    out += [(f"{head}.shared_fcs.1.bias", (1024,), True)]
    return out  # fmt: skip


def vit_l_det() -> Shapes:
    """A ViT-L/16 backbone (24 blocks, width 1024) with a small detection head: ~305M params."""
    d, p = 1024, "backbone"
    out: Shapes = [(f"{p}.cls_token", (1, 1, d), True), (f"{p}.pos_embed", (1, 197, d), True)]
    out += [(f"{p}.patch_embed.proj.weight", (d, 3, 16, 16), True)]
    out += [(f"{p}.patch_embed.proj.bias", (d,), True)]
    for i in range(24):
        b = f"{p}.layers.{i}"
        out += [(f"{b}.ln1.weight", (d,), True), (f"{b}.ln1.bias", (d,), True)]
        out += [(f"{b}.attn.qkv.weight", (3 * d, d), True), (f"{b}.attn.qkv.bias", (3 * d,), True)]
        out += [(f"{b}.attn.proj.weight", (d, d), True), (f"{b}.attn.proj.bias", (d,), True)]
        out += [(f"{b}.ln2.weight", (d,), True), (f"{b}.ln2.bias", (d,), True)]
        out += [(f"{b}.ffn.layers.0.0.weight", (4 * d, d), True)]
        out += [(f"{b}.ffn.layers.0.0.bias", (4 * d,), True)]
        out += [
            (f"{b}.ffn.layers.1.weight", (d, 4 * d), True),
            (f"{b}.ffn.layers.1.bias", (d,), True),
        ]
    out += [(f"{p}.ln1.weight", (d,), True), (f"{p}.ln1.bias", (d,), True)]
    head = "bbox_head"
    out += [(f"{head}.cls.weight", (81, d), True), (f"{head}.cls.bias", (81,), True)]
    out += [(f"{head}.reg.weight", (4, d), True), (f"{head}.reg.bias", (4,), True)]
    return out  # fmt: skip


def tiny() -> Shapes:
    """ResNet-50's stem and first stage only (~0.2M parameters): for smoke runs."""
    return [
        s
        for s in frcnn_r50()
        if s[0].startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1"))
    ]


MODELS = {"frcnn-r50": frcnn_r50, "vit-l-det": vit_l_det, "tiny": tiny}


def _hub(iters: int, epoch: int, cfg_text: str, meta: dict) -> dict:
    rng = np.random.default_rng(0)
    log_scalars: dict[str, HistoryBuffer] = {}
    for key in TRAIN_SCALARS:
        buf = HistoryBuffer()
        buf._log_history = rng.random(iters)  # what MessageHub keeps: every iteration
        buf._count_history = np.ones(iters, dtype=np.int64)
        log_scalars[key] = buf
    for key in VAL_SCALARS:
        buf = HistoryBuffer()
        buf._log_history = rng.random(epoch)
        buf._count_history = np.ones(epoch, dtype=np.int64)
        log_scalars[key] = buf
    runtime_info = {
        "cfg": cfg_text,
        "seed": meta["seed"],
        "experiment_name": meta["experiment_name"],
        "mmengine_version": "0.10.7",
        "epoch": epoch,
        "iter": iters,
        "max_epochs": 12,
        "max_iters": iters,
        "loop_stage": "train",
        "dataset_meta": meta["dataset_meta"],
        "eta": np.float64(0.0),
        "last_ckpt": f"/work_dirs/faster-rcnn/epoch_{epoch}.pth",
    }
    resumed = {k: True for k in [*runtime_info, *log_scalars]}
    return {"log_scalars": log_scalars, "runtime_info": runtime_info, "resumed_keys": resumed}


def build(model: str, optimizer: str, epoch: int, hub_iters: int, seed: int) -> dict:
    torch.manual_seed(seed)
    shapes = MODELS[model]()
    state_dict: OrderedDict[str, torch.Tensor] = OrderedDict()
    params: list[torch.nn.Parameter] = []
    for name, shape, is_param in shapes:
        if name.endswith("num_batches_tracked"):
            tensor = torch.tensor(hub_iters, dtype=torch.int64)
        elif name.endswith("running_var"):
            tensor = torch.rand(shape) + 0.5
        else:
            tensor = torch.randn(shape) * 0.02
        state_dict[name] = tensor
        if is_param:
            param = torch.nn.Parameter(tensor)  # shares storage: state_dict sees the steps
            param.grad = torch.randn(shape) * 1e-3
            params.append(param)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=0.02, momentum=0.9, weight_decay=1e-4
        )
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    with torch.no_grad():
        opt.step()
        opt.step()
    for param in params:
        param.grad = None
    cfg_text = (
        f"model = dict(type='{model}')\noptim_wrapper = dict(optimizer=dict(type='{optimizer}'))\n"
    )
    cfg_text += "".join(f"# filler line {i} of a real config dump\n" for i in range(200))
    meta = {
        "epoch": epoch,
        "iter": hub_iters,
        "cfg": cfg_text,
        "seed": seed,
        "experiment_name": "faster-rcnn_r50_fpn_1x_coco",
        "time": time.strftime("%Y%m%d_%H%M%S"),
        "mmengine_version": "0.10.7",
        "dataset_meta": {
            "classes": COCO_CLASSES,
            "palette": [(i * 3 % 256, i * 7 % 256, i * 11 % 256) for i in range(80)],
        },
    }
    schedulers = [
        {
            "start_factor": 0.001, "end_factor": 1.0, "total_iters": 499, "begin": 0,
            "end": 500, "last_step": 499, "by_epoch": False, "verbose": False,
            "param_name": "lr", "base_values": [0.02], "_global_step": hub_iters,
            "_last_value": [0.02],
        },
        {
            "milestones": Counter({8: 1, 11: 1}), "gamma": 0.1, "begin": 0, "end": 12,
            "last_step": epoch - 1, "by_epoch": True, "verbose": False, "param_name": "lr",
            "base_values": [0.02], "_global_step": epoch, "_last_value": [0.002],
        },
    ]  # fmt: skip
    return {
        "meta": meta,
        "state_dict": state_dict,
        "message_hub": _hub(hub_iters, epoch, cfg_text, meta),
        "optimizer": opt.state_dict(),
        "param_schedulers": schedulers,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", choices=sorted(MODELS), default="frcnn-r50")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="adamw")
    parser.add_argument("--epoch", type=int, default=12)
    parser.add_argument(
        "--hub-iters",
        type=int,
        default=12 * 7330,
        help="iterations the message hub's histories hold (default: 12 COCO epochs at bs 16)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ckpt = build(args.model, args.optimizer, args.epoch, args.hub_iters, args.seed)
    torch.save(ckpt, args.out)
    sd = ckpt["state_dict"]
    print(
        json.dumps(
            {
                "path": str(args.out),
                "bytes": args.out.stat().st_size,
                "params": sum(t.numel() for t in sd.values() if t.is_floating_point()),
                "tensors": len(sd),
                "weight_bytes": sum(t.numel() * t.element_size() for t in sd.values()),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
