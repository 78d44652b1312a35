"""bioimage.io model packages: export (CLI and core), the zoo's own test, the package = `wsss-cram predict`, and
the way back (predict / evaluate / load_checkpoint from the zip; foreign packages refused)."""

from __future__ import annotations

import json
import shutil
import sys
import zipfile

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from napari_wsss_cram.cli import main
from napari_wsss_cram.core.checkpoint import load_checkpoint, read_checkpoint_payload, save_checkpoint
from napari_wsss_cram.core.errors import CheckpointError, DependencyError, WsssCramError
from napari_wsss_cram.core.progress import Cancelled, CancelToken, drive
from napari_wsss_cram.core.resources import demo_model_path

pytest.importorskip("bioimageio.core", reason="the [bioimageio] extra is not installed")

from napari_wsss_cram.core.zoo import export as zoo  # noqa: E402

AUTHOR = ["Ada Lovelace <ada@example.org>"]


@pytest.fixture(scope="module")
def demo_package(tmp_path_factory):
    """The demo model exported through the CLI, once for the module."""
    out = tmp_path_factory.mktemp("zoo") / "demo.zip"
    rc = main(["export-model", str(demo_model_path()), "--out", str(out), "--author", AUTHOR[0],
               "--license", "CC-BY-4.0"])
    assert rc == 0 and out.is_file()
    return out


def _rdf(package) -> dict:
    with zipfile.ZipFile(package) as archive:
        return yaml.safe_load(archive.read("rdf.yaml"))


def _member(package, name: str, folder) -> np.ndarray:
    with zipfile.ZipFile(package) as archive:
        archive.extract(name, folder)
    return np.load(folder / name)


def test_the_package_describes_the_model(demo_package, tmp_path):
    rdf = _rdf(demo_package)
    _, info = load_checkpoint(demo_model_path())
    assert rdf["format_version"].startswith("0.5") and rdf["type"] == "model"
    assert set(rdf["weights"]) == {"torchscript", "pytorch_state_dict"}
    assert rdf["weights"]["torchscript"]["parent"] == "pytorch_state_dict"
    assert rdf["license"] == "CC-BY-4.0" and rdf["authors"] == [{"name": "Ada Lovelace", "email": "ada@example.org"}]
    assert rdf["cite"][0]["doi"] == zoo.CITATION_DOI
    (inp,), (out,) = rdf["inputs"], rdf["outputs"]
    assert [a["type"] for a in inp["axes"]] == ["batch", "channel", "space", "space"]
    assert inp["axes"][2]["size"] == {"min": zoo.TILE_MIN, "step": zoo.TILE_STEP}
    assert [p["id"] for p in inp["preprocessing"]] == ["ensure_dtype", "fixed_zero_mean_unit_variance",
                                                        "ensure_dtype"]
    assert inp["preprocessing"][1]["kwargs"]["mean"] == pytest.approx([v * 255 for v in info.model_config.mean])
    assert out["axes"][1]["channel_names"] == ["tumor", "stroma", "normal", "background"]
    assert out["axes"][2]["halo"] == zoo.HALO and out["axes"][2]["size"] == {"tensor_id": "rgb", "axis_id": "y"}
    assert "scale" not in inp["axes"][2]  # the demo model records no µm/px
    ours = rdf["config"]["napari_wsss_cram"]
    assert ours["classes"]["colors"][0] == list(info.classes.colors[0]) and ours["extra"]["val_mIoU"] > 0
    # the test tensors come from a real run: probabilities that sum to 1, background exactly on glass
    x = _member(demo_package, "test_input.npy", tmp_path)
    y = _member(demo_package, "test_output.npy", tmp_path)
    assert x.dtype == np.uint8 and x.shape == (1, 3, 320, 320) and y.shape == (1, 4, 320, 320)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)
    assert 0.1 < (y[0].argmax(0) == 3).mean() < 0.9 and len(np.unique(y[0].argmax(0))) >= 3
    with zipfile.ZipFile(demo_package) as archive:
        readme = archive.read("README.md").decode()
        cover = Image.open(archive.open("cover.png"))
    assert "## Validation" in readme and f"{info.extra['val_mIoU']:.3f}" in readme
    assert "Background is \"not tissue\"" in readme
    assert "synthetic sample data only" in readme and "never got normal right" in readme
    assert cover.size == (1024, 512)


@pytest.mark.slow
def test_the_demo_package_passes_the_zoos_own_test(demo_package):
    check = zoo.check_package(demo_package)
    assert check.passed, check.summary()
    text = check.summary()
    assert "Reproduce test outputs from test inputs (torchscript)" in text
    assert "Reproduce test outputs from test inputs (pytorch_state_dict)" in text


def test_the_package_output_is_wsss_cram_predict(demo_package, tmp_path):
    """The package's test output, and bioimageio.core running the package's TorchScript on its test input, give
    what `wsss-cram predict` gives for the same patch (which it quantizes to 1/255)."""
    from bioimageio.core import create_prediction_pipeline, load_description
    from bioimageio.core.digest_spec import get_test_input_sample

    rgb = zoo.sample_patch()
    before, after = zoo.engine_padding(len(rgb))
    Image.fromarray(rgb).save(tmp_path / "patch.png")
    assert main(["predict", str(demo_model_path()), str(tmp_path / "patch.png"), "--out", str(tmp_path / "out"),
                 "--format", "png,probs"]) == 0
    probs = tifffile.imread(tmp_path / "out" / "patch_probs.ome.tif").astype(np.float32).transpose(2, 0, 1) / 255
    labels = np.asarray(Image.open(tmp_path / "out" / "patch.png"))
    # the test input is the patch with the context predict adds around it (edge replication)
    test_input = _member(demo_package, "test_input.npy", tmp_path)[0].transpose(1, 2, 0)
    np.testing.assert_array_equal(test_input, np.pad(rgb, ((before, after), (before, after), (0, 0)), mode="edge"))
    inner = np.s_[:, before:before + len(rgb), before:before + len(rgb)]
    test_output = _member(demo_package, "test_output.npy", tmp_path)[0][inner]
    descr = load_description(demo_package)
    pipeline = create_prediction_pipeline(descr, weight_format="torchscript")
    # as bioimageio's test does: the test input already holds its context (no halo padding, no cropping)
    ran = pipeline.predict_sample_without_blocking(get_test_input_sample(descr), skip_input_padding=True,
                                                   skip_output_cropping=True)
    ran = np.asarray(ran.members["probabilities"].data)[0][inner]
    for package_probs in (test_output, ran):
        assert np.abs(package_probs - probs).max() <= 1.0 / 255 + 1e-4
        top2 = np.sort(package_probs, axis=0)[-2:]
        sure = (top2[1] - top2[0]) > 2.0 / 255  # ties may break either way after quantization
        assert sure.mean() > 0.95
        np.testing.assert_array_equal(package_probs.argmax(0)[sure], labels[sure])


@pytest.mark.slow  # four CLI runs, each loading the model
def test_predict_and_evaluate_from_the_package_equal_the_checkpoint(demo_package, tmp_path, sample_data_dir):
    val = tmp_path / "val"
    for sub in ("img", "mask"):
        (val / sub).mkdir(parents=True)
        for name in ("00.png",):
            shutil.copy(sample_data_dir / "validation" / sub / name, val / sub / name)
    results = {}
    for key, model in (("pt", demo_model_path()), ("zip", demo_package)):
        out = tmp_path / key
        assert main(["predict", str(model), str(val / "img"), "--out", str(out), "--format", "png,probs"]) == 0
        assert main(["evaluate", str(model), str(val), "--json", str(tmp_path / f"{key}.json")]) == 0
        results[key] = (
            [np.asarray(Image.open(out / f"{n}.png")) for n in ("00",)],
            [tifffile.imread(out / f"{n}_probs.ome.tif") for n in ("00",)],
            json.loads((tmp_path / f"{key}.json").read_text()))
    for a, b in zip(results["pt"][0] + results["pt"][1], results["zip"][0] + results["zip"][1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert results["pt"][2]["mIoU"] == results["zip"][2]["mIoU"]
    assert results["pt"][2]["confusion"] == results["zip"][2]["confusion"]
    model, info = load_checkpoint(demo_package)
    payload = read_checkpoint_payload(demo_model_path())
    assert info.classes.names == ("tumor", "stroma", "normal") and info.extra["val_mIoU"] > 0
    for key, tensor in payload["state_dict"].items():
        assert np.array_equal(model.state_dict()[key].numpy(), tensor.float().numpy() if tensor.is_floating_point()
                              else tensor.numpy())


def test_a_package_that_is_not_ours_is_refused_saying_what_it_is(tmp_path):
    foreign = tmp_path / "unet.zip"
    rdf = {"type": "model", "name": "Nuclei U-Net", "format_version": "0.5.3",
           "weights": {"torchscript": {"source": "w.pt"}}, "config": {"stardist": {}}}
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("rdf.yaml", yaml.safe_dump(rdf))
        archive.writestr("w.pt", b"not weights")
    with pytest.raises(CheckpointError, match=r"bioimage.io model \('Nuclei U-Net', weights: torchscript\), not one "
                                              r"exported by napari-wsss-cram"):
        load_checkpoint(foreign)
    dataset = tmp_path / "data.zip"
    with zipfile.ZipFile(dataset, "w") as archive:
        archive.writestr("rdf.yaml", yaml.safe_dump({"type": "dataset", "name": "Some images"}))
    with pytest.raises(CheckpointError, match=r"a bioimage.io dataset \('Some images'\)"):
        load_checkpoint(dataset)
    plain = tmp_path / "photos.zip"
    with zipfile.ZipFile(plain, "w") as archive:
        archive.writestr("a.txt", "hello")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(plain)


def test_export_refuses_to_guess_authors_or_licence_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "m.zip"
    ckpt = str(demo_model_path())
    cases = [([], ["--license", "MIT"], "--author"),
             (["--author", "A"], [], "--license"),
             (["--author", "A"], ["--license", "cc-by-4.0"], "did you mean CC-BY-4.0"),
             (["--author", "A"], ["--license", "MIT", "--out", str(tmp_path / "m.pt")], "must end in .zip")]
    for authors, rest, message in cases:
        rest = rest if "--out" in rest else [*rest, "--out", str(out)]
        assert main(["export-model", ckpt, *authors, *rest]) == 2
        assert message in capsys.readouterr().err
    out.write_bytes(b"mine")
    assert main(["export-model", ckpt, "--out", str(out), "--author", "A", "--license", "MIT"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"mine"
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        drive(zoo.export_model(ckpt, tmp_path / "c.zip", ["A"], "MIT", cancel=token))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zip"]


def test_a_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)
    with pytest.raises(DependencyError, match=r"napari-wsss-cram\[bioimageio\]"):
        zoo.require_bioimageio()
    with pytest.raises(WsssCramError, match=r"napari-wsss-cram\[bioimageio\]"):
        drive(zoo.export_model(demo_model_path(), "x.zip", ["A"], "MIT"))


@pytest.mark.slow
def test_a_freshly_trained_model_exports_with_its_resolution_and_passes_the_zoos_test(tmp_path, sample_data_dir):
    from napari_wsss_cram.core.train import load_config, train

    config = load_config("sample", data=str(sample_data_dir / "patches"), out=str(tmp_path / "run"), steps=2,
                         batch_size=2, crop=64, workers=0, crf_workers=0, threads=1, checkpoint_every=100,
                         val_every_steps=None, log_every=1)
    train(config)
    model, info = load_checkpoint(tmp_path / "run" / "last.pt")
    model.config.mpp = 0.5  # as a run on slides with a known pixel size records it
    ckpt = save_checkpoint(tmp_path / "mpp.pt", model, extra=info.extra, train_config=info.train_config)
    result = drive(zoo.export_model(ckpt, tmp_path / "fresh.zip", AUTHOR, "MIT", name="tiny test model"))
    assert result.files == sorted(["rdf.yaml", "README.md", "cover.png", "test_input.npy", "test_output.npy",
                                   "weights_state_dict.pt", "weights_torchscript.pt"])
    axes = _rdf(result.path)["inputs"][0]["axes"]
    assert axes[2]["scale"] == 0.5 and axes[2]["unit"] == "micrometer"
    assert _rdf(result.path)["outputs"][0]["axes"][3]["scale"] == 0.5
    check = zoo.check_package(result.path)
    assert check.passed, check.summary()
    again, info2 = load_checkpoint(result.path)
    assert info2.model_config.mpp == 0.5 and info2.extra["step"] == 2
    for key, tensor in model.state_dict().items():
        assert np.array_equal(again.state_dict()[key].numpy(), tensor.numpy())
