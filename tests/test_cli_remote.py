"""``bulwark remote``: the hub flow against the embedded service (``bulwark serve`` with a real
worker, the fixture of tests/test_client.py), its errors and exit codes, the config file; and
the CLI's hygiene (``--version``, help texts, usage errors, read-only ``db current``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_client import QUICK_AUDIT, ROOT, Service, digits_npz, embedded_env, service

from bulwark.cli import COMMANDS, main
from bulwark.commands.remote import VERDICT_EXIT

__all__ = ["service"]  # the module-scoped fixture, shared with tests/test_client.py


def remote(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``bulwark remote ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main(["remote", *args])
    except SystemExit as exit_:  # argparse's usage errors
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def as_json(out: str) -> Any:
    return json.loads(out)


@pytest.fixture
def connected(service: Service, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Service:
    monkeypatch.setenv("BULWARK_URL", service.url)
    monkeypatch.setenv("BULWARK_API_KEY", service.key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    return service


@pytest.mark.e2e
def test_the_hub_flow_through_bulwark_remote(
    connected: Service, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = remote(
        capsys,
        "submit",
        "pretrain",
        "--dataset",
        "digits",
        "--arch",
        "convnet",
        "--defense",
        "none",
        "--recipe",
        "quick",
        "--epochs",
        "1",
        "--wait",
        "--json",
    )
    assert code == 0, (err, connected.output())
    pretrained = as_json(out)
    assert pretrained["status"] == "succeeded" and pretrained["result_model_id"]

    code, out, err = remote(
        capsys, "get", "weights", pretrained["result_model_id"], "--out", str(tmp_path), "--json"
    )
    assert code == 0, err
    weights = Path(as_json(out)["path"])
    assert weights.parent == tmp_path and weights.suffix == ".safetensors"

    code, out, err = remote(
        capsys,
        "upload",
        "model",
        str(weights),
        "--arch",
        "convnet",
        "--input-shape",
        "1,8,8",
        "--name",
        "cli-digits",
        "--json",
    )
    assert code == 0, err
    model = as_json(out)
    assert model["name"] == "cli-digits" and model["arch"] == "convnet"

    code, out, err = remote(
        capsys, "upload", "dataset", str(digits_npz(tmp_path / "digits.npz")), "--json"
    )
    assert code == 0, err
    dataset = as_json(out)
    assert dataset["status"] == "ready"

    code, out, _ = remote(capsys, "models", "list")
    assert code == 0 and "cli-digits" in out and model["id"] in out
    code, out, _ = remote(capsys, "datasets", "list", "--json")
    assert code == 0 and dataset["id"] in {d["id"] for d in as_json(out)["items"]}

    body = tmp_path / "audit.json"
    body.write_text(json.dumps(QUICK_AUDIT | {"dataset_id": dataset["id"]}))
    code, out, err = remote(
        capsys, "submit", "audit", "--json-body", str(body), "--model-id", model["id"], "--json"
    )
    assert code == 0, err
    audit = as_json(out)
    assert audit["kind"] == "audit" and audit["status"] in ("queued", "running")

    code, out, err = remote(capsys, "watch", audit["id"], "--json")
    watched = as_json(out)
    assert watched["status"] == "succeeded", (watched["error"], connected.output())
    assert watched["verdict"] in VERDICT_EXIT
    assert code == VERDICT_EXIT[watched["verdict"]]  # 0 pass, 1 fail, 3 inconclusive

    saved = tmp_path / "report.json"
    code, out, err = remote(capsys, "get", "report", audit["id"], "--out", str(saved))
    assert code == 0, err
    assert f"verdict: {watched['verdict']}" in out and "fc: ASR" in out
    # The saved report is what `bulwark verify` checks, against the service's key.
    capsys.readouterr()
    assert main(["verify", str(saved), "--url", connected.url]) == 0, capsys.readouterr()

    code, out, err = remote(capsys, "get", "card", model["id"])
    assert code == 0 and out.startswith("---") and "cli-digits" in out, err

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": {"max_asr": 0.9}}))
    code, out, err = remote(capsys, "policy", "put", str(policy), "--json")
    assert code == 0, err
    version = as_json(out)["version"]
    code, out, _ = remote(capsys, "policy", "get", "--json")
    assert code == 0 and as_json(out)["version"] == version


@pytest.mark.e2e
def test_remote_errors_have_exit_codes_and_the_command_prefix(
    connected: Service,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = str(uuid.uuid4())
    code, out, err = remote(capsys, "get", "job", missing)
    # The title is the server's ("Not Found" from FastAPI, the problem's own title after it).
    assert code == 4 and err.startswith("bulwark remote get job: 404 "), err
    assert f"no job {missing}" in err
    code, out, err = remote(capsys, "watch", missing, "--json")
    assert code == 4 and as_json(out)["status"] == 404

    # Invalid before anything is sent: one line per field, named by its flag.
    code, _, err = remote(capsys, "submit", "audit", "--dataset", "digits", "--iterations", "0")
    assert code == 2
    assert "bulwark remote submit audit: --model-id: Field required" in err
    assert "bulwark remote submit audit: --iterations:" in err
    code, _, err = remote(capsys, "submit", "pretrain", "--dataset", "digits", "--dataset-id", "x")
    assert code == 2 and "bulwark remote submit pretrain: error: argument --dataset-id" in err
    code, _, err = remote(capsys, "submit", "pretrain", "--dataset", "digits", "--set", "oops")
    assert code == 2 and "bulwark remote submit pretrain: --set: expected FIELD=VALUE" in err
    # Valid here, refused by the service's resolution (a 422 naming the field): usage, 2.
    code, _, err = remote(
        capsys, "submit", "pretrain", "--dataset", "digits", "--set", "lr=fast", "--arch", "convnet"
    )
    assert code == 2 and "lr" in err, err
    code, _, err = remote(capsys, "upload", "model", str(tmp_path / "none.pt2"))
    assert code == 2 and f"bulwark remote upload model: no file {tmp_path}" in err

    monkeypatch.setenv("BULWARK_API_KEY", "bwk_wrong")
    code, out, err = remote(capsys, "models", "list", "--json")
    assert code == 4 and as_json(out)["status"] == 401
    assert err.startswith("bulwark remote models list: 401 ")

    # The key (and URL) from a config file; a malformed one is a usage error.
    monkeypatch.delenv("BULWARK_API_KEY")
    monkeypatch.delenv("BULWARK_URL")
    config = tmp_path / "config.toml"
    config.write_text(f'url = "{connected.url}"\napi_key = "{connected.key}"\n')
    code, out, err = remote(capsys, "--config", str(config), "models", "list", "--json")
    assert code == 0, err
    assert as_json(out)["total"] >= 0
    (tmp_path / "xdg" / "bulwark").mkdir(parents=True)
    (tmp_path / "xdg" / "bulwark" / "config.toml").write_text(config.read_text())
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    code, out, err = remote(capsys, "datasets", "list")
    assert code == 0, err
    config.write_text("url = \n")
    code, _, err = remote(capsys, "models", "list", "--config", str(config))
    assert code == 2 and "bulwark remote models list: --config" in err and "not TOML" in err
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "empty"))
    code, _, err = remote(capsys, "models", "list")
    assert code == 2 and "no service URL" in err


def test_a_refused_connection_is_exit_4(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from test_client import free_port

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, _, err = remote(capsys, "models", "list", "--url", url, "--retries", "1")
    assert code == 4 and "bulwark remote models list: connection failed" in err


# ----------------------------------------------------------------------------- hygiene


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert re.fullmatch(r"bulwark \S+\n", capsys.readouterr().out)


def help_text(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "bulwark.cli", *args, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


REMOTE_LEAVES = [
    ("remote", "submit", "pretrain"),
    ("remote", "submit", "audit"),
    ("remote", "watch"),
    ("remote", "get", "weights"),
    ("remote", "upload", "model"),
    ("remote", "policy", "put"),
]


@pytest.mark.parametrize("command", [(name,) for name in COMMANDS] + REMOTE_LEAVES, ids=" ".join)
def test_help_texts_name_each_default_once(command: tuple[str, ...]) -> None:
    text = help_text(*command)
    assert f"usage: bulwark {' '.join(command)}" in text
    # One option's help: from its flag to the next (the first chunk is the usage and the
    # description); "(default: None)" helps nobody either.
    for entry in re.split(r"\n  (?=-)", text)[1:]:
        assert entry.count("default:") <= 1, entry
        assert "(default: None)" not in entry and "(default: False)" not in entry, entry


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["pretrain", "--dataset", "digits"], "bulwark pretrain: error:"),
        (["audit", "--model", "m", "--dataset", "nope", "--out", "r"], "bulwark audit: error:"),
        (["remote", "watch"], "bulwark remote watch: error:"),
        (["remote", "get", "report"], "bulwark remote get report: error:"),
        (["db", "sideways"], "bulwark db: error:"),
    ],
)
def test_usage_errors_exit_2_with_the_commands_prefix(
    argv: list[str], prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert prefix in capsys.readouterr().err


def test_pydantic_errors_are_one_line_naming_the_flag(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(["pretrain", "--dataset", "digits", "--epochs", "0", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert (
        code == 2
        and err == "bulwark pretrain: --epochs: Input should be greater than or equal to 1\n"
    )


def test_missing_data_is_refused_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    code = main(["pretrain", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "x"),
                 "--out", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2 and not out.exists() and captured.out == ""
    assert captured.err.startswith("bulwark pretrain: --data-dir: no folder")
    code = main(["audit", "--model", str(tmp_path), "--dataset", "mnist", "--out", str(out)])
    assert (
        code == 2 and "bulwark audit: --data-dir: dataset 'mnist' needs" in capsys.readouterr().err
    )


def test_db_current_creates_nothing(tmp_path: Path) -> None:
    env = embedded_env(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "-m", "bulwark.cli", "db", "current"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "does not exist (nothing created" in result.stdout
    assert list(tmp_path.iterdir()) == []
