"""`finetune chat` in a pseudo-terminal: a multi-turn conversation whose second prompt holds the first
answer (checked token by token), /system and /reset, and Ctrl-C stopping an answer without leaving."""

import json
import os
import pty
import select
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.formatting import chat_prompt_ids
from finetune.models.tokenizer import byte_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "run"
    result = CliRunner().invoke(app, ["train", "model=tiny", "method=lora", "task.num_pairs=2", "task.eval_limit=1",
                                      "trainer.max_steps=2", "trainer.merge=false", "logger=none", f"output_dir={path}",
                                      "-q"])
    assert result.exit_code == 0, result.output
    return path


class Terminal:
    """`finetune chat ...` on a pseudo-terminal, read until a prompt appears."""

    def __init__(self, *args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the chat, with the terminal as its stdin and stdout
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
            os.execve(sys.executable, [sys.executable, "-m", "finetune", "chat", *map(str, args)], env)
        self.seen, self.read_to = "", 0  # all output, and where the last text waited for ended

    def until(self, text: str, timeout: float = 120) -> str:
        """The output after the previous match up to the end of the next ``text`` (which may have come
        in the same read as that match)."""
        deadline, start = time.time() + timeout, self.read_to
        while text not in self.seen[start:]:
            assert time.time() < deadline, f"no {text!r} in {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:  # the chat has ended
                    break
        found = self.seen.find(text, start)
        self.read_to = found + len(text) if found >= 0 else len(self.seen)
        return self.seen[start:self.read_to]

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def say(self, *lines: str) -> None:
        """At each ``you>`` prompt, type the next line and Enter."""
        for line in lines:
            self.until("you> ")
            self.type(line + "\r")

    def close(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def test_a_two_turn_conversation_sends_the_first_answer_back(run, tmp_path):
    transcript = tmp_path / "chat.jsonl"
    term = Terminal(run, "--transcript", transcript, "--max-new-tokens", 8)
    term.say("hello", "and then?", "/system Answer briefly.", "/reset", "fresh start", "/exit")
    assert term.close() == 0
    turns = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert [t["turn"] for t in turns] == [1, 2, 3]
    first, second, third = turns
    tokenizer = byte_tokenizer()
    expected = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first["answer"]},
                {"role": "user", "content": "and then?"}]
    assert second["messages"] == expected
    assert second["prompt_ids"] == chat_prompt_ids(tokenizer, expected)  # the ids the model was given
    assert first["prompt_ids"] == chat_prompt_ids(tokenizer, expected[:1])
    assert third["messages"] == [{"role": "system", "content": "Answer briefly."},
                                 {"role": "user", "content": "fresh start"}]


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(run, tmp_path):
    transcript = tmp_path / "chat.jsonl"
    term = Terminal(run, "--transcript", transcript, "--max-new-tokens", 100000)
    term.say("talk for a long time")
    term.until("model> ")
    time.sleep(1.0)
    term.type("\x03")  # Ctrl-C: the terminal sends SIGINT
    term.until("[stopped]")
    term.say("/exit")
    assert term.close() == 0
    (turn,) = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert turn["stopped"] is True and 0 < len(turn["answer_ids"]) < 100000
