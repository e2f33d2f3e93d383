"""The inference benchmark runs end to end at tiny shapes on the CPU (its numbers come from GPU runs)."""

import argparse

from ivl.bench import inference


def test_inference_bench_smoke(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    inference.add_arguments(parser)
    args = parser.parse_args(["--shapes", "tiny", "--device", "cpu", "--contexts", "32", "96", "--batch", "1",
                              "--decode-tokens", "3", "--decoder", "static", "--plot", str(tmp_path / "p.png")])
    inference.run(args)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + 4  # header, rule, 2 models x 2 contexts
    assert (tmp_path / "p.png").stat().st_size > 0


def test_stream_bench_smoke(tmp_path, capsys):
    from ivl.bench import stream

    parser = argparse.ArgumentParser()
    stream.add_arguments(parser)
    args = parser.parse_args(["--shapes", "tiny", "--device", "cpu", "--frames", "12", "--frame-size", "56",
                              "--sample-every", "4", "--plot", str(tmp_path / "s.png")])
    stream.run(args)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 2 and all("| 12 |" in row for row in rows[2:])  # both ingested all 12 frames
    assert (tmp_path / "s.png").stat().st_size > 0
