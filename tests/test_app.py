"""app.py and the CLI at the edges: clear messages and exit code 2 for what a user can fix."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args, stdin: str = "", timeout: int = 300):
    return subprocess.run([sys.executable, *args], check=False, cwd=ROOT, env=ENV, input=stdin, text=True,
                          capture_output=True, timeout=timeout)


def test_corrupted_database_is_reported_and_left_untouched(tmp_path):
    db = tmp_path / "personalign.db"
    db.write_bytes(b"this is not a database at all" * 100)
    before = db.read_bytes()
    result = run("app.py", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "error:" in result.stderr and str(db) in result.stderr
    assert db.read_bytes() == before


def test_four_bit_without_a_gpu_is_a_clear_error(tmp_path):
    result = run("app.py", "--data-dir", str(tmp_path), "--quantize", "4bit", "--device", "cpu")
    assert result.returncode == 2 and "CUDA" in result.stderr


def test_unknown_model_is_a_clear_error(tmp_path):
    result = run("app.py", "--data-dir", str(tmp_path), "--model", "no-such-org/no-such-model")
    assert result.returncode == 2 and "no-such-org/no-such-model" in result.stderr


def test_auth_without_users_refuses_to_start(tmp_path):
    result = run("app.py", "--data-dir", str(tmp_path), "--auth")
    assert result.returncode == 2 and "user add" in result.stderr


@pytest.mark.slow
def test_info_reports_the_embedded_model(tmp_path):
    result = run("-m", "personalign", "info", "--data-dir", str(tmp_path), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "SmolLM2" in result.stdout and str(tmp_path) in result.stdout


@pytest.mark.slow
def test_terminal_chat_with_a_persona_file(tmp_path):
    persona = tmp_path / "me.json"
    persona.write_text('{"profile": "Young, Concise communication style"}')
    result = run("-m", "personalign", "chat", "--persona", str(persona), "--mode", "pba", "--temperature", "0",
                 "--max-new-tokens", "16", "--device", "cpu", stdin="What is 2 + 2?\n\n")
    assert result.returncode == 0, result.stderr
    assert "bot> " in result.stdout and len(result.stdout.split("bot> ")[1].strip()) > 0


def test_terminal_chat_on_a_streaming_memory(tmp_path):
    result = run("-m", "personalign", "chat", "--memory", "streaming-dialogue", "--temperature", "0",
                 "--max-new-tokens", "8", "--device", "cpu", stdin="My name is Ada.\nWhat is my name?\n\n")
    assert result.returncode == 0, result.stderr
    assert "streaming-dialogue memory" in result.stdout and result.stdout.count("bot> ") == 2
    # The meter after each turn: the second holds more than the first.
    cached = [int(line.split("memory: ")[1].split(" cached")[0].replace(",", ""))
              for line in result.stderr.splitlines() if "memory: " in line]
    assert len(cached) == 2 and 0 < cached[0] < cached[1]


def test_terminal_chat_guidance_needs_dense_memory():
    result = run("-m", "personalign", "chat", "--memory", "streaming-llm", "--persona-strength", "1")
    assert result.returncode == 2 and "needs --memory dense" in result.stderr


def test_user_add_validates_and_creates(tmp_path):
    bad = run("-m", "personalign", "user", "add", "alice", "--password-stdin", "--data-dir", str(tmp_path),
              stdin="short\n")
    assert bad.returncode == 2 and "error:" in bad.stderr
    good = run("-m", "personalign", "user", "add", "alice", "--password-stdin", "--data-dir", str(tmp_path),
               stdin="long enough password\n")
    assert good.returncode == 0 and "created" in good.stdout
