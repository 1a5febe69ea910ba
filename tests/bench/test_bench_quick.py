"""The benchmarks run and print (figures are not asserted: performance lives in bench/, not in tests)."""
from bench import pretrain_step, tokenizers


def test_tokenizer_benchmark_runs_and_prints(capsys):
    rows = tokenizers.main(["--kinds", "customized", "--image_size", "32", "--batch_size", "2", "--repeats", "1",
                            "--amp", "fp32"])
    assert rows[0]["kind"] == "customized" and rows[0]["gflops_per_image"] > 0
    assert "customized" in capsys.readouterr().out


def test_step_benchmark_runs_and_prints(capsys):
    row = pretrain_step.main(["--input_size", "64", "--batch_size", "2", "--steps", "1", "--warmup", "1"])
    assert row["step_s"] > 0 and "images/s" in capsys.readouterr().out
