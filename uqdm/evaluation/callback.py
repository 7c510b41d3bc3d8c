"""The progressive-metrics callback: rate and distortion at every truncation point during
validation and test, logged as scalars, an RD table, an RD plot and a grid of reconstructions."""

import csv
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torchvision.utils import make_grid

from uqdm.diffusion import RECONSTRUCTIONS

from .fid import load_inception
from .metrics import ProgressiveScores
from .perceptual import load_lpips
from .plots import figure_array, rd_figure
from .pretrained import WeightsUnavailable
from .progressive import SharedNoise, point_names, progressive_chain
from .quality import LPIPS_MIN_SIDE
from .report import fit_results, rd_table, uqdm_curves, write_json

RD_FILE = "rd.json"


def run_folder(trainer: Trainer) -> Path:
    """The folder of a fit run: the parent of its checkpoint folder (``runs/<project>/<run id>``
    with W&B), else the trainer's `default_root_dir`."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    return Path(dirpath).parent if dirpath else Path(trainer.default_root_dir)


class ProgressiveMetrics(Callback):
    """Runs the progressive chain (`progressive.progressive_chain`, universal quantization, no
    files) on every validation batch every `every_n_epochs` epochs and on every test batch.

    Logs, per truncation point (`z1`, `step_1` … `step_T`, `lossless`): `<stage>/bpp/<point>`
    (cumulative ideal bits per pixel) and, per reconstruction method and lossy point,
    `<stage>/psnr/<method>/<point>` (mean of per-image PSNR, dB), `<stage>/lpips/<method>/<point>`
    and `<stage>/fid/<method>/<point>`.
    The states are torchmetrics sums, so they synchronise across processes. On rank zero it also
    logs an RD table, an RD plot and, per method, a grid of the progressive reconstructions of the
    first `num_images_grid` images (rows: images; columns: points) — through the logger's
    `log_table` / `log_image` when it has them (W&B), else as CSV/PNG files in its `log_dir`.

    FID uses torch-fidelity's Inception-v3 with the weights at `fid_weights`, LPIPS torchmetrics'
    AlexNet LPIPS with torchvision's AlexNet weights at `lpips_weights` (each downloaded there on
    first use; default: the torch.hub cache). Offline without its weights, a metric warns once and
    is off; LPIPS is also off, with one warning, on images under 31 px a side.
    Dithers and z_1 are seeded per batch from `seed`, so epochs compare.

    After each validation, rank zero also writes the RD table to `rd.json` in the run's folder
    (`run_folder`), in `uqdm evaluate`'s `results.json` layout with ideal bits only
    (`report.fit_results`); at the end of a fit it holds the final one, which `uqdm plot` overlays.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        methods: tuple[str, ...] = ("denoise",),
        fid: bool = False,
        fid_weights: str | None = None,
        lpips: bool = False,
        lpips_weights: str | None = None,
        num_images_grid: int = 4,
        seed: int = 0,
    ):
        unknown = set(methods) - set(RECONSTRUCTIONS)
        if unknown or not methods:
            raise ValueError(f"methods must be some of {RECONSTRUCTIONS}, got {methods}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be at least 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.methods = list(methods)
        self.fid = fid
        self.fid_weights = fid_weights
        self.lpips = lpips
        self.lpips_weights = lpips_weights
        self.num_images_grid = num_images_grid
        self.seed = seed
        self.scores: ProgressiveScores | None = None
        self.active = False
        self.grid: dict[str, torch.Tensor] = {}
        self.image_size: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.scores is not None:
            return
        inception = self._optional(load_inception, self.fid_weights) if self.fid else None
        lpips = self._optional(load_lpips, self.lpips_weights) if self.lpips else None
        points = len(point_names(pl_module.model.n_timesteps))
        self.scores = ProgressiveScores(points, self.methods, inception=inception, lpips=lpips)

    @staticmethod
    def _optional(load, weights):
        """`load(weights)`, or None with one warning when the weights are unavailable."""
        try:
            return load(weights)
        except WeightsUnavailable as e:
            rank_zero_warn(str(e))
            return None

    # --- the three moments of an evaluation loop, shared by validation and test -------------------
    def _start(self, trainer: Trainer, pl_module: LightningModule, active: bool) -> None:
        self.active = active
        if active:
            self.scores.to(pl_module.device).reset()
            self.grid = {}

    def _update(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int, dataloader_idx: int):
        if not self.active:
            return
        seed = hash((self.seed, trainer.global_rank, dataloader_idx, batch_idx)) & 0x7FFF_FFFF_FFFF_FFFF
        generator = torch.Generator(pl_module.device).manual_seed(seed)
        images = batch.to(pl_module.device)
        self.image_size = images.shape[-1] if images.shape[-1] == images.shape[-2] else None
        model = pl_module.model
        dtype = next(model.parameters()).dtype
        noise = SharedNoise.draw(images.shape, model.n_timesteps, generator, pl_module.device, dtype)
        result = progressive_chain(model, images, noise, self.methods, generator)
        self.scores.update(images, result.bits, result.pictures)
        if trainer.is_global_zero and batch_idx == 0 and dataloader_idx == 0 and self.num_images_grid > 0:
            n = self.num_images_grid
            # rows of images, one column per point: (image, point) order
            self.grid = {m: torch.stack([p[:n].cpu() for p in pics], dim=1).flatten(0, 1)
                         for m, pics in result.pictures.items()}

    def _finish(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.active:
            return
        self.active = False
        names = point_names(pl_module.model.n_timesteps)
        if self.scores.lpips_skipped:
            rank_zero_warn(f"LPIPS is off: images under {LPIPS_MIN_SIDE} px a side are too small for AlexNet")
            self.scores.lpips = self.scores.lpips_net = None
        results = self.scores.compute()
        # The values are already global (synchronised states); sync_dist only keeps Lightning from
        # warning, averaging identical numbers.
        for name, value in _scalars(stage, names, results).items():
            pl_module.log(name, value, sync_dist=True)
        if trainer.is_global_zero:
            self._log_artifacts(trainer, stage, names, results)
            if stage == "val" and not trainer.sanity_checking:
                images = int(self.scores.bpp[0].weight)  # this process's images
                write_json(run_folder(trainer) / RD_FILE,
                           fit_results(names, results, images, self.image_size, trainer.global_step))

    def _log_artifacts(self, trainer: Trainer, stage: str, names: list[str], results: dict) -> None:
        columns, rows = rd_table(names, results)
        title = f"UQDM {stage}, step {trainer.global_step}"
        images = {f"{stage}/rd_plot": figure_array(rd_figure(uqdm_curves(results["bpp"], results["psnr"]), title))}
        for method, pictures in self.grid.items():
            grid = make_grid(pictures, nrow=len(names), padding=1, pad_value=255)
            images[f"{stage}/progressive/{method}"] = grid.permute(1, 2, 0).numpy()
        for logger in trainer.loggers:
            if hasattr(logger, "log_table") and hasattr(logger, "log_image"):  # W&B
                logger.log_table(key=f"{stage}/rd_table", columns=columns, data=rows, step=trainer.global_step)
                for key, pixels in images.items():
                    logger.log_image(key=key, images=[pixels], step=trainer.global_step)
            elif getattr(logger, "log_dir", None):
                _write_files(Path(logger.log_dir) / "progressive", f"{stage}_step{trainer.global_step}",
                             columns, rows, images)

    # --- Lightning hooks ------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        active = not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0
        self._start(trainer, pl_module, active)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._update(trainer, pl_module, batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, True)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._update(trainer, pl_module, batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, pl_module, "test")


def _scalars(stage: str, names: list[str], results: dict) -> dict[str, float]:
    """`stage/bpp/<point>`, and `stage/<kind>/<method>/<point>` for PSNR, LPIPS and FID (values that
    exist: the exact last point has none)."""
    out = {f"{stage}/bpp/{p}": v for p, v in zip(names, results["bpp"]) if v is not None}
    for kind in ("psnr", "lpips", "fid"):
        for method, values in (results[kind] or {}).items():
            out.update({f"{stage}/{kind}/{method}/{p}": v for p, v in zip(names, values) if v is not None})
    return out


def _write_files(folder: Path, stem: str, columns: list[str], rows: list[list], images: dict) -> None:
    """The RD table as CSV and the images as PNG, for loggers without rich media."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{stem}_rd_table.csv", "w", newline="") as f:
        csv.writer(f).writerows([columns, *rows])
    for key, pixels in images.items():
        Image.fromarray(pixels).save(folder / f"{stem}_{key.split('/', 1)[1].replace('/', '_')}.png")
