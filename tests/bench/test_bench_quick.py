"""The benchmark runs and prints (figures are not asserted: performance lives in mcbeit/bench/, not in tests)."""
import json

from mcbeit.bench import run, tokenizers


def test_tokenizer_benchmark_runs_and_prints(capsys):
    rows = tokenizers.main(["--kinds", "customized", "--image_size", "32", "--batch_size", "2", "--repeats", "1",
                            "--amp", "fp32"])
    assert rows[0]["kind"] == "customized" and rows[0]["gflops_per_image"] > 0
    assert "customized" in capsys.readouterr().out


def test_quick_benchmark_prints_every_section_and_writes_the_json(tmp_path, capsys):
    path = tmp_path / "figures.json"
    result = run.main(["--quick", "--json", str(path), "--sections", "step,data,finetune,tokenizers,scaling,monitor,beitv2,compile"])
    out = capsys.readouterr().out
    for title in ("Pre-training step", "Data pipeline per worker", "Fine-tuning step", "Tokenizers", "Scaling",
                  "--compile", "k-NN monitor", "BEiT v2 pre-training step", "VQ-KD training step"):
        assert title in out
    saved = json.loads(path.read_text())
    assert saved["mode"] == "quick" and saved["step"][0]["loss_abs_diff"] is not None
    step = saved["step"][0]
    assert step["ours"]["peak_bytes"] > 0 and step["reference"]["peak_bytes"] > 0
    assert 0 < step["ours"]["gflop"] < step["reference"]["gflop"]   # masked rows only: less work, counted
    assert saved["compile"]["compiled_step_s"] > 0
    for key in ("beitv2", "vqkd"):   # side by side with the literal formulation of unilm's step
        (row,) = saved[key]
        assert row["ours"]["step_s"] > 0 and row["reference"]["peak_bytes"] > 0 and row["speedup"] > 0
    assert saved["beitv2"][0]["loss_abs_diff"] < 1e-4
    for key in ("speedup_step_base_fp32", "memory_ratio_step_base_fp32", "speedup_data_per_worker"):
        assert key in saved and key in result
    assert [row["processes"] for row in saved["scaling"]["processes"]] == [1, 2]
    (monitor,) = saved["monitor"]
    assert monitor["extract_s_per_1000"] > 0 and monitor["features"] == 4 and monitor["knn_s"] > 0


def test_conmim_benchmark_times_its_phases_beside_the_original_step_on_the_same_loss(tmp_path, capsys):
    path = tmp_path / "figures.json"
    result = run.main(["--quick", "--json", str(path), "--sections", "conmim"])
    assert "ConMIM pre-training step" in capsys.readouterr().out
    (row,) = json.loads(path.read_text())["conmim"]
    assert row == json.loads(json.dumps(result["conmim"][0], default=str))
    assert row["masked_patches"] == 12                     # random_mps32 at 64 px: 3 of 4 cells of 2x2 patches
    assert row["loss_abs_diff"] < 1e-4                     # the first step, the same weights and inputs
    for who in ("ours", "reference"):
        figures = row[who]
        for phase in ("teacher", "forward", "loss", "backward", "optimizer", "ema"):
            assert figures[f"{phase}_s"] > 0, (who, phase)
        assert figures["images_per_s"] > 0 and figures["peak_bytes"] > 0 and figures["gflop"] > 0
    assert row["speedup"] > 0 and row["memory_ratio"] > 0


def test_segmentation_benchmark_times_the_upernet_step_beside_transformers_and_the_sliding_window(tmp_path, capsys,
                                                                                                 one_thread):
    path = tmp_path / "figures.json"
    result = run.main(["--quick", "--json", str(path), "--sections", "segmentation"])
    out = capsys.readouterr().out
    assert "UperNet segmentation step" in out and "Sliding-window evaluation" in out
    saved = json.loads(path.read_text())
    (row,) = saved["segmentation"]
    assert row == json.loads(json.dumps(result["segmentation"][0], default=str))
    assert row["parameters_m"]["ours"] == row["parameters_m"]["reference"]   # the same sizes, neck and heads
    for who in ("ours", "reference"):
        figures = row[who]
        assert figures["fwd_loss_bwd_s"] > 0 and figures["optimizer_s"] > 0 and figures["images_per_s"] > 0
        assert figures["peak_bytes"] > 0 and figures["gflop"] > 0
    assert abs(row["ours"]["gflop"] / row["reference"]["gflop"] - 1) < 0.1  # the same work per step
    (slide,) = saved["segmentation_slide"]
    assert slide["windows"] == 2 and slide["image"] == [64, 85] and slide["stride"] == 42
    assert slide["ours"]["s_per_image"] > 0 and slide["reference"]["window_batch"] == 1


def test_detection_benchmark_times_the_mask_rcnn_step_with_and_without_checkpointing_and_one_image_evaluation(
        tmp_path, capsys, one_thread):
    path = tmp_path / "figures.json"
    result = run.main(["--quick", "--json", str(path), "--sections", "detection"])
    out = capsys.readouterr().out
    assert "Mask R-CNN detection step" in out and "Detection evaluation" in out
    saved = json.loads(path.read_text())
    (row,) = saved["detection"]
    assert row == json.loads(json.dumps(result["detection"][0], default=str))
    assert row["num_classes"] == 80 and row["batch_size"] == 1 and row["input_size"] == 128   # the stub's categories
    assert row["grad_checkpointing"] == {"plain": False, "checkpointing": True}
    for who in ("plain", "checkpointing"):
        figures = row[who]
        for phase in ("forward", "backward", "optimizer"):   # the engine's marks
            assert figures[f"{phase}_s"] > 0, (who, phase)
        assert figures["images_per_s"] > 0 and figures["peak_bytes"] > 0 and figures["gflop"] > 0
    assert row["checkpointing"]["gflop"] > row["plain"]["gflop"]   # the blocks' forward again in the backward
    assert row["time_ratio"] > 0 and row["memory_ratio"] > 0
    (ev,) = saved["detection_eval"]
    assert ev["image"] == [96, 128] and ev["scale"] == 1.0 and ev["input_size"] == 128
    assert ev["detections"] == ev["with_masks"] == 100 and ev["mask_size"] == [96, 128]   # pasted at the original size
    assert ev["forward_s"] > 0 and ev["results_s"] > 0 and ev["peak_bytes"] > 0 and ev["gflop_per_image"] > 0
