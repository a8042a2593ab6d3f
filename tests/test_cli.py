"""The `flm` commands that print for people: chat (under a pipe), tokenize, prompt, templates, --help."""

import io
import re

import pytest

from flm import llm
from flm.cli import main
from flm.convert import ConvertOptions, convert

SPEED = re.compile(r"\[(\d+) prompt tokens in [\d.]+ s \(\d+ tok/s\), (\d+) generated at [\d.]+ tok/s\]")


@pytest.fixture(scope="module")
def chat_flm(tmp_path_factory, tiny_dir):
    path = tmp_path_factory.mktemp("cli") / "tiny-chat.flm"
    convert(tiny_dir, path, ConvertOptions(dtype="float16", template="llama2-chat", progress=False))
    return path


def test_chat_under_a_pipe(chat_flm, monkeypatch, capsys):
    """Answers stream with speed lines; /system sets the system message and restarts the
    conversation, /reset forgets it, an unknown command shows the help, /exit stops reading."""
    prompts = []
    original = llm.model.get_prompt

    def recording(self, query, history=None, system=None):
        prompts.append((query, list(history or []), system))
        return original(self, query, history, system)

    monkeypatch.setattr(llm.model, "get_prompt", recording)
    lines = ["hello", "again", "/system Be brief.", "third", "/reset", "fourth", "/bogus", "/exit", "never read"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", str(chat_flm), "--max-length", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    speeds = SPEED.findall(out)
    assert len(speeds) == 4 and all(int(generated) <= 3 for _, generated in speeds)
    assert "[system message set; conversation reset]" in out and "[conversation reset]" in out
    assert "commands: /reset" in out  # for /bogus; a pipe gets no greeting or "> " prompts
    assert out.count("commands: /reset") == 1 and "> " not in out
    assert [(q, len(h), s) for q, h, s in prompts] == [
        ("hello", 0, None), ("again", 1, None), ("third", 0, "Be brief."), ("fourth", 0, "Be brief.")]
    assert prompts[1][1][0][0] == "hello"


def test_threads_option_sets_the_cpu_threads(chat_flm, monkeypatch, capsys):
    """-t/--threads (fastllm's -t) reaches torch before the model runs; 0 is refused by argparse."""
    import torch

    before = torch.get_num_threads()
    seen = []
    original = llm.model.generate_ids

    def recording(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(llm.model, "generate_ids", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    try:
        assert main(["chat", str(chat_flm), "--max-length", "2", "-t", "1"]) == 0
        assert seen == [1]
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["bench", str(chat_flm), "--threads", "0"])
    assert "0 threads: give 1 or more" in capsys.readouterr().err


def test_tokenize_command(chat_flm, capsys):
    assert main(["tokenize", str(chat_flm), "Hello world"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "2 tokens"
    assert out[1].split()[0] == "15043" and "b' Hello'" in out[1]
    assert out[2].split()[0] == "3186" and "b' world'" in out[2]


def test_prompt_command(chat_flm, capsys):
    assert main(["prompt", str(chat_flm), "What now?", "--system", "Be kind."]) == 0
    out = capsys.readouterr().out
    assert "template: the file's prompt strings" in out
    assert "Be kind." in out and "What now?" in out and "[INST]" in out
    ids = [int(x) for x in re.search(r"ids \(\d+\): \[(.*)\]", out).group(1).split(", ")]
    assert ids[0] == 1  # llama2-chat starts with <s>


def test_templates_command(capsys):
    assert main(["templates"]) == 0
    out = capsys.readouterr().out
    assert "llama2-chat:" in out and "user_role" in out and "'[INST] '" in out


def test_environment_switches_are_read_in_one_place_and_listed_in_help(capsys):
    """No module but flm.settings reads the environment for an FLM_* switch, every switch the
    sources name is one settings knows, and `flm --help` lists each."""
    from pathlib import Path

    import flm
    from flm.settings import SWITCHES

    named, readers = set(), []
    for source in Path(flm.__file__).parent.rglob("*.py"):
        text = source.read_text()
        named |= set(re.findall(r"setting\(\"(FLM_[A-Z_]+)\"\)", text))
        if source.name != "settings.py" and re.search(r"environ(\.get\(|\[)\s*[\"']FLM_", text):
            readers.append(source.name)
    assert not readers, f"read FLM_* outside settings.py: {readers}"
    assert {"FLM_CACHE", "FLM_KERNELS", "FLM_BACKEND"} <= named <= set(SWITCHES)
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert not [name for name in SWITCHES if name not in out]


def test_version_names_flm_torch_and_the_kernel_build_without_compiling(capsys, monkeypatch):
    import torch

    import flm
    import flm.kernels.native as native

    monkeypatch.setattr(native, "native", lambda: pytest.fail("--version must not build the kernels"))
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert f"flm {flm.__version__}" in out and f"torch {torch.__version__}" in out and "CPU kernels: " in out
    monkeypatch.setenv("FLM_KERNELS", "reference")
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "CPU kernels: none (FLM_KERNELS=reference)" in capsys.readouterr().out


def test_setup_builds_the_kernels_or_says_there_are_none(capsys, monkeypatch):
    from flm.kernels.native import kernel_build, native

    if isinstance(kernel_build(), str):
        pytest.skip(f"no SIMD kernels for this machine ({kernel_build()})")
    assert native() is not None, "the kernels this CPU allows did not build"
    assert main(["setup"]) == 0
    assert f"kernels are built in {kernel_build().directory}" in capsys.readouterr().out
    monkeypatch.setenv("FLM_KERNELS", "reference")
    assert main(["setup"]) == 0
    assert "no CPU kernels to build (FLM_KERNELS=reference)" in capsys.readouterr().out
