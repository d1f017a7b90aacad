"""An independent float64 numpy model of the authors' PyTorch CCNet (NCHW): the oracle of the model tests.

State dicts here are built from the PyTorch module names and shapes
(the authors' code), not from ccnet_jax, so the tests check the
converter and the Flax modules against PyTorch's conventions.
"""

from __future__ import annotations

import numpy as np

BN_EPS = 1e-5
LEAKY_SLOPE = 0.01


# ---- PyTorch names and shapes -------------------------------------------------------------

def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def backbone_shapes(width: int, blocks: tuple[int, ...], stem: str = "deep") -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {}
    if stem == "deep":
        s["conv1.weight"] = (width, 3, 3, 3)
        s.update(_bn("bn1", width))
        s["conv2.weight"] = (width, width, 3, 3)
        s.update(_bn("bn2", width))
        s["conv3.weight"] = (2 * width, width, 3, 3)
        s.update(_bn("bn3", 2 * width))
        inplanes = 2 * width
    else:
        s["conv1.weight"] = (width, 3, 7, 7)
        s.update(_bn("bn1", width))
        inplanes = width
    for layer, n in enumerate(blocks, start=1):
        planes = width * 2 ** (layer - 1)
        for i in range(n):
            p = f"layer{layer}.{i}"
            s[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            s.update(_bn(f"{p}.bn1", planes))
            s[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            s.update(_bn(f"{p}.bn2", planes))
            s[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            s.update(_bn(f"{p}.bn3", planes * 4))
            if i == 0:
                s[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                s.update(_bn(f"{p}.downsample.1", planes * 4))
            inplanes = planes * 4
    return s


def authors_shapes(width: int, blocks: tuple[int, ...], num_classes: int) -> dict[str, tuple[int, ...]]:
    s = backbone_shapes(width, blocks, "deep")
    c4, c3 = 32 * width, 16 * width
    inner = c4 // 4
    s["head.conva.0.weight"] = (inner, c4, 3, 3)
    s.update(_bn("head.conva.1", inner))
    for name, out in (("query_conv", inner // 8), ("key_conv", inner // 8), ("value_conv", inner)):
        s[f"head.cca.{name}.weight"] = (out, inner, 1, 1)
        s[f"head.cca.{name}.bias"] = (out,)
    s["head.cca.gamma"] = (1,)
    s["head.convb.0.weight"] = (inner, inner, 3, 3)
    s.update(_bn("head.convb.1", inner))
    s["head.bottleneck.0.weight"] = (inner, c4 + inner, 3, 3)
    s.update(_bn("head.bottleneck.1", inner))
    s["head.bottleneck.3.weight"] = (num_classes, inner, 1, 1)
    s["head.bottleneck.3.bias"] = (num_classes,)
    s["dsn.0.weight"] = (inner, c3, 3, 3)
    s["dsn.0.bias"] = (inner,)
    s.update(_bn("dsn.1", inner))
    s["dsn.3.weight"] = (num_classes, inner, 1, 1)
    s["dsn.3.bias"] = (num_classes,)
    return s


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights with PyTorch-like scales, positive variances, gamma = 0.7."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            out[name] = np.array(7, np.int64)
        elif name.endswith("running_var"):
            out[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif name.endswith("running_mean"):
            out[name] = rng.normal(0.0, 0.3, shape).astype(np.float32)
        elif name.endswith("gamma"):
            out[name] = np.full(shape, 0.7, np.float32)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            out[name] = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
        elif name.rsplit(".", 1)[0] + ".running_mean" in shapes:  # BN affine parameters
            base = 1.0 if name.endswith("weight") else 0.0
            out[name] = (base + rng.normal(0.0, 0.1, shape)).astype(np.float32)
        else:
            out[name] = rng.normal(0.0, 0.1, shape).astype(np.float32)
    return out


# ---- PyTorch semantics in numpy (NCHW, float64) --------------------------------------------

def conv2d(x, w, b=None, stride=1, padding=0, dilation=1):
    """torch.nn.functional.conv2d: symmetric zero padding, dilation, stride."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out = np.zeros((n, o, oh, ow))
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dilation, j * dilation
            patch = xp[:, :, r0 : r0 + stride * (oh - 1) + 1 : stride, c0 : c0 + stride * (ow - 1) + 1 : stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    if b is not None:
        out += np.asarray(b, np.float64)[None, :, None, None]
    return out


def max_pool2d(x, kernel=3, stride=2, padding=1, ceil_mode=False):
    """torch.nn.functional.max_pool2d, output size by PyTorch's pooling_output_shape."""
    n, c, h, w = x.shape

    def out_size(size):
        numerator = size + 2 * padding - (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
        o = numerator // stride + 1
        if ceil_mode and (o - 1) * stride >= size + padding:
            o -= 1
        return o

    oh, ow = out_size(h), out_size(w)
    out = np.empty((n, c, oh, ow))
    for i in range(oh):
        r0 = i * stride - padding
        rows = slice(max(r0, 0), min(r0 + kernel, h))
        for j in range(ow):
            c0 = j * stride - padding
            out[:, :, i, j] = x[:, :, rows, max(c0, 0) : min(c0 + kernel, w)].max(axis=(2, 3))
    return out


def bn_eval(x, sd, prefix):
    """The authors' BatchNorm (InPlaceABN) in eval mode: running statistics, scale |weight| + eps."""
    mean = sd[f"{prefix}.running_mean"].astype(np.float64)[None, :, None, None]
    var = sd[f"{prefix}.running_var"].astype(np.float64)[None, :, None, None]
    weight = np.abs(sd[f"{prefix}.weight"].astype(np.float64))[None, :, None, None] + BN_EPS
    bias = sd[f"{prefix}.bias"].astype(np.float64)[None, :, None, None]
    return (x - mean) / np.sqrt(var + BN_EPS) * weight + bias


def relu(x):
    return np.maximum(x, 0.0)


def leaky_relu(x):
    return np.where(x >= 0, x, LEAKY_SLOPE * x)


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def criss_cross(x, sd, prefix):
    """The authors' CrissCrossAttention.forward in NCHW: gamma * (out_H + out_W) + x."""
    q = conv2d(x, sd[f"{prefix}.query_conv.weight"], sd[f"{prefix}.query_conv.bias"])
    k = conv2d(x, sd[f"{prefix}.key_conv.weight"], sd[f"{prefix}.key_conv.bias"])
    v = conv2d(x, sd[f"{prefix}.value_conv.weight"], sd[f"{prefix}.value_conv.bias"])
    h = x.shape[2]
    e_h = np.einsum("bchw,bciw->bhwi", q, k)  # query (h, w) against key (i, w) of its column
    e_h = e_h + np.where(np.eye(h, dtype=bool), -np.inf, 0.0)[None, :, None, :]
    e_w = np.einsum("bchw,bchj->bhwj", q, k)  # query (h, w) against key (h, j) of its row
    att = softmax(np.concatenate([e_h, e_w], axis=3), axis=3)
    a_h, a_w = att[..., :h], att[..., h:]
    out = np.einsum("bciw,bhwi->bchw", v, a_h) + np.einsum("bchj,bhwj->bchw", v, a_w)
    return float(sd[f"{prefix}.gamma"][0]) * out + x


def stem(x, sd):
    x = relu(bn_eval(conv2d(x, sd["conv1.weight"], stride=2, padding=1), sd, "bn1"))
    x = relu(bn_eval(conv2d(x, sd["conv2.weight"], padding=1), sd, "bn2"))
    x = relu(bn_eval(conv2d(x, sd["conv3.weight"], padding=1), sd, "bn3"))
    return max_pool2d(x, 3, 2, 1, ceil_mode=True)


def bottleneck(x, sd, prefix, stride=1, dilation=1):
    y = relu(bn_eval(conv2d(x, sd[f"{prefix}.conv1.weight"]), sd, f"{prefix}.bn1"))
    y = relu(bn_eval(conv2d(y, sd[f"{prefix}.conv2.weight"], stride=stride, padding=dilation,
                            dilation=dilation), sd, f"{prefix}.bn2"))
    y = bn_eval(conv2d(y, sd[f"{prefix}.conv3.weight"]), sd, f"{prefix}.bn3")
    if f"{prefix}.downsample.0.weight" in sd:
        x = bn_eval(conv2d(x, sd[f"{prefix}.downsample.0.weight"], stride=stride), sd, f"{prefix}.downsample.1")
    return relu(y + x)


def head(x, sd, recurrence):
    y = leaky_relu(bn_eval(conv2d(x, sd["head.conva.0.weight"], padding=1), sd, "head.conva.1"))
    for _ in range(recurrence):
        y = criss_cross(y, sd, "head.cca")
    y = leaky_relu(bn_eval(conv2d(y, sd["head.convb.0.weight"], padding=1), sd, "head.convb.1"))
    y = np.concatenate([x, y], axis=1)
    y = leaky_relu(bn_eval(conv2d(y, sd["head.bottleneck.0.weight"], padding=1), sd, "head.bottleneck.1"))
    return conv2d(y, sd["head.bottleneck.3.weight"], sd["head.bottleneck.3.bias"])


def dsn(x, sd):
    y = leaky_relu(bn_eval(conv2d(x, sd["dsn.0.weight"], sd["dsn.0.bias"], padding=1), sd, "dsn.1"))
    return conv2d(y, sd["dsn.3.weight"], sd["dsn.3.bias"])


def ccnet(x, sd, blocks, recurrence):
    """The whole network in eval mode, output stride 8: returns [main, aux] logits, NCHW."""
    x = stem(x, sd)
    for layer, n in enumerate(blocks, start=1):
        stride = 2 if layer == 2 else 1
        dilation = {3: 2, 4: 4}.get(layer, 1)
        for i in range(n):
            x = bottleneck(x, sd, f"layer{layer}.{i}", stride=stride if i == 0 else 1, dilation=dilation)
        if layer == 3:
            c3 = x
    return head(x, sd, recurrence), dsn(c3, sd)


# The small network the model tests share (one set of shapes keeps jit compilations few).
TINY_WIDTH = 4
TINY_BLOCKS = (1, 1, 2, 2)
TINY_CLASSES = 5
