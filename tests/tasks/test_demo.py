"""mcbeit-demo end to end at test size: every seed pre-trained with the monitor, the random-init
baseline measured on the very weights each run starts from, the table, the JSON and the PNG."""
from __future__ import annotations

import json

from tests.tasks.conftest import PYTHON, run_cli

SMALL = ["--input_size", "64", "--second_input_size", "32", "--num_mask_patches", "6",
         "--min_mask_patches_per_block", "2", "--batch_size", "64", "--print_freq", "4"]


def test_the_demo_measures_pretrained_against_the_initial_weights_of_each_seed(tmp_path):
    out = tmp_path / "demo"
    # a one-epoch tokenizer where the demo looks for it (it reuses what is finished)
    run_cli([PYTHON, "-m", "mcbeit.cli.tokenizer", "train", "--output_dir", str(out / "tokenizer"), "--epochs", "1",
             "--input_size", "64", "--batch_size", "64", "--num_workers", "0", "--device", "cpu"], tmp_path)
    proc = run_cli([PYTHON, "-m", "mcbeit.cli.demo", "--output_dir", str(out), "--seeds", "0", "1", "--epochs", "1",
                    "--num_workers", "0", "--device", "cpu", "--", *SMALL], tmp_path)
    result = json.loads((out / "demo.json").read_text())
    assert result["seeds"] == [0, 1] and result["epochs"] == 1 and len(result["table"]) == 4
    assert "| k-NN top-1, last block |" in proc.stdout and " ± " in proc.stdout
    assert (out / "knn_vs_epochs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["initial"][0] != result["initial"][1]                  # two seeds: two initial models
    for row in result["table"]:
        assert len(row["pretrained"]) == len(row["initial"]) == 2
    # The baseline is the run's own start: a run that cannot move its weights measures exactly it.
    frozen = tmp_path / "frozen"
    run_cli([PYTHON, "run_mcbeit_pretraining.py", "--output_dir", str(frozen), "--seed", "1", "--epochs", "1",
             "--lr", "0", "--min_lr", "0", "--weight_decay", "0", "--discrete_vae_type", "customized",
             "--discrete_vae_weight_path", str(out / "tokenizer" / "tokenizer.pth"), "--eval_linear",
             "--num_workers", "0", "--device", "cpu", *SMALL], tmp_path)
    (row,) = [json.loads(line) for line in (frozen / "log.txt").read_text().splitlines()]
    initial = result["initial"][1]
    assert {k: row[k] for k in initial if k.startswith(("knn_", "linear_")) and k != "knn_time_s"} == \
        {k: v for k, v in initial.items() if k.startswith(("knn_", "linear_")) and k != "knn_time_s"}
    # a rerun reuses every finished run and gives the same table
    again = run_cli([PYTHON, "-m", "mcbeit.cli.demo", "--output_dir", str(out), "--seeds", "0", "1", "--epochs", "1",
                     "--num_workers", "0", "--device", "cpu", "--", *SMALL], tmp_path)
    assert json.loads((out / "demo.json").read_text())["table"] == result["table"]
    assert "pre-training, seed" not in again.stderr
