"""CRAMNet: shapes, DA maps, batch attention, gradients, input normalisation and backbone weight loading."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_wsss_cram.core.classes import class_spec_from_names
from napari_wsss_cram.core.errors import CheckpointError
from napari_wsss_cram.core.losses import classification_loss, confident_ce, dense_energy_loss
from napari_wsss_cram.core.model import CRAMNet, ModelConfig, to_input_tensor, to_rgb255
from napari_wsss_cram.core.model import backbone as backbone_mod
from napari_wsss_cram.core.model.backbone import ResNetBackbone, init_backbone_weights

SMALL = dict(backbone="resnet18", aspp_channels=32, attention_dim=32)


def _model(k: int = 3, **overrides) -> CRAMNet:
    torch.manual_seed(0)
    classes = class_spec_from_names([f"c{i}" for i in range(k)])
    return CRAMNet(classes, ModelConfig(**{**SMALL, **overrides}), weights=None)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_forward_and_predict_shapes(k):
    model = _model(k)
    x = torch.randn(2, 3, 64, 80)
    out = model(x)
    assert out["cam"].shape == (2, k + 1, 8, 10)  # output stride 8
    assert out["logits"].shape == (2, k)
    assert out["seg"].shape == (2, k + 1, 64, 80)
    assert all(v.dtype == torch.float32 for v in out.values())
    model.eval()
    seg_probs, cam = model.predict(x)
    assert seg_probs.shape == cam.shape == (2, k + 1, 64, 80)
    torch.testing.assert_close(seg_probs.sum(1), torch.ones(2, 64, 80))
    assert model.segment(x).shape == (2, k + 1, 64, 80)


def test_da_maps_are_l2_normalised_and_non_negative():
    out = _model()(torch.randn(2, 3, 64, 64))
    cam = out["cam"]
    assert cam.min() >= 0 and cam.max() <= 1
    torch.testing.assert_close((cam ** 2).sum(1), torch.ones_like(cam[:, 0]))


def test_output_stride_16_and_plain_cam_and_stage2():
    x = torch.randn(2, 3, 64, 64)
    assert _model(output_stride=16)(x)["cam"].shape[-2:] == (4, 4)
    plain = _model(use_da=False)
    out = plain(x)
    assert out["cam"].shape == (2, 4, 8, 8) and plain.da is None
    # plain CAM: background = 1 - max foreground map, maps max-normalised to [0, 1]
    torch.testing.assert_close(out["cam"][:, 3], 1 - out["cam"][:, :3].amax(1))
    stage2 = _model(stage=2)
    assert set(stage2(x)) == {"seg"} and not stage2.has_pseudo_branch
    assert not any(name.startswith(("da.", "cls_head.")) for name in stage2.state_dict())
    stage2.eval()
    probs, cam = stage2.predict(x)
    assert probs.shape == (2, 4, 64, 64) and cam is None


def test_attention_mixes_images_of_the_batch_and_switch_turns_it_off():
    torch.manual_seed(1)
    x = torch.randn(3, 3, 64, 64)
    other = x.clone()
    other[1:] = torch.randn(2, 3, 64, 64)
    for use_attention, expect_change in ((True, True), (False, False)):
        model = _model(use_attention=use_attention, attention_pool=1).eval()
        with torch.no_grad():
            first = model(x)["logits"][0]
            second = model(other)["logits"][0]  # same image 0, different batch mates
        changed = not torch.allclose(first, second, atol=1e-6)
        assert changed == expect_change


def test_every_loss_term_reaches_the_backbone():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    pseudo = torch.randint(0, 4, (2, 64, 64))
    pseudo[:, :20] = 255
    terms = {
        "cls": classification_loss(out["logits"], torch.tensor([[1.0, 0, 1], [0, 1, 0]])),
        "ce": confident_ce(out["seg"], pseudo),
        "energy": dense_energy_loss(out["seg"], to_rgb255(x, model.config), pseudo, scale=0.5),
    }
    for name, loss in terms.items():
        model.zero_grad()
        loss.backward(retain_graph=True)
        grad = model.backbone.layer1[0].conv1.weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_to_input_tensor_round_trip():
    cfg = ModelConfig(backbone="resnet18")
    rgb = np.random.default_rng(0).integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    x = to_input_tensor(rgb, cfg)
    assert x.shape == (2, 3, 16, 24) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1.0
    back = to_rgb255(x, cfg).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(back, rgb)
    assert to_input_tensor(rgb[0], cfg).shape == (1, 3, 16, 24)
    with pytest.raises(ValueError):
        to_input_tensor(rgb.astype(np.float32), cfg)


def test_config_round_trip_and_validation():
    cfg = ModelConfig(backbone="resnet18", use_da=False, mpp=0.5, aspp_rates=(3, 6))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        ModelConfig(backbone="vgg16")
    with pytest.raises(ValueError):
        ModelConfig(alpha=0.95, beta=0.9)


def test_backbone_weights_from_local_file(tmp_path):
    source = ResNetBackbone("resnet18")
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    target = ResNetBackbone("resnet18")
    assert init_backbone_weights(target, path) == f"file:{path}"
    torch.testing.assert_close(target.conv1.weight, source.conv1.weight)
    with pytest.raises(CheckpointError, match="not found"):
        init_backbone_weights(target, tmp_path / "missing.pth")
    torch.save({"x": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="does not look like"):
        init_backbone_weights(target, tmp_path / "wrong.pth")


def test_backbone_weights_from_offline_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(backbone_mod.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(backbone_mod, "_warned_random", set())
    target = ResNetBackbone("resnet18")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert init_backbone_weights(target, "auto") == "random"
        assert init_backbone_weights(target, "auto") == "random"
    assert len([w for w in caught if "random weights" in str(w.message)]) == 1  # one clear warning
    # A weights file placed where torchvision caches it is picked up through the weights API, offline.
    assert backbone_mod.cached_imagenet_weights("resnet18") is None
    from napari_wsss_cram._torchvision import import_torchvision

    entry = import_torchvision().models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    reference = import_torchvision().models.resnet18(weights=None)
    torch.save(reference.state_dict(), cache / entry.url.rsplit("/", 1)[1])
    assert init_backbone_weights(target, "auto").startswith("imagenet:")
    torch.testing.assert_close(target.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty torch hub cache in tmp_path; the network is cut (any probe or download fails the test)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(backbone_mod.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(backbone_mod, "_warned_random", set())

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(backbone_mod, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_imagenet_weights_cache_path_is_torch_hubs(hub_cache):
    from napari_wsss_cram._torchvision import import_torchvision

    entry, path = backbone_mod.imagenet_weights("resnet50")
    assert entry == import_torchvision().models.ResNet50_Weights.DEFAULT
    assert path == hub_cache / entry.url.rsplit("/", 1)[1] == backbone_mod.hub_cache_dir() / path.name
    assert backbone_mod.hub_cache_dir() == Path(torch.hub.get_dir()) / "checkpoints"


def test_imagenet_offline_fails_at_once_naming_the_file_and_folder(hub_cache, monkeypatch):
    from urllib.error import URLError

    def offline(request, timeout):
        assert timeout <= backbone_mod.PROBE_TIMEOUT  # never hangs on a firewall
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(backbone_mod, "urlopen", offline)
    _, path = backbone_mod.imagenet_weights("resnet18")
    with pytest.raises(CheckpointError) as err:
        init_backbone_weights(ResNetBackbone("resnet18"), "imagenet")
    message = str(err.value)
    assert path.name in message and str(hub_cache) in message and "name resolution" in message
    assert "--weights PATH" in message
    assert not path.exists()


def test_imagenet_download_failing_midway_says_the_same_and_leaves_nothing(hub_cache, monkeypatch):
    from urllib.error import URLError

    monkeypatch.setattr(backbone_mod, "_probe", lambda url: None)  # the server answered, then the link dropped

    def dropped(url, dst, hash_prefix=None, progress=True):
        raise URLError("connection reset")

    monkeypatch.setattr(torch.hub, "download_url_to_file", dropped)
    _, path = backbone_mod.imagenet_weights("resnet18")
    with pytest.raises(CheckpointError, match=rf"connection reset.*{path.name}.*{hub_cache}"):
        init_backbone_weights(ResNetBackbone("resnet18"), "imagenet")
    assert not path.exists()


def test_imagenet_download_goes_into_the_cache_with_a_progress_bar(hub_cache, monkeypatch):
    from napari_wsss_cram._torchvision import import_torchvision

    reference = import_torchvision().models.resnet18(weights=None)
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):  # what torch.hub would write, offline
        calls.append((url, Path(dst), hash_prefix, progress))
        torch.save(reference.state_dict(), dst)

    monkeypatch.setattr(backbone_mod, "_probe", lambda url: None)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    entry, path = backbone_mod.imagenet_weights("resnet18")
    target = ResNetBackbone("resnet18")
    assert init_backbone_weights(target, "imagenet") == f"imagenet:{path.name}"
    assert len(calls) == 1 and calls[0][0] == entry.url and calls[0][1] == path
    assert calls[0][2] and path.name.split("-")[1].startswith(calls[0][2])  # torch checks the file's hash
    assert calls[0][3] is True  # progress bar
    torch.testing.assert_close(target.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert path.is_file()
    # the second run finds it in the cache: no network
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded twice"))
    assert init_backbone_weights(ResNetBackbone("resnet18"), "imagenet") == f"imagenet:{path.name}"


def test_an_already_cached_imagenet_file_is_used_without_network(hub_cache):
    from napari_wsss_cram._torchvision import import_torchvision

    reference = import_torchvision().models.resnet18(weights=None)
    _, path = backbone_mod.imagenet_weights("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    target = ResNetBackbone("resnet18")
    assert init_backbone_weights(target, "imagenet") == f"imagenet:{path.name}"
    torch.testing.assert_close(target.conv1.weight, reference.conv1.weight)
    assert str(path) in backbone_mod.describe_weights("resnet18", "imagenet")
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=rf"{path.name} cannot be read.*delete the file"):
        init_backbone_weights(target, "imagenet")


def test_describe_weights_says_what_a_run_starts_from_offline(hub_cache, tmp_path, monkeypatch):
    _, path = backbone_mod.imagenet_weights("resnet18")
    assert backbone_mod.describe_weights("resnet18", "none") == "random weights (no ImageNet)"
    assert backbone_mod.describe_weights("resnet18", "auto").startswith(f"random weights: {path.name} is not in")
    assert backbone_mod.describe_weights("resnet18", "imagenet") == \
        f"ImageNet weights, downloaded at the start into {path}"
    local = tmp_path / "mine.pth"
    assert backbone_mod.describe_weights("resnet18", str(local)) == f"the weights file {local}"
    monkeypatch.setenv(backbone_mod.WEIGHTS_ENV, str(local))
    assert str(local) in backbone_mod.describe_weights("resnet18", "auto")
