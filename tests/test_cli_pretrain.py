"""``bulwark pretrain`` as a user runs it: a subprocess, real files, real data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def bulwark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bulwark.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # seconds of CPU or a subprocess: out of make test-fast
def test_pretrain_writes_a_hardened_checkpoint_and_prints_pre_acc(tmp_path) -> None:
    out = tmp_path / "run"
    done = bulwark(
        "pretrain",
        "--dataset",
        "digits",
        "--arch",
        "convnet",
        "--defense",
        "pcl",
        "--recipe",
        "quick",
        "--epochs",
        "2",
        "--seed",
        "7",
        "--alpha",
        "0.4",
        "--set",
        "momentum=0.8",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert "Pre. Acc" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "model.safetensors").stat().st_size > 0
    assert manifest["config"]["alpha"] == 0.4 and manifest["config"]["momentum"] == 0.8
    assert manifest["seed"] == 7 and manifest["defense"] == "pcl"
    assert f"{100 * manifest['pre_acc']:.2f}%" in done.stdout


@pytest.mark.slow  # a CLI subprocess or a whole audit: out of make test-fast
def test_out_of_range_value_is_refused_naming_the_field(tmp_path) -> None:
    done = bulwark("pretrain", "--dataset", "digits", "--epsilon", "3", "--out", str(tmp_path))
    assert done.returncode == 2
    assert "epsilon" in done.stderr and "less than or equal to 1" in done.stderr
    assert not any(tmp_path.iterdir())


def test_unknown_dataset_lists_the_valid_ones(tmp_path) -> None:
    done = bulwark("pretrain", "--dataset", "imagenet-21k", "--out", str(tmp_path / "x"))
    assert done.returncode == 2
    assert "digits" in done.stderr and "fashion-mnist" in done.stderr
