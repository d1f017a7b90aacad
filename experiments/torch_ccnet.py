"""A PyTorch CCNet, written as a PyTorch user would, to time against ours on the same card.

The network is the authors' (NCHW, their module names, so their state dicts
load with `load_state_dict`): a dilated ResNet with the deep stem (output
stride 8: layer2 strides, layer3 dilates by 2, layer4 by 4), the RCCA head
(conva, R shared-weight criss-cross attentions, convb, concat with the
backbone output, bottleneck, classifier) and the auxiliary head on layer3.
BatchNorm (scale |weight| + eps, as their InPlaceABN) + ReLU in the backbone,
BatchNorm + leaky ReLU (slope 0.01) in the heads, Dropout2d(0.1) before each classifier. The criss-cross attention is
plain PyTorch with `bmm`, as mmsegmentation computes it today: the column
energies mask the pixel itself with -inf, one softmax runs over the H + W
energies of each pixel.

Needs PyTorch, which the project does not install (the GPU machines have it; elsewhere
`pip install torch`).

Usage:
  python experiments/torch_ccnet.py --check        logits of a small network against the numpy
                                                   reference (ccnet_jax/numpy_reference.py), CPU
  python experiments/torch_ccnet.py                 CCNet-101 training step as bench_model.py times
                                                   it, batch 2 of 769x769, channels-last, bf16
                                                   autocast and float32 (CUDA)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.01
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def criss_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """NCHW criss-cross aggregation: for each pixel, softmax over its column (itself
    excluded) and its row of <q, k>, applied to v. Returns (B, Cv, H, W)."""
    b, _, h, w = q.shape
    # Columns: one (H x C) @ (C x H) product per (image, column).
    q_col = q.permute(0, 3, 2, 1).reshape(b * w, h, -1)
    k_col = k.permute(0, 3, 1, 2).reshape(b * w, -1, h)
    v_col = v.permute(0, 3, 1, 2).reshape(b * w, -1, h)
    # Rows: one (W x C) @ (C x W) product per (image, row).
    q_row = q.permute(0, 2, 3, 1).reshape(b * h, w, -1)
    k_row = k.permute(0, 2, 1, 3).reshape(b * h, -1, w)
    v_row = v.permute(0, 2, 1, 3).reshape(b * h, -1, w)
    self_mask = torch.where(torch.eye(h, device=q.device, dtype=torch.bool), float("-inf"), 0.0)
    e_col = (torch.bmm(q_col, k_col) + self_mask.to(q_col.dtype)).view(b, w, h, h).permute(0, 2, 1, 3)
    e_row = torch.bmm(q_row, k_row).view(b, h, w, w)
    att = F.softmax(torch.cat([e_col, e_row], dim=3), dim=3)
    a_col = att[..., :h].permute(0, 2, 1, 3).reshape(b * w, h, h)
    a_row = att[..., h:].reshape(b * h, w, w)
    out_col = torch.bmm(v_col, a_col.transpose(1, 2).to(v_col.dtype)).view(b, w, -1, h).permute(0, 2, 3, 1)
    out_row = torch.bmm(v_row, a_row.transpose(1, 2).to(v_row.dtype)).view(b, h, -1, w).permute(0, 2, 1, 3)
    return out_col + out_row


class CrissCrossAttention(nn.Module):
    """1x1 query/key (C/8 channels) and value (C channels) convs with bias; gamma * CCA(x) + x."""

    def __init__(self, channels: int):
        super().__init__()
        self.query_conv = nn.Conv2d(channels, channels // 8, 1)
        self.key_conv = nn.Conv2d(channels, channels // 8, 1)
        self.value_conv = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = criss_cross_attention(self.query_conv(x), self.key_conv(x), self.value_conv(x))
        return self.gamma * out + x


class AuthorsBatchNorm(nn.BatchNorm2d):
    """BatchNorm scaled by |weight| + eps, as the authors' InPlaceABN(Sync) scales (which keeps the
    normalisation invertible), so that their state dicts give their network's function."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight.abs() + self.eps, self.bias,
                            self.training, self.momentum, self.eps)


class BatchNormLeaky(AuthorsBatchNorm):
    """BatchNorm followed by leaky ReLU as one module, as the authors' InPlaceABNSync (which keeps
    their Sequential indices: conv 0, norm 1, dropout 2, classifier 3)."""

    def forward(self, x):
        return F.leaky_relu(super().forward(x), LEAKY_SLOPE)


def conv_bn_leaky(cin: int, cout: int, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=bias), BatchNormLeaky(cout))


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, downsample: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = AuthorsBatchNorm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = AuthorsBatchNorm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = AuthorsBatchNorm(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = (
            nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), AuthorsBatchNorm(planes * 4))
            if downsample
            else None
        )

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class RCCAHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, recurrence: int):
        super().__init__()
        inner = in_channels // 4
        self.recurrence = recurrence
        self.conva = conv_bn_leaky(in_channels, inner)
        self.cca = CrissCrossAttention(inner)
        self.convb = conv_bn_leaky(inner, inner)
        self.bottleneck = nn.Sequential(
            *conv_bn_leaky(in_channels + inner, inner), nn.Dropout2d(0.1), nn.Conv2d(inner, num_classes, 1)
        )

    def forward(self, x):
        y = self.conva(x)
        for _ in range(self.recurrence):
            y = self.cca(y)
        return self.bottleneck(torch.cat([x, self.convb(y)], dim=1))


class CCNet(nn.Module):
    """The authors' CCNet, output stride 8; forward returns [main, aux] logits at 1/8 resolution."""

    def __init__(self, num_classes: int = 19, depth: int = 101, recurrence: int = 2, width: int = 64,
                 blocks: tuple[int, ...] | None = None):
        super().__init__()
        blocks = BLOCKS[depth] if blocks is None else blocks
        self.conv1 = nn.Conv2d(3, width, 3, 2, padding=1, bias=False)
        self.bn1 = AuthorsBatchNorm(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = AuthorsBatchNorm(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = AuthorsBatchNorm(2 * width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        inplanes = 2 * width
        for index, n in enumerate(blocks, start=1):
            planes = width * 2 ** (index - 1)
            stride = 2 if index == 2 else 1
            dilation = {3: 2, 4: 4}.get(index, 1)
            layer = []
            for i in range(n):
                layer.append(Bottleneck(inplanes, planes, stride if i == 0 else 1, dilation, downsample=i == 0))
                inplanes = planes * 4
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        self.head = RCCAHead(inplanes, num_classes, recurrence)
        inner = inplanes // 4
        self.dsn = nn.Sequential(
            *conv_bn_leaky(inplanes // 2, inner, bias=True), nn.Dropout2d(0.1), nn.Conv2d(inner, num_classes, 1)
        )

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.maxpool(self.relu(self.bn3(self.conv3(x))))
        x = self.layer2(self.layer1(x))
        c3 = self.layer3(x)
        return [self.head(self.layer4(c3)), self.dsn(c3)]


def check_against_numpy_reference() -> float:
    """Largest relative logit error of a small float64 network against the numpy reference."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import numpy as np

    from ccnet_jax import numpy_reference as ref

    sd = ref.random_state_dict(ref.authors_shapes(ref.TINY_WIDTH, ref.TINY_BLOCKS, ref.TINY_CLASSES), seed=1)
    model = CCNet(ref.TINY_CLASSES, width=ref.TINY_WIDTH, blocks=ref.TINY_BLOCKS).double().eval()
    model.load_state_dict({name: torch.from_numpy(np.asarray(a)) for name, a in sd.items()}, strict=True)
    images = np.random.default_rng(2).normal(size=(2, 3, 39, 31))
    with torch.no_grad():
        got = model(torch.from_numpy(images))
    expected = ref.ccnet(images, sd, ref.TINY_BLOCKS, recurrence=2)
    worst = 0.0
    for name, g, e in zip(("main", "aux"), got, expected):
        g = g.numpy()
        if g.shape != e.shape:
            raise AssertionError(f"{name} logits: shape {g.shape}, reference {e.shape}")
        worst = max(worst, float(np.abs(g - e).max() / np.abs(e).max()))
    return worst


def time_training_step(batch: int, size: int, steps: int, rounds: int, bf16: bool) -> tuple[list[float], float]:
    """(seconds per step of each round, peak allocated MiB) of the training step, channels-last.

    The step is bench_model.py's: forward, main CE + 0.4 x aux CE (ignore label
    255) on logits upsampled bilinearly (aligned corners) to the label size,
    backward, SGD with momentum 0.9 and weight decay 1e-4. Steps run back to
    back; CUDA events time each round of `steps` steps.
    """
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    # XLA computes float32 convolutions and matmuls in TF32 on Hopper by default; do the same.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = CCNet().to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [
        (torch.randn(batch, 3, size, size, device=device, generator=generator).contiguous(
            memory_format=torch.channels_last),
         torch.randint(0, 19, (batch, size, size), device=device, generator=generator))
        for _ in range(2)
    ]

    def step(images, labels):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            main, aux = model(images)
        loss = 0.0
        for logits, weight in ((main, 1.0), (aux, 0.4)):
            logits = F.interpolate(logits.float(), size=labels.shape[1:], mode="bilinear", align_corners=True)
            loss = loss + weight * F.cross_entropy(logits, labels, ignore_index=255)
        loss.backward()
        optimizer.step()

    for i in range(3):
        step(*batches[i % 2])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            step(*batches[i % 2])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / steps)
    return times, torch.cuda.max_memory_allocated() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only the logits check against the numpy reference")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=769)
    parser.add_argument("--steps", type=int, default=5, help="back-to-back steps per timed round")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timed rounds (the median is reported, and every round in order)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    args = parser.parse_args()
    error = check_against_numpy_reference()
    print(f"torch CCNet vs numpy reference (float64, small network): max relative logit error {error:.2e}")
    if error > 1e-10:
        raise SystemExit("torch CCNet does not match the numpy reference")
    if args.check:
        return
    if not torch.cuda.is_available():
        raise SystemExit("timing the PyTorch CCNet needs a CUDA GPU; --check runs on the CPU")
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; PyTorch CCNet-101, "
          f"batch {args.batch}, {args.size}x{args.size}, channels-last, SGD step; per step, median of "
          f"{args.rounds} rounds of {args.steps} back-to-back steps")
    print(f"{'dtype':9} {'op':7} {'step ms':>9} {'images/s':>9} {'peak MiB':>9} {'each round ms':>13}")
    for dtype_name in args.dtypes:
        times, peak = time_training_step(args.batch, args.size, args.steps, args.rounds,
                                         bf16=dtype_name == "bfloat16")
        seconds = statistics.median(times)
        label = "bf16 autocast" if dtype_name == "bfloat16" else "float32"
        print(f"{dtype_name:9} {'torch':7} {1e3 * seconds:9.1f} {args.batch / seconds:9.2f} {peak:9.0f} "
              f"{' '.join(f'{1e3 * t:.1f}' for t in times)} ({label})", flush=True)


if __name__ == "__main__":
    main()
