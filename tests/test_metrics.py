"""What a run reports (train/metrics.py): metrics.csv, throughput, summaries."""

import time

import pytest

from samovar.train.metrics import COLUMNS, MetricsLog, Throughput, read_metrics, run_summary


def test_rows_are_appended_and_truncated_to_complete_rows_up_to_a_step(tmp_path):
    log = MetricsLog(tmp_path, main=True)
    log.start()
    for step in (10, 20, 30):
        log.log({"step": step, "loss": 3.0 - step / 100, "lr": "1e-3", "val_loss": 2.5 if step == 20 else None})
    with (tmp_path / "metrics.csv").open("a") as f:
        f.write("40,2.6")  # a line a SIGKILL cut in half
    assert [r["step"] for r in read_metrics(tmp_path)] == ["10", "20", "30", "40"]
    log.truncate(25)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == ["10", "20"] and list(rows[0]) == COLUMNS
    log.close()


def test_other_ranks_write_nothing(tmp_path):
    log = MetricsLog(tmp_path, main=False)
    log.start()
    log.log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "metrics.csv").exists()


def test_throughput_reads_tokens_per_second_and_mfu():
    meter = Throughput(flops_per_token=100.0, peak_flops=1e6)
    meter.add(1000)
    time.sleep(0.05)
    tps, mfu = meter.read()
    assert 1000 / 1.0 < tps < 1000 / 0.05 and mfu == pytest.approx(100.0 * tps / 1e6)
    assert Throughput(100.0, None).read()[1] is None


def test_summary_of_a_run(tmp_path):
    log = MetricsLog(tmp_path, main=True)
    log.start()
    log.log({"step": 5, "loss": 2.0, "lr": "1e-3", "val_loss": 2.2, "tokens": 500, "elapsed_s": 1.5})
    log.log({"step": 10, "loss": 1.8, "lr": "1e-3", "val_loss": 2.1, "tokens": 1000, "elapsed_s": 3.0})
    s = run_summary(tmp_path)
    assert (s["steps"], s["tokens"], s["best_val_loss"], s["last_loss"], s["elapsed_s"]) == (10, 1000, 2.1, 1.8, 3.0)
