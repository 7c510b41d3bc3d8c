"""`uqdm plot`: the curves of results.json, rd.json and CompressAI files (ours and CompressAI's
published ones) in one figure, BD-rates against an anchor, one-line errors, and no torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compressai_format import write_published
from uqdm.cli import main
from uqdm.evaluation.overlay import overlay

RATES = [0.25, 0.5, 1.0, 2.0]
PSNR = [26.0, 29.5, 32.0, 36.0]


def results_file(folder: Path, scale: float, with_files: bool = True) -> Path:
    """A results.json in `uqdm evaluate`'s layout (rd.json of a fit run: ideal bits only, no codecs):
    UQDM at `scale` times RATES, z1 to lossless."""
    names = ["z1", "step_1", "step_2", "step_3", "lossless"]
    points = [{"point": j, "name": name, "bpp_ideal": scale * r, "bpp_file": scale * r if with_files else None,
               "psnr": {"denoise": p}} for j, (name, r, p) in enumerate(zip(names, RATES + [8.0], PSNR + [None]))]
    data = {"uqdm": {"points": points}}
    if with_files:
        data["codecs"] = {"jpeg": [{"quality": q, "bpp": 2 * r, "psnr": p} for q, r, p in zip((10, 50, 90, 95), RATES, PSNR)]}
    folder.mkdir(parents=True)
    path = folder / ("results.json" if with_files else "rd.json")
    path.write_text(json.dumps(data))
    return path


def test_plot_overlays_every_kind_of_file_and_prints_bd_rates(tmp_path, capsys):
    ours = results_file(tmp_path / "kodak64", 1.0)
    fit = results_file(tmp_path / "fit-run", 0.9, with_files=False)
    summary = tmp_path / "summary.json"  # the progressive metrics' own summary
    summary.write_text(json.dumps({"bpp": [0.8 * r for r in RATES] + [8.0], "psnr": {"flow_based": PSNR + [None]}}))
    published = write_published(tmp_path)
    out = tmp_path / "rd.png"
    main(["plot", str(ours), str(fit), str(summary), str(published["jpeg"]),
          str(published["paper-bmshj2018-factorized"]), "-o", str(out), "--anchor", "UQDM (denoise) [kodak64]"])
    printed = capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rates = {line.rsplit(None, 2)[0].strip(): line.rsplit(None, 1)[-1] for line in printed.splitlines()[2:-1]}
    assert rates["UQDM (denoise) [kodak64]"] == "anchor"
    assert float(rates["UQDM (denoise) [fit-run]"]) == pytest.approx(-10.0, abs=1e-3)  # same PSNR at 0.9× the bits
    assert float(rates["UQDM (flow_based)"]) == pytest.approx(-20.0, abs=1e-3)
    assert float(rates["JPEG [kodak64]"]) == pytest.approx(100.0, abs=1e-3)  # twice the bits
    # CompressAI's published curves, in both layouts, overlap the anchor's PSNR range
    assert float(rates["JPEG [jpeg]"]) > 0 and float(rates["official bmshj2018-factorized"]) < 0
    assert len(rates) == 6


def test_plot_labels_the_same_curve_of_two_runs_apart_and_errs_in_one_line(tmp_path, capsys):
    a, b = results_file(tmp_path / "a", 1.0), results_file(tmp_path / "b", 1.1)
    assert set(overlay([a, b])) == {"UQDM (denoise) [a]", "UQDM (denoise) [b]", "JPEG [a]", "JPEG [b]"}
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    no_psnr = tmp_path / "ms-only.json"
    no_psnr.write_text(json.dumps({"name": "x", "results": {"bpp": [1.0], "ms-ssim-rgb": [0.9]}}))
    cases = [[str(tmp_path / "missing.json")], [str(bad_json)], [str(no_psnr)], [str(a), "--anchor", "WebP"],
             [str(a), str(b), "--anchor", "UQDM"]]
    for args in cases:
        with pytest.raises(SystemExit) as exit_:
            main(["plot", *args, "-o", str(tmp_path / "x.png")])
        assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(cases) and all(line.startswith("uqdm: error: ") for line in err)
    assert "no such file" in err[0] and "ms-ssim-rgb" in err[2] and "matches no curve" in err[3]
    assert "matches several curves" in err[4]
    assert not (tmp_path / "x.png").exists()


def test_plot_imports_neither_torch_nor_lightning(tmp_path):
    path = results_file(tmp_path / "run", 1.0)
    probe = ("import sys; from uqdm.cli import main; main(sys.argv[1:]); "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning'}))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", probe, "plot", str(path), "-o", str(tmp_path / "rd.png")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[]"
