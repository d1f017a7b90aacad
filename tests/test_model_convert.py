"""PyTorch-named weights in and out: round trips, strictness, formats and the `ccnet convert` CLI."""

import json

import numpy as np
import pytest
from flax import nnx

from ccnet_jax import numpy_reference as ref
from ccnet_jax.cli import main as cli_main
from ccnet_jax.convert import WeightLoadError, load_torch_state_dict, torch_name, torch_state_dict
from ccnet_jax.converted_checkpoint import build_converted, restore_converted
from ccnet_jax.models import CCNet, CCNetConfig, ResNet, ResNetConfig

W, BLOCKS, CLASSES = ref.TINY_WIDTH, ref.TINY_BLOCKS, ref.TINY_CLASSES


def tiny_ccnet(seed=0, **overrides):
    config = CCNetConfig(num_classes=CLASSES, width=W, blocks=BLOCKS, **overrides)
    return CCNet(config=config, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def authors_sd():
    return ref.random_state_dict(ref.authors_shapes(W, BLOCKS, CLASSES), seed=3)


@pytest.fixture(scope="module")
def r50_authors_sd():
    """An authors' checkpoint of depth 50 at width 4: depth, width and classes are read from it."""
    return ref.random_state_dict(ref.authors_shapes(W, (3, 4, 6, 3), CLASSES), seed=6)


def flat_values(model):
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}


def test_authors_names_load_strictly_and_round_trip(authors_sd):
    model = tiny_ccnet()
    report = load_torch_state_dict(model, authors_sd, strict=True)
    assert report.ok and not report.missing and not report.unexpected
    assert sorted(report.ignored) == sorted(n for n in authors_sd if n.endswith("num_batches_tracked"))
    exported = torch_state_dict(model)
    assert sorted(exported) == sorted(authors_sd)
    for name, value in authors_sd.items():
        if name.endswith("num_batches_tracked"):
            assert exported[name].dtype == np.int64 and exported[name].shape == ()
        else:
            assert exported[name].shape == value.shape, name
            np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_layouts_follow_pytorch(authors_sd):
    model = tiny_ccnet()
    load_torch_state_dict(model, authors_sd)
    # (out, in, kh, kw) -> (kh, kw, in, out): element [o, i, y, x] lands at [y, x, i, o].
    kernel = np.asarray(model.backbone.layer3[0].conv2.kernel[...])
    np.testing.assert_array_equal(kernel[2, 0, 3, 1], authors_sd["layer3.0.conv2.weight"][1, 3, 2, 0])
    assert float(model.head.cca.gamma[...]) == pytest.approx(0.7)
    np.testing.assert_array_equal(model.aux.conv_bn.bn.var[...], authors_sd["dsn.1.running_var"])
    np.testing.assert_array_equal(model.head.classifier.bias[...], authors_sd["head.bottleneck.3.bias"])


def test_export_then_import_into_a_fresh_model_copies_everything():
    source, target = tiny_ccnet(seed=0), tiny_ccnet(seed=1)
    before = flat_values(target)
    load_torch_state_dict(target, torch_state_dict(source), strict=True)
    after, expected = flat_values(target), flat_values(source)
    assert any(not np.array_equal(before[p], expected[p]) for p in expected)
    for path in expected:
        np.testing.assert_array_equal(after[path], expected[path], err_msg=str(path))


def test_torch_name_examples():
    assert torch_name(("backbone", "layer3", 0, "downsample", "conv", "kernel")) == "layer3.0.downsample.0.weight"
    assert torch_name(("backbone", "bn2", "var")) == "bn2.running_var"
    assert torch_name(("head", "classifier", "kernel")) == "head.bottleneck.3.weight"
    assert torch_name(("head", "bottleneck", "bn", "scale")) == "head.bottleneck.1.weight"
    assert torch_name(("aux", "conv_bn", "conv", "bias")) == "dsn.0.bias"
    assert torch_name(("aux", "classifier", "kernel")) == "dsn.3.weight"


@pytest.mark.parametrize(
    "change, expected_words",
    [
        (lambda sd: sd.pop("head.convb.0.weight"), ["missing", "head.convb.0.weight"]),
        (
            lambda sd: sd.__setitem__("head.extra.weight", np.zeros(3, np.float32)),
            ["unexpected", "head.extra.weight"],
        ),
        (
            lambda sd: sd.__setitem__("dsn.3.bias", np.zeros(CLASSES + 1, np.float32)),
            ["mismatch", "dsn.3.bias", f"({CLASSES + 1},)"],
        ),
    ],
)
def test_strict_loading_refuses_and_changes_nothing(authors_sd, change, expected_words):
    sd = dict(authors_sd)
    change(sd)
    model = tiny_ccnet()
    before = flat_values(model)
    with pytest.raises(WeightLoadError) as info:
        load_torch_state_dict(model, sd, strict=True)
    for word in expected_words:
        assert word in str(info.value)
    after = flat_values(model)
    for path in before:
        np.testing.assert_array_equal(after[path], before[path])


def test_non_strict_loads_imagenet_backbone_into_ccnet():
    imagenet = ref.random_state_dict(ref.backbone_shapes(W, BLOCKS, "deep"), seed=4)
    imagenet["fc.weight"] = np.zeros((10, 32 * W), np.float32)
    imagenet["fc.bias"] = np.zeros((10,), np.float32)
    model = tiny_ccnet()
    head_before = np.asarray(model.head.conva.conv.kernel[...])
    report = load_torch_state_dict(model, imagenet, strict=False)
    assert set(report.unexpected) == {"fc.weight", "fc.bias"}
    assert report.missing and all(n.startswith(("head.", "dsn.")) for n in report.missing)
    assert "head.cca.gamma" in report.missing and "dsn.3.bias" in report.missing
    np.testing.assert_array_equal(model.backbone.conv3.kernel[...], imagenet["conv3.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.head.conva.conv.kernel[...], head_before)
    # The backbone alone takes the ImageNet weights strictly once fc is declared droppable.
    backbone = ResNet(ResNetConfig(width=W, blocks=BLOCKS), rngs=nnx.Rngs(0))
    report = load_torch_state_dict(backbone, imagenet, strict=True, ignore_prefixes=("fc.",))
    assert {"fc.weight", "fc.bias"} <= set(report.ignored)


def test_torchvision_stem_and_data_parallel_prefix():
    sd = ref.random_state_dict(ref.backbone_shapes(W, BLOCKS, "torchvision"), seed=5)
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    backbone = ResNet(ResNetConfig(width=W, blocks=BLOCKS, stem="torchvision"), rngs=nnx.Rngs(0))
    report = load_torch_state_dict(backbone, wrapped, strict=True)
    assert report.stripped_prefix == "module."
    np.testing.assert_array_equal(backbone.conv1.kernel[...], sd["conv1.weight"].transpose(2, 3, 1, 0))
    assert backbone.conv1.kernel.shape == (7, 7, 3, W)


def test_cli_converts_an_npz_and_the_checkpoint_restores(tmp_path, r50_authors_sd, capsys):
    sd = r50_authors_sd
    source = tmp_path / "ccnet.npz"
    np.savez(source, **sd)
    out = tmp_path / "ckpt"
    assert cli_main(["convert", str(source), str(out)]) == 0
    metadata = json.loads((out / "config.json").read_text())
    assert metadata["kind"] == "ccnet"
    assert metadata["config"]["depth"] == 50 and metadata["config"]["width"] == W
    assert metadata["config"]["num_classes"] == CLASSES
    assert metadata["load_report"]["missing"] == [] and metadata["load_report"]["unexpected"] == []
    model = build_converted(out)
    assert isinstance(model, CCNet)
    exported = torch_state_dict(model, num_batches_tracked=False, inplace_abn=True)
    assert sorted(exported) == sorted(n for n in sd if not n.endswith("num_batches_tracked"))
    stored = torch_state_dict(model, num_batches_tracked=False)
    scales = {torch_name(path) for path in flat_values(model) if path[-1] == "scale"}
    assert len(scales) == 59  # 3 in the stem, 3 a block or 4 with downsampling, 4 in the heads
    for name, value in exported.items():
        if name in scales:
            # Stored as |weight| + 1e-5 (InPlaceABN's scale); taking 1e-5 off again rounds once.
            np.testing.assert_array_equal(stored[name], np.abs(sd[name]) + np.float32(1e-5), err_msg=name)
            np.testing.assert_allclose(value, sd[name], rtol=np.finfo(np.float32).eps, atol=0, err_msg=name)
        else:
            np.testing.assert_array_equal(value, sd[name], err_msg=name)
    # An existing checkpoint is not overwritten without --force.
    assert cli_main(["convert", str(source), str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert cli_main(["convert", str(source), str(out), "--force"]) == 0


def test_cli_imagenet_format_restores_into_a_ccnet_backbone(tmp_path):
    blocks = (3, 4, 6, 3)
    sd = ref.random_state_dict(ref.backbone_shapes(W, blocks, "deep"), seed=7)
    sd["fc.weight"] = np.zeros((10, 32 * W), np.float32)
    sd["fc.bias"] = np.zeros((10,), np.float32)
    source = tmp_path / "resnet50-imagenet.npz"
    np.savez(source, **sd)
    out = tmp_path / "backbone"
    assert cli_main(["convert", str(source), str(out), "--format", "imagenet-deep"]) == 0
    model = CCNet(config=CCNetConfig(num_classes=CLASSES, depth=50, width=W), rngs=nnx.Rngs(0))
    head_before = np.asarray(model.head.bottleneck.conv.kernel[...])
    metadata = restore_converted(model, out)
    assert metadata["kind"] == "resnet" and {"fc.bias", "fc.weight"} <= set(metadata["load_report"]["ignored"])
    np.testing.assert_array_equal(
        model.backbone.layer4[2].conv3.kernel[...], sd["layer4.2.conv3.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        model.backbone.layer2[0].downsample.bn.mean[...], sd["layer2.0.downsample.1.running_mean"]
    )
    # As the authors' InPlaceABN network uses the ImageNet weights it loads.
    np.testing.assert_array_equal(
        model.backbone.layer2[0].downsample.bn.scale[...], np.abs(sd["layer2.0.downsample.1.weight"]) + np.float32(1e-5)
    )
    np.testing.assert_array_equal(model.head.bottleneck.conv.kernel[...], head_before)


def test_cli_strictness_and_missing_inputs(tmp_path, r50_authors_sd, capsys):
    sd = dict(r50_authors_sd)
    del sd["head.cca.gamma"]
    sd["layer3.1.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    source = tmp_path / "broken.npz"
    np.savez(source, **sd)
    assert cli_main(["convert", str(source), str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "head.cca.gamma" in err and "layer3.1.conv1.weight" in err and "--non-strict" in err
    assert not (tmp_path / "a").exists()
    assert cli_main(["convert", str(tmp_path / "absent.npz"), str(tmp_path / "b")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_cli_reports_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    source = tmp_path / "ccnet.pth"
    source.write_bytes(b"not a checkpoint")
    assert cli_main(["convert", str(source), str(tmp_path / "out")]) == 1
    assert "not a PyTorch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_restore_refuses_a_model_of_another_shape(tmp_path, authors_sd):
    source = tmp_path / "ccnet.npz"
    np.savez(source, **authors_sd)
    # authors_sd has 2 layer3 blocks, which is no standard depth: it must be given.
    assert cli_main(["convert", str(source), str(tmp_path / "c"), "--depth", "50", "--non-strict"]) == 0
    wrong = CCNet(config=CCNetConfig(num_classes=CLASSES + 2, depth=50, width=W), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="does not fit this model") as error:
        restore_converted(wrong, tmp_path / "c")
    # The first mismatch, the auxiliary classifier's bias, is named with both shapes.
    assert f"params.aux.classifier.bias ({CLASSES},) where this model has ({CLASSES + 2},)" in str(error.value)


def test_a_scale_inplace_abn_cannot_apply_is_refused_on_export_for_the_authors_network():
    # InPlaceABN's scale is |weight| + 1e-5 >= 1e-5: no weight gives a scale below that.
    model = tiny_ccnet()
    model.head.convb.bn.scale.set_value(model.head.convb.bn.scale[...].at[2].set(-0.25))
    with pytest.raises(ValueError, match=r"head\.convb\.1\.weight: .* scale -0\.25; export for nn\.BatchNorm2d"):
        torch_state_dict(model, inplace_abn=True)
    assert torch_state_dict(model)["head.convb.1.weight"][2] == np.float32(-0.25)
