"""Bad input gives a clear error naming what is wrong: unknown keys, wrong types, contradictory
bounds, a micro-batch that does not divide, --resume without a checkpoint, a checkpoint from
an incompatible config. And the config round trip (file < flags, config.json)."""
from __future__ import annotations

import json

import pytest
import torch

from fastnorm.train import ConfigError, TrainConfig, parse_args
from fastnorm.train.__main__ import main


@pytest.fixture(autouse=True)
def _keep_process_state():
    # main() sets the trainer's thread count and seeds torch: restore both for later tests.
    n, rng = torch.get_num_threads(), torch.get_rng_state()
    yield
    torch.set_num_threads(n)
    torch.set_rng_state(rng)


def test_flags_file_and_defaults(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.5, "norm": "gn", "max_steps": 10}))
    cfg = parse_args(["--config", str(path), "--max-steps=20", "--allow-shrink", "false"])
    assert (cfg.lr, cfg.norm, cfg.max_steps, cfg.allow_shrink) == (0.5, "gn", 20, False)
    assert parse_args([]) == TrainConfig()


@pytest.mark.parametrize("argv, match", [
    (["--bogus", "1"], "unknown config key 'bogus'"),
    (["--max-step", "1"], r"did you mean --max-steps"),
    (["--max-steps", "ten"], r"--max-steps: expected int, got 'ten'"),
    (["--lr", "fast"], r"--lr: expected float"),
    (["--allow-shrink", "maybe"], r"--allow-shrink: expected bool"),
    (["--norm", "rms"], r"--norm: expected one of \['bn', 'syncbn', 'gn', 'ln'\]"),
    (["--optimizer", "lamb"], r"--optimizer: expected one of"),
    (["--min-batch-size", "256", "--max-batch-size", "128", "--batch-size", "256"],
     "contradictory bounds"),
    (["--batch-size", "48", "--micro-batch", "32"], "does not divide --batch-size 48"),
    (["--batch-size", "1024", "--max-batch-size", "512"], "contradictory bounds"),
    (["--min-batch-size", "64", "--batch-size", "32"], "outside"),
    (["--lr", "-1"], "--lr: must be > 0"),
    (["--max-steps"], "missing value"),
    (["max_steps", "3"], "expected --key value"),
])
def test_bad_flags(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(argv)


def test_bad_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"micro_batch": "16"}))
    with pytest.raises(ConfigError, match="--micro-batch: expected int"):
        parse_args(["--config", str(path)])
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_args(["--config", str(path)])
    with pytest.raises(ConfigError, match="cannot read"):
        parse_args(["--config", str(tmp_path / "missing.json")])


def test_world_dependent_checks():
    cfg = parse_args(["--batch-size", "32", "--micro-batch", "16"])
    with pytest.raises(ConfigError, match="multiple of world size x micro-batch = 3 x 16"):
        cfg.validate_world(3)
    one = parse_args(["--batch-size", "32", "--micro-batch", "32"])
    with pytest.raises(ConfigError, match="at least 2 micro-batches"):
        one.validate_world(1)
    parse_args(["--batch-size", "32", "--micro-batch", "32",
                "--adaptive-batch", "off"]).validate_world(1)


def test_resume_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--resume", str(empty)]) == 2
    assert "holds no checkpoint.pt" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err

    run = tmp_path / "run"
    run.mkdir()
    saved = TrainConfig(norm="gn", lr=0.3).to_dict()
    torch.save({"config": {**saved, "out_dir": str(run)}, "world_size": 1},
               run / "checkpoint.pt")
    assert main(["--out-dir", str(run), "--resume", "auto", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "incompatible config" in err and "norm: checkpoint 'gn', now 'bn'" in err
    assert "lr: checkpoint 0.3, now 0.1" in err
    # Not resuming into a directory that has a checkpoint: refused, nothing overwritten.
    assert main(["--out-dir", str(run)]) == 2
    assert "already holds a checkpoint.pt" in capsys.readouterr().err
    assert torch.load(run / "checkpoint.pt", weights_only=False)["config"]["norm"] == "gn"
