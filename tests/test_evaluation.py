"""Progressive evaluation: BD-rate, classical codecs, the progressive chain (against the codec),
the training callback in a real Trainer (with FID on random Inception weights), `uqdm evaluate`
end to end, and the Kodak 64×64 figures of the released tiny weights."""

import csv
import functools
import hashlib
import json
import math
import urllib.error
import warnings

import lightning as L
import numpy as np
import pytest
import skimage.data
import torch
import torchvision
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import Logger
from PIL import Image
from torch.utils.data import DataLoader
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from uqdm import codec
from uqdm.cli import main
from uqdm.codec.container import parse
from uqdm.evaluation import ProgressiveMetrics, SharedNoise, bd_rate, point_names, progressive_chain
from uqdm.evaluation.classical import CODECS, sweep
from uqdm.evaluation.fid import FeatureMoments, fid_protocol, frechet_distances
from uqdm.evaluation.metrics import ProgressiveScores
from uqdm.evaluation.perceptual import load_lpips
from uqdm.evaluation.pipeline import code_each
from uqdm.evaluation.quality import psnr_per_image
from uqdm.evaluation.report import compressai_files, results_table
from uqdm.evaluation.timed_codec import decode_each
from uqdm.images import box_resize_center_crop
from uqdm.module import UQDMModule
from uqdm.options import DEFAULT_LAYERS
from uqdm.released import import_official

from compressai_format import PUBLISHED_JPEG, compressai_plot_reads, write_published
from terminal import terminal_stderr


@pytest.fixture(scope="module")
def tiny_module(tiny_module):
    """The tiny module on a narrower schedule (γ from −8 to 5): no point before the last is exact."""
    return functools.partial(tiny_module, gamma_min=-8.0, gamma_max=5.0)


def photo(size: int) -> torch.Tensor:
    """A natural uint8 3×size×size image (scikit-image's astronaut, box-downsampled)."""
    return box_resize_center_crop(torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).contiguous(), size)


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --- BD-rate -----------------------------------------------------------------------------------
def test_bd_rate_of_the_same_curve_at_nine_tenths_the_rate_is_minus_ten_percent():
    rates, psnrs = [0.25, 0.5, 1.0, 2.0, 4.0], [26.0, 29.5, 32.0, 36.0, 38.5]
    assert bd_rate(rates, psnrs, [0.9 * r for r in rates], psnrs) == pytest.approx(-10.0, abs=1e-9)
    assert bd_rate([0.9 * r for r in rates], psnrs, rates, psnrs) == pytest.approx(100 / 9, abs=1e-9)
    # a line in log-rate (interpolated exactly): only the shared PSNR range counts, and a point
    # off the frontier (more bits, less quality) is ignored
    line = [30 + 3 * math.log2(r) for r in rates]
    shifted = [1.1 * r for r in rates[2:]] + [100.0]
    assert bd_rate(rates, line, shifted, line[2:] + [31.0]) == pytest.approx(10.0, abs=1e-9)
    assert bd_rate(rates, psnrs, rates, [p + 20 for p in psnrs]) is None  # disjoint ranges


# --- classical codecs --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CODECS))
def test_classical_codec_rates_come_from_real_bytes_and_rise_with_quality(name):
    codec_ = CODECS[name]
    if not codec_.available():
        pytest.skip(f"{name} is not available in this installation")
    image = photo(48)
    points, per_image = sweep(codec_, [image])
    assert len(points) == len(per_image) == len(codec_.qualities) and all(len(f) == 1 for f in per_image)
    assert [p["bpp"] for p in points] == [f[0]["bpp"] for f in per_image]
    bpp = [p["bpp"] for p in points]
    psnr = [p["psnr"] for p in points]
    order = 1 if codec_.qualities[-1] > codec_.qualities[0] else -1  # JPEG 2000's knob is a ratio
    ranked = sorted(zip(codec_.qualities, bpp, psnr), key=lambda q: order * q[0])
    assert ranked[-1][1] > 2 * ranked[0][1] and ranked[-1][2] > ranked[0][2] + 5
    rises = sum(b2 >= b1 for (_, b1, _), (_, b2, _) in zip(ranked, ranked[1:]))
    assert rises >= len(ranked) - 2  # monotone up to an odd step of the encoder
    data = codec_.encode(image.permute(1, 2, 0).numpy(), codec_.qualities[0])
    assert points[0]["bpp"] == pytest.approx(8 * len(data) / 48**2)
    assert all(0 < p["ssim"] <= 1 for p in points)


# --- the progressive chain ---------------------------------------------------------------------
def test_progressive_chain_points_bits_and_exact_last_point(tiny_module):
    model = tiny_module(n_timesteps=3).model.double()
    x = random_images(3, 8)
    noise = SharedNoise.draw(x.shape, 3, torch.Generator().manual_seed(1))
    methods = ["denoise", "ancestral", "flow_based"]
    result = progressive_chain(model, x, noise, methods, torch.Generator().manual_seed(2))
    assert point_names(3) == ["z1", "step_1", "step_2", "step_3", "lossless"]
    assert result.bits.shape == (3, 5)
    assert torch.all(result.bits[:, 0] == 0) and torch.all(result.bits.diff(dim=1) > 0)
    for pictures in result.pictures.values():
        assert len(pictures) == 5 and all(p.dtype == torch.uint8 and p.shape == x.shape for p in pictures)
        assert torch.equal(pictures[-1], x)
    # the first picture is the denoised prediction at z_1; the chain does not depend on the methods
    first = model.reconstruct(noise.top, 0, "denoise")
    assert torch.equal(result.pictures["denoise"][0], first)
    alone = progressive_chain(model, x, noise, ["denoise"])
    assert torch.equal(alone.bits, result.bits)


def test_evaluation_figures_are_the_decoders(tiny_module):
    """The evaluation's ideal bits are the file's per-chunk ideal bits and its denoise pictures are
    what decoding the file shows, at every step point and (the layer points) after every layer."""
    model = tiny_module(n_timesteps=2).model
    image = random_images(1, 12, seed=3)[0]  # 12×12 in 8-pixel tiles: 4 tiles, padded
    data = codec.compress(model, [image], seed=5, tile=8, layers=1)[0]  # the chain has step points only
    decoded = codec.decompress(model, data, all_points=True)
    scores = ProgressiveScores(4, ["denoise"])
    files, _, _, layer_psnr = code_each(model, [image], scores, seed=5, tile=8)
    every_layer = codec.decompress(model, files[0], all_points=True).points
    assert len(every_layer) == 2 * DEFAULT_LAYERS + 2
    assert layer_psnr == [psnr_per_image(torch.stack(every_layer), image.expand(len(every_layer), -1, -1, -1)).tolist()]
    # `--decode-times` decodes the file again and says so where it does not show the walk's pictures
    times, warnings = decode_each(model, files, [image], layer_psnr)
    assert len(times[0]) == 4 and warnings == []
    assert decode_each(model, files, [image], [[p - 1 for p in layer_psnr[0]]])[1] == [
        "the file of image 0 does not show the encoder's pictures"]
    result = scores.compute()
    ideal = np.cumsum([0.0, *decoded.ideal_bits]) / 144
    assert result["bpp"] == pytest.approx(ideal.tolist(), rel=1e-6)  # float32 means
    for shown, psnr in zip(decoded.points[:-1], result["psnr"]["denoise"]):
        expected = 10 * math.log10(255**2 / ((shown.double() - image.double()) ** 2).mean().item())
        assert psnr == pytest.approx(expected, rel=1e-5)
    assert torch.equal(decoded.points[-1], image)


# --- the callback --------------------------------------------------------------------------------
class RecordingLogger(Logger):
    """A logger with W&B's `log_table` / `log_image` that records what it is given."""

    def __init__(self):
        super().__init__()
        self.metrics, self.tables, self.images = [], {}, {}

    name, version = "recording", 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables[key] = (columns, data)

    def log_image(self, key, images, step=None, **kwargs):
        self.images[key] = images


def loaders(n: int = 4, size: int = 8, batch_size: int = 2):
    data = list(random_images(n, size))
    return DataLoader(data, batch_size=batch_size), DataLoader(data, batch_size=batch_size)


def trainer(tmp_path, callback, loggers, **kwargs) -> L.Trainer:
    return L.Trainer(callbacks=[callback], logger=loggers, default_root_dir=tmp_path, accelerator="cpu",
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, **kwargs)


def test_callback_logs_every_point_in_a_real_fit(tmp_path, tiny_module):
    module = tiny_module(n_timesteps=2).train()
    csv, recording = CSVLogger(tmp_path), RecordingLogger()
    callback = ProgressiveMetrics(every_n_epochs=2, methods=["denoise", "flow_based"], num_images_grid=2)
    train, val = loaders()
    trainer(tmp_path, callback, [csv, recording], max_epochs=3, limit_train_batches=1).fit(module, train, val)

    points = ["z1", "step_1", "step_2", "lossless"]
    logged = [m for m in recording.metrics if "val/bpp/z1" in m]
    assert len(logged) == 2  # epochs 0 and 2 of 0, 1, 2
    keys = set(logged[0])
    assert {f"val/bpp/{p}" for p in points} <= keys
    assert {f"val/psnr/{m}/{p}" for m in ("denoise", "flow_based") for p in points[:-1]} <= keys
    assert not any("lossless" in k and "psnr" in k for k in keys) and not any("fid" in k for k in keys)
    bpp = [logged[0][f"val/bpp/{p}"] for p in points]
    assert bpp[0] == 0 and all(b > a for a, b in zip(bpp, bpp[1:]))

    columns, rows = recording.tables["val/rd_table"]
    assert columns[:2] == ["point", "bpp"] and [r[0] for r in rows] == points
    assert recording.images["val/rd_plot"][0].ndim == 3
    grid = recording.images["val/progressive/denoise"][0]
    assert grid.dtype == np.uint8 and grid.shape[0] > grid.shape[1] / len(points)  # 2 rows of 4 points
    files = sorted(p.name for p in (tmp_path / "lightning_logs" / "version_0" / "progressive").iterdir())
    names = ("rd_table.csv", "rd_plot.png", "progressive_denoise.png", "progressive_flow_based.png")
    # after epochs 0 and 2, of one step each
    assert {f"val_step{step}_{name}" for step in (1, 3) for name in names} == set(files)

    trainer(tmp_path, callback, [recording]).test(module, val)
    assert "test/psnr/denoise/step_1" in recording.metrics[-1] and "test/rd_table" in recording.tables


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random (He-initialised) weights, saved as a state dict."""
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save({}, path)

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the fresh initialisation
            pass

    torch.manual_seed(0)
    network = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    for m in network.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def random_alexnet_weights(tmp_path_factory):
    """torchvision AlexNet's convolutions with random weights, saved as a state dict (what LPIPS reads)."""
    path = tmp_path_factory.mktemp("alexnet") / "random-alexnet.pth"
    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}, path)
    return path


def test_callback_lpips_runs_through_torchmetrics_with_the_weights_option(tmp_path, random_alexnet_weights,
                                                                        tiny_module):
    module = tiny_module(n_timesteps=1)
    recording = RecordingLogger()
    callback = ProgressiveMetrics(lpips=True, lpips_weights=str(random_alexnet_weights), num_images_grid=0)
    _, val = loaders(n=2, size=32)
    trainer(tmp_path, callback, [recording]).validate(module, val)
    lpips = {k: v for k, v in recording.metrics[-1].items() if k.startswith("val/lpips/")}
    assert set(lpips) == {"val/lpips/denoise/z1", "val/lpips/denoise/step_1"}
    assert all(math.isfinite(v) and v > 0 for v in lpips.values())
    columns, _ = recording.tables["val/rd_table"]
    assert "lpips/denoise" in columns
    # the same pictures give 0; images too small for AlexNet: LPIPS off with one warning
    network = load_lpips(random_alexnet_weights)
    x = random_images(2, 32)
    assert network(x, x).tolist() == [0.0, 0.0] and torch.all(network(x, random_images(2, 32, seed=1)) > 0)
    small = ProgressiveMetrics(lpips=True, lpips_weights=str(random_alexnet_weights), num_images_grid=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, small, [recording]).validate(module, loaders(n=2, size=8)[1])
    assert len([w for w in caught if "LPIPS is off" in str(w.message)]) == 1
    assert not any("lpips" in k for k in recording.metrics[-1])


def test_callback_fid_runs_through_torchmetrics_with_the_weights_option(tmp_path, random_inception_weights, tiny_module):
    module = tiny_module(n_timesteps=1)
    recording = RecordingLogger()
    callback = ProgressiveMetrics(fid=True, fid_weights=str(random_inception_weights), num_images_grid=0)
    _, val = loaders(n=2)
    trainer(tmp_path, callback, [recording]).validate(module, val)
    fid = {k: v for k, v in recording.metrics[-1].items() if k.startswith("val/fid/")}
    assert set(fid) == {"val/fid/denoise/z1", "val/fid/denoise/step_1"}
    assert all(math.isfinite(v) and v > 0 for v in fid.values())


def test_frechet_distance_matches_the_closed_form_of_a_scaled_copy():
    """Fake features s·f of real features f: d² = (1 − s)²·(‖μ‖² + tr Σ) (the √ term is s·tr Σ)."""
    features = torch.randn(40, 64, generator=torch.Generator().manual_seed(0)).double() + 0.5
    real, fake, single = FeatureMoments(64), FeatureMoments(64), FeatureMoments(64)
    real.update(features)
    fake.update(0.7 * features)
    single.update(features[:1])
    mean, cov = features.mean(0), torch.cov(features.T)
    expected = 0.09 * float(mean.square().sum() + cov.trace())
    assert frechet_distances(real.compute(), [fake.compute(), real.compute(), single.compute()]) == [
        pytest.approx(expected, rel=1e-6), pytest.approx(0.0, abs=1e-6), None]  # one image: no FID


def test_fid_protocol_names_the_sets_the_network_and_the_weights(tmp_path):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"weights")
    protocol = fid_protocol(24, weights)
    assert protocol["images"] == 24 and "24 prepared images against their 24 reconstructions" in protocol["sets"]
    assert "2048 pool features" in protocol["network"] and "paper's FID on 10,000 images" in protocol["comparable"]
    assert protocol["weights"] == {"file": "inception.pth", "url": URL_INCEPTION_V3,
                                   "sha256": hashlib.sha256(b"weights").hexdigest()}
    point = {"name": "z1", "bpp_ideal": 0.0, "bpp_file": 0.1, "psnr": {"denoise": 20.0}, "fid": {"denoise": 99.0}}
    printed = results_table({"uqdm": {"points": [point]}, "bd_rate": {}, "fid_protocol": protocol})
    assert "fid/denoise" in printed and "FID compares only with FIDs on the same 24 images" in printed


def test_offline_without_weights_fid_and_lpips_are_off_with_one_warning_each(tmp_path, monkeypatch, tiny_module):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    callback = ProgressiveMetrics(fid=True, fid_weights=str(tmp_path / "missing.pth"), lpips=True,
                                  lpips_weights=str(tmp_path / "missing-alexnet.pth"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.setup(None, tiny_module(n_timesteps=1), "validate")
    for metric, file in (("FID", "missing.pth"), ("LPIPS", "missing-alexnet.pth")):
        messages = [str(w.message) for w in caught if f"{metric} is off" in str(w.message)]
        assert len(messages) == 1 and file in messages[0]
    assert callback.scores.inception is None and callback.scores.lpips is None


# --- `uqdm evaluate` -----------------------------------------------------------------------------
def test_evaluate_end_to_end(tmp_path, module, ckpt, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    photos = {"a.png": photo(16), "b.png": box_resize_center_crop(photo(40), 24)[:, :20]}  # 16×16 and 20×24
    for name, image in photos.items():
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / name)
    out = tmp_path / "out"
    main(["evaluate", "--ckpt", str(ckpt), "--images", str(folder), "--methods", "denoise,ancestral",
          "--codecs", "jpeg,webp", "--tile", "16", "--out", str(out), "--csv", str(tmp_path / "rows.csv"), "--lpips",
          "--decode-times"])
    printed = capsys.readouterr().out
    assert "step_2" in printed and "BD-rate of UQDM" in printed and "rows.csv" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["images"] == 2 and results["ssim_metric"] == "ssim"
    points = results["uqdm"]["points"]
    assert [p["point"] for p in points] == [0, 1, 2, 3] and [p["name"] for p in points][-1] == "lossless"
    ideal, real = [p["bpp_ideal"] for p in points], [p["bpp_file"] for p in points]
    assert ideal[0] == 0 and all(b > a for a, b in zip(ideal, ideal[1:]))
    assert all(r > i for r, i in zip(real, ideal))  # header and coder overhead
    assert results["uqdm"]["nelbo_bpp"] == ideal[-1]
    assert set(points[1]["psnr"]) == {"denoise", "ancestral"} and points[-1]["psnr"]["denoise"] is None
    assert all(p["fid"] is None and p["lpips"] is None for p in points) and results["fid_protocol"] is None
    assert [w for w in results["warnings"] if w.startswith("LPIPS is off: the smallest image has a 16 px side")]
    assert set(results["codecs"]) == {"jpeg", "webp"} and set(results["bd_rate"]) == {"jpeg", "webp"}
    assert {"quality", "bpp", "psnr"} <= set(results["codecs"]["jpeg"][0])

    # every layer point, from the encoder's walk (the decoding pass finds the same pictures); the step points
    assert not [w for w in results["warnings"] if "does not" in w] and "uqdm_decoding" in results["time_s"]
    per_step, layers = DEFAULT_LAYERS, results["uqdm"]["layer_points"]
    assert [p["point"] for p in layers] == list(range(2 * per_step + 2))
    assert [(p["step"], p["layer"]) for p in layers] == [(0, 0), *((s, n) for s in (1, 2) for n in range(1, per_step + 1)), (3, 1)]
    assert [layers[min(k * per_step, 2 * per_step + 1)]["bpp_file"] for k in range(4)] == pytest.approx(real)
    assert all(b["bpp_file"] > a["bpp_file"] for a, b in zip(layers, layers[1:]))
    assert all(p["psnr_denoise"] > 0 for p in layers[:-1]) and layers[-1]["psnr_denoise"] is None
    assert set(results["bd_rate_layers"]) == {"jpeg", "webp"} and "BD-rate over every layer point" in printed

    # times per image: the encoder codes chunk after chunk, the denoise decoder shows point after point
    encoding, decoding = [p["encoding_time"] for p in points], [p["decoding_time"] for p in points]
    assert all(0 < a < b for a, b in zip(encoding, encoding[1:]))
    assert all(0 < a < b for a, b in zip(decoding, decoding[1:]))
    assert all(q["encoding_time"] > 0 and q["decoding_time"] > 0 for q in results["codecs"]["jpeg"])

    # per-image rows: every image, method and point of UQDM, every image and quality of each codec
    rows = results["per_image"]
    uqdm_rows = [r for r in rows if r["codec"] == "uqdm"]
    assert len(uqdm_rows) == 2 * 2 * 4 and {r["image"] for r in rows} == {"a.png", "b.png"}
    assert len([r for r in rows if r["codec"] == "jpeg"]) == 2 * len(CODECS["jpeg"].qualities)
    for j, point in enumerate(points):  # the means are the rows' means
        at = [r for r in uqdm_rows if r["point"] == point["name"] and r["method"] == "denoise"]
        assert np.mean([r["bpp"] for r in at]) == pytest.approx(point["bpp_file"])
        assert np.mean([r["bpp_ideal"] for r in at]) == pytest.approx(point["bpp_ideal"], rel=1e-6)
        if point["name"] != "lossless":
            assert np.mean([r["psnr"] for r in at]) == pytest.approx(point["psnr"]["denoise"], rel=1e-5)
            assert np.mean([r["ssim"] for r in at]) == pytest.approx(point["ssim"]["denoise"], rel=1e-5)
    assert all(r["decoding_time"] is None for r in uqdm_rows if r["method"] == "ancestral")
    with open(tmp_path / "rows.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and "ms-ssim" not in table[0]
    assert list(table[0]) == ["image", "codec", "method", "point", "quality", "bpp", "bpp_ideal", "psnr", "ssim",
                              "encoding_time", "decoding_time"]
    assert float(table[1]["bpp"]) == rows[1]["bpp"] and table[-1]["quality"] == str(rows[-1]["quality"])

    assert (out / "rd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = {p.stem: p for p in (out / "compressai").iterdir()}
    assert set(files) == {"uqdm-denoise", "uqdm-ancestral", "jpeg", "webp"}
    for stem, path in files.items():  # read as CompressAI's plot reads them
        curve = json.loads(path.read_text())
        assert set(curve) == {"name", "description", "results"}
        read = compressai_plot_reads(path, "psnr")
        assert read["name"] == curve["name"] and len(read["xs"]) == len(read["ys"]) > 1
        assert len(compressai_plot_reads(path, "ssim-rgb")["ys"]) == len(read["xs"])
        with pytest.raises(ValueError, match='"ms-ssim-rgb" not available'):  # SSIM is not passed off as MS-SSIM
            compressai_plot_reads(path, "ms-ssim")
        timed = curve["results"]
        assert len(timed["encoding_time"]) == len(read["xs"])
        assert ("decoding_time" in timed) == (stem != "uqdm-ancestral")
    assert compressai_plot_reads(files["uqdm-denoise"])["xs"] == real[:-1]

    # `uqdm plot` overlays the run's results.json with its own CompressAI files: the same curves
    main(["plot", str(out / "results.json"), str(files["uqdm-denoise"]), "-o", str(tmp_path / "overlay.png"),
          "--anchor", "UQDM (denoise) [out]"])
    table = capsys.readouterr().out
    same = table.split("UQDM (denoise) [uqdm-denoise]")[1].splitlines()[0].split()
    assert "JPEG" in table and float(same[-1]) == pytest.approx(0.0, abs=1e-9)

    # with MS-SSIM (images of 161 px and more), CompressAI's plot shows it in dB
    results["ssim_metric"] = "ms-ssim"
    (tmp_path / "ms.json").write_text(json.dumps(compressai_files(results)["uqdm-denoise"]))
    shown = compressai_plot_reads(tmp_path / "ms.json", "ms-ssim")["ys"]
    assert shown == pytest.approx([-10 * math.log10(1 - p["ssim"]["denoise"]) for p in points[:-1]])

    for name, image in photos.items():  # the files are real: they decode to the exact images
        data = (out / "files" / name).with_suffix(".uqdm").read_bytes()
        assert torch.equal(codec.decompress(module.model, data).image, image)


def test_evaluate_prepares_npy_images_and_reports_bad_input(tmp_path, ckpt, capsys, random_alexnet_weights):
    array = random_images(2, 40).permute(0, 2, 3, 1).numpy()[:, :, :36]  # N×H×W×3, 40×36
    np.save(tmp_path / "images.npy", array)
    out = tmp_path / "out"
    main(["evaluate", "--ckpt", str(ckpt), "--images", str(tmp_path / "images.npy"), "--size", "32",
          "--methods", "flow_based,denoise", "--codecs", "none", "--tile", "32", "--out", str(out),
          "--lpips", "--lpips-weights", str(random_alexnet_weights)])
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["size"] == 32 and results["codecs"] == {} and results["bd_rate"] == {}
    assert len(list((out / "files").iterdir())) == 2
    # LPIPS per point and per image
    points = results["uqdm"]["points"]
    assert all(p["lpips"]["flow_based"] > 0 for p in points[:-1]) and points[-1]["lpips"]["flow_based"] is None
    rows = [r for r in results["per_image"] if r["point"] == "step_1" and r["method"] == "flow_based"]
    assert np.mean([r["lpips"] for r in rows]) == pytest.approx(points[1]["lpips"]["flow_based"], rel=1e-5)
    assert all(p["decoding_time"] is None for p in points)
    assert all(r["decoding_time"] is None and r["encoding_time"] > 0 for r in results["per_image"])
    # by default one walk per image: layer points from it, encoding times, no decoding pass nor times
    layers = results["uqdm"]["layer_points"]
    assert "uqdm_decoding" not in results["time_s"] and len(layers) == 2 * DEFAULT_LAYERS + 2
    assert [layers[min(k * DEFAULT_LAYERS, 2 * DEFAULT_LAYERS + 1)]["bpp_file"] for k in range(4)] == pytest.approx(
        [p["bpp_file"] for p in points])
    assert all(p["psnr_denoise"] > 0 for p in layers[:-1]) and layers[-1]["psnr_denoise"] is None
    curve = out / "compressai" / "uqdm-denoise.json"
    timed = json.loads(curve.read_text())["results"]
    assert "decoding_time" not in timed and len(timed["encoding_time"]) == len(compressai_plot_reads(curve)["xs"]) == 3
    main(["plot", str(out / "results.json"), str(curve), "-o", str(tmp_path / "overlay.png"),
          "--anchor", "UQDM (denoise) [out]"])
    assert float(capsys.readouterr().out.split("UQDM (denoise) [uqdm-denoise]")[1].splitlines()[0].split()[-1]) == \
        pytest.approx(0.0, abs=1e-9)
    assert "lpips/flow_based" in printed

    for bad in (["--images", str(tmp_path / "nothing")], ["--size", "0"], ["--layers", "0"]):
        args = ["evaluate", "--ckpt", str(ckpt), "--images", str(tmp_path / "images.npy"), "--out", str(out)]
        with pytest.raises(SystemExit) as exit_:
            main(args + bad)
        assert exit_.value.code == 2
    assert capsys.readouterr().err.count("uqdm: error: ") == 3
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--ckpt", str(ckpt), "--images", "x", "--methods", "blur", "--out", str(out)])
    assert exit_.value.code == 2


def test_evaluate_with_one_layer_per_step_scores_the_step_points_only(tmp_path, ckpt):
    """`--layers 1`: files of one layer per step, whose layer points are the T + 2 step points."""
    np.save(tmp_path / "images.npy", random_images(1, 16).permute(0, 2, 3, 1).numpy())
    out = tmp_path / "out"
    main(["evaluate", "--ckpt", str(ckpt), "--images", str(tmp_path / "images.npy"), "--methods", "denoise",
          "--codecs", "none", "--tile", "16", "--layers", "1", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    points, layers = results["uqdm"]["points"], results["uqdm"]["layer_points"]
    assert [p["bpp_file"] for p in layers] == pytest.approx([p["bpp_file"] for p in points])
    assert parse((out / "files" / "0.uqdm").read_bytes()).header.layers == 1


def test_evaluate_draws_its_bars_on_a_terminal_only_and_not_with_quiet(tmp_path, ckpt, capsys):
    """As `uqdm compress`: bars on stderr when it is a terminal, nothing of them on a pipe or with -q."""
    np.save(tmp_path / "images.npy", random_images(1, 16).permute(0, 2, 3, 1).numpy())
    args = ["evaluate", "--ckpt", str(ckpt), "--images", str(tmp_path / "images.npy"), "--methods", "denoise",
            "--codecs", "none", "--tile", "16", "--layers", "1", "--out", str(tmp_path / "out")]
    main(args)  # stderr captured by pytest: not a terminal
    assert capsys.readouterr().err == ""
    with terminal_stderr() as shown:
        main(args)
        assert "UQDM files: 100%" in shown(), shown()
    with terminal_stderr() as shown:
        main([*args, "-q"])
        assert shown() == ""


def test_the_compressai_rule_reads_published_files_and_refuses_the_old_uqdm_keys(tmp_path):
    """The restated rule of `compressai.utils.plot` on files in CompressAI's published layouts."""
    published = write_published(tmp_path)
    jpeg = compressai_plot_reads(published["jpeg"], "psnr")
    assert jpeg == {"name": "JPEG", "xs": PUBLISHED_JPEG["results"]["bpp"], "ys": PUBLISHED_JPEG["results"]["psnr-rgb"]}
    ms = compressai_plot_reads(published["jpeg"], "ms-ssim")["ys"]
    assert ms[0] == pytest.approx(7.0569, abs=1e-4)  # −10·log₁₀(1 − 0.80307)
    with pytest.raises(ValueError, match='"psnr-rgb" not available'):  # the layout before 1.2.5
        compressai_plot_reads(published["paper-bmshj2018-factorized"], "psnr")
    old_uqdm = tmp_path / "uqdm-denoise.json"  # what `uqdm evaluate` wrote before
    old_uqdm.write_text(json.dumps({"name": "UQDM", "results": {"bpp": [1.0], "psnr": [30.0], "ms-ssim": [0.9]}}))
    with pytest.raises(ValueError, match='metric "psnr-rgb" not available'):
        compressai_plot_reads(old_uqdm, "psnr")


# --- the released tiny weights on Kodak 64×64 ------------------------------------------------------
SEEDS = (0, 24, 48, 72)  # `--seed N` codes image n with seed N + n: these share no draw
STEP_1_SEED_STD = 0.015  # bpp: std over seeds of step 1's mean over the 24 images (measured, 24 seeds)


def test_released_tiny_weights_reproduce_the_kodak64_reference(released_dir, kodak64):
    """Denoise figures of `uqdm evaluate --size 64` (the same walk and draws)
    against the paper code's, as means over our SEEDS and over the reference's three seeds.

    The random z_1 of each image moves the first points: over seeds, the 24-image mean rate at
    step 1 has a standard deviation of about 3% of itself and the PSNR at z_1 about 0.25 dB, so
    single-seed comparisons there are coin flips. Every figure must meet the issue's tolerance
    (bpp 3%, lossless 0.5%, PSNR 0.5 dB, 1 dB at z_1) except step 1's rate, which must be within 3
    standard errors of the difference of the two means (≈ 0.034 bpp, 7%).
    """
    reference = json.loads((released_dir / "reference-kodak64.json").read_text())["runs"]
    official = import_official(released_dir)
    module = UQDMModule(**official["hyper_parameters"])
    module.load_state_dict(official["state_dict"])
    images = kodak64
    bpp, psnr = [], []
    for seed in SEEDS:
        scores = ProgressiveScores(6, ["denoise"])
        code_each(module.model, images, scores, seed=seed, layers=1)  # the step points: one layer per step
        result = scores.compute()
        bpp.append(result["bpp"])
        psnr.append(result["psnr"]["denoise"][:-1])
        assert result["psnr"]["denoise"][-1] is None  # lossless: every image exact
    runs = [reference[f"{s}/denoise"] for s in range(3)]
    ref_bpp = np.mean([r["bpp"] for r in runs], axis=0)
    ref_psnr = np.mean([r["mean_psnr"][:-1] for r in runs], axis=0)
    bpp, psnr = np.mean(bpp, axis=0), np.mean(psnr, axis=0)

    assert bpp[0] == 0
    standard_error = STEP_1_SEED_STD * math.sqrt(1 / len(SEEDS) + 1 / len(runs))
    assert abs(bpp[1] - ref_bpp[1]) < 3 * standard_error
    assert bpp[2:5] == pytest.approx(ref_bpp[2:5], rel=0.03)
    assert bpp[5] == pytest.approx(ref_bpp[5], rel=0.005)
    assert psnr[0] == pytest.approx(ref_psnr[0], abs=1.0)
    assert psnr[1:] == pytest.approx(ref_psnr[1:], abs=0.5)
