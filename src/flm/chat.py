"""`flm chat`: a terminal conversation with streaming output and speed figures."""

from __future__ import annotations

import argparse
import time
from typing import TextIO

from .errors import FlmError
from .generate import SamplingConfig
from .tokenization.tokenizer import StreamDecoder

HELP = "commands: /reset (new conversation), /system TEXT (set the system message), /exit"


class ChatSession:
    def __init__(self, model, args: argparse.Namespace):
        self.model = model
        self.args = args
        self.system: str | None = args.system
        self.history: list[tuple[str, str]] = []

    def sampling(self) -> SamplingConfig:
        a = self.args
        greedy = a.temperature <= 0
        return SamplingConfig(max_length=a.max_length, do_sample=not greedy, top_p=a.top_p,
                              top_k=1 if greedy else a.top_k, temperature=a.temperature if not greedy else 1.0,
                              repeat_penalty=a.repeat_penalty, seed=a.seed)

    def answer(self, query: str, out: TextIO) -> str:
        prompt = self.model.get_prompt(query, self.history, self.system)
        ids = self.model.encode_prompt(prompt)
        decoder = StreamDecoder(self.model.tokenizer)
        start = time.perf_counter()
        first = None
        count = 0
        try:
            for token in self.model.generate_ids(ids, self.sampling()):
                if first is None:
                    first = time.perf_counter()
                count += 1
                out.write(decoder.push(token))
                out.flush()
        except KeyboardInterrupt:
            out.write(" [interrupted]")
        end = time.perf_counter()
        prefill = (first or end) - start
        decode = end - (first or end)
        out.write(f"\n[{len(ids)} prompt tokens in {prefill:.2f} s ({len(ids) / max(prefill, 1e-9):.0f} tok/s), "
                  f"{count} generated at {max(count - 1, 0) / max(decode, 1e-9):.1f} tok/s]\n")
        return decoder.text()

    def run(self, stdin: TextIO, out: TextIO) -> None:
        interactive = stdin.isatty()
        if interactive:
            out.write(HELP + "\n")
        while True:
            if interactive:
                out.write("> ")
                out.flush()
            try:
                line = stdin.readline()
            except KeyboardInterrupt:
                out.write("\n")
                continue
            if not line:
                return
            query = line.rstrip("\n")
            if not query.strip():
                continue
            if query.strip() == "/exit":
                return
            if query.strip() == "/reset":
                self.history = []
                out.write("[conversation reset]\n")
                continue
            if query.startswith("/system"):
                self.system = query[len("/system"):].strip() or None
                self.history = []
                out.write(f"[system message {'set' if self.system else 'cleared'}; conversation reset]\n")
                continue
            if query.startswith("/"):
                out.write(HELP + "\n")
                continue
            try:
                response = self.answer(query, out)
            except FlmError as exc:
                out.write(f"[error: {exc}]\n")
                continue
            self.history.append((query, response))
