"""benchmarks/reproduction.py: what make reproduce reports (minutes per step over reruns, both scores)."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("reproduction", ROOT / "benchmarks" / "reproduction.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_minutes_add_up_over_reruns_and_scores_are_compared(tmp_path):
    run = tmp_path / "run"
    for d in ("ae", "unet", "test", "test_shipped"):
        (run / d).mkdir(parents=True)
    # a first pass killed in the autoencoder, then a rerun that resumes it and finishes
    (run / "stages.log").write_text("0 prepare\n60 autoencoder\n660 prepare\n661 autoencoder\n1861 latents\n"
                                    "2461 unet\n5461 export\n5467 score\n5647 score shipped\n5827 done\n")
    (run / "ae" / "val.jsonl").write_text('{"step": 200, "psnr": 20.5, "psnr_lung": 14.0}\n{"step": 400, "psnr": 22.25}\n')
    (run / "unet" / "val.jsonl").write_text('{"step": 1000, "psnr": 31.0, "psnr_cubic": 30.9, "psnr_ceiling": 33.0}\n')
    for d, ours in (("test", 38.1), ("test_shipped", 38.25)):
        methods = {"cubic": {"psnr": 36.9}, "cubic + consistency": {"psnr": 37.16}, "ours + consistency": {"psnr": ours},
                   "ours without adaptation + consistency": {"psnr": ours - 0.5 - (d == "test") * 0.3}}
        (run / d / "summary.json").write_text(json.dumps({"cases": 1, "methods": methods}))
    out = tmp_path / "reproduction.json"
    assert _module().main([str(run), "--out", str(out), "--plot", str(tmp_path / "curves.png")]) == 0
    report = json.loads(out.read_text())
    assert report["minutes"] == {"prepare": 1.0, "autoencoder": 30.0, "latents": 10.0, "unet": 50.0, "export": 0.1,
                                 "score": 3.0, "score shipped": 3.0}
    assert report["total_minutes"] == 97.1
    diff = report["reproduced_minus_shipped_db"]
    assert diff["ours + consistency"] == -0.15 and diff["cubic"] == 0.0
    assert report["within_tolerance"]["ours + consistency"] is True
    assert report["within_tolerance"]["ours without adaptation + consistency"] is False
    assert [r["step"] for r in report["curves"]["autoencoder"]] == [200, 400]
    assert report["curves"]["unet"][0]["psnr_ceiling"] == 33.0
    assert (tmp_path / "curves.png").stat().st_size > 1000
