"""`msa chat`: ask question after question over one loaded model and bank.

Line editing and history come from readline (history kept in $MSA_HOME/chat_history). Ctrl-C stops the answer
being written and keeps the session; at the prompt it clears the line, as in a shell. Ctrl-D or :quit leaves.
Each question is answered on its own, from memory: the session carries settings, not conversation.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from . import settings
from .engine import Engine
from .errors import MsaError
from .qa.answer import quote_lines, source_line
from .qa.ask import Answer, Options, TextStream, ask

HELP = """commands:
  :sources   the sources of the last answer, with the text the model read
  :k N       documents to read per hop (now {k})
  :hops N    Memory Interleave's hop budget (now {hops})
  :trace     show or hide each hop's routing (now {trace})
  :quit      leave (or Ctrl-D)"""


class Session:
    def __init__(self, engine: Engine, opts: Options, out=sys.stdout):
        self.engine, self.opts, self.out = engine, opts, out
        self.trace = False
        self.last: Answer | None = None

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def handle(self, line: str) -> bool:
        """One line of input; False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if line.startswith(":"):
            return self.command(line[1:].split())
        self.answer(line)
        return True

    def command(self, words: list[str]) -> bool:
        name, args = (words[0], words[1:]) if words else ("help", [])
        if name in ("quit", "q", "exit"):
            return False
        if name in ("k", "hops") and len(args) == 1 and args[0].isdigit() and int(args[0]) >= 1:
            self.opts = replace(self.opts, **{"top_k" if name == "k" else "hops": int(args[0])})
            self.say(f"{name} = {args[0]}")
        elif name == "sources":
            self.show_sources()
        elif name == "trace":
            self.trace = not self.trace
            self.say(f"trace {'on' if self.trace else 'off'}")
        else:
            self.say(HELP.format(k=self.opts.top_k, hops=self.opts.hops, trace="on" if self.trace else "off"))
        return True

    def answer(self, question: str) -> None:
        stream = TextStream(self.engine.model.tokenizer, lambda text: (self.out.write(text), self.out.flush()),
                            self.opts.long)
        try:
            a = ask(self.engine, question, self.opts, stream)
        except KeyboardInterrupt:
            self.say("\n(stopped)")
            return
        except MsaError as e:
            self.say(f"msa: {e}")
            return
        self.last = a
        self.say(a.text if a.abstained else "")
        if self.trace:
            for n, hop in enumerate(a.retrieval.hops, 1):
                best = "-" if hop.best is None else f"{hop.best:.2f}"
                self.say(f"  hop {n}: routed on {len(hop.routing_text.split())} words, best {best}, "
                         f"read {len(hop.selected)}")
        for s in a.sources():
            self.say(source_line(s))

    def show_sources(self) -> None:
        if self.last is None or not self.last.sources():
            self.say("no sources yet")
            return
        evidence = [e.to_json() for e in self.last.evidence]
        for s, i in zip(self.last.sources(), self.last.read):
            self.say(source_line(s))
            # The lines that carry the evidence; the passage's opening when it was read whole.
            opening = "    " + " ".join(self.last.retrieval.hits[i].document.text.split())[:400]
            for line in quote_lines(s, evidence) or [opening]:
                self.say(line)


def run(engine: Engine, opts: Options) -> None:
    import readline
    import signal

    # Ctrl-C must stop an answer even when msa was started with SIGINT ignored (as a shell's background job is).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    history = settings.msa_home() / "chat_history"
    try:
        readline.read_history_file(history)
    except OSError:
        pass   # the first session
    session = Session(engine, opts)
    session.say(f"msa chat: {engine.bank.stats()['documents']:,} documents in {engine.bank.path}. "
                f":help lists commands, Ctrl-D leaves.")
    try:
        while True:
            try:
                line = input("> ")
            except KeyboardInterrupt:   # at the prompt: drop the line, as a shell does
                session.say()
                continue
            except EOFError:
                session.say()
                break
            if not session.handle(line):
                break
    finally:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.set_history_length(1000)
            readline.write_history_file(history)
        except OSError:
            pass   # history is a convenience; never fail the session for it
