"""`dllama-run chat`: a conversation with the model, typed at a terminal or read from a pipe.

At a terminal the prompt has line editing and history (prompt_toolkit); a pipe is read line by
line as before. Either way lines starting with `/` are commands (COMMANDS), the KV cache carries
the conversation from one turn to the next, and Ctrl-C during an answer stops only that answer.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from dllama.cli.edge import note, one_line
from dllama.cli.loading import LoadedModel
from dllama.cli.streaming import Timing, stream_text, write_stdout
from dllama.errors import DllamaError
from dllama.formats import atomic_output
from dllama.runtime.conversation import Conversation, PromptTooLong, StopReason, answer_room
from dllama.runtime.sampler import Sampling
from dllama.tokenizer.chat import ChatTemplateError

# what /help says about the keys (the start line names the essentials)
TERMINAL_KEYS = ("Alt-Enter or a line ending in \\ starts a new line | Up/Down: earlier lines | "
                 "Ctrl-C: stop the answer (its text so far stays in the conversation), or clear the line | "
                 "Ctrl-D or Ctrl-C on an empty line: quit")
PIPE_KEYS = "a line ending in \\ continues on the next; an empty line or the end of the input ends the chat"


@dataclass
class Chat:
    """The conversation so far and the KV cache that holds it."""

    loaded: LoadedModel
    steps: int
    sampling: Sampling
    system: Optional[str] = None
    keys: str = PIPE_KEYS  # what /help says about the keys
    stop: Sequence[str] = ()  # --stop: an answer ends before the first of these texts
    turns: list[dict] = field(default_factory=list)  # user and assistant messages, in order
    conversation: Conversation = field(init=False)

    def __post_init__(self) -> None:
        self.conversation = Conversation(self.loaded.engine.max_seq_len)

    def messages(self, system: Optional[str] = None) -> list[dict]:
        system = self.system if system is None else system
        return ([{"role": "system", "content": system}] if system else []) + self.turns

    def ask(self, text: str, write: Callable[[str], None] = write_stdout) -> None:
        """Answer `text`, streaming the answer; a prompt the KV cache cannot hold is refused, the chat goes on."""
        self.turns.append({"role": "user", "content": text})
        try:
            ids = self.loaded.tokenizer.encode_chat(self.messages())
            answer_room(len(ids), self.conversation.capacity)
        except PromptTooLong as e:
            self.turns.pop()
            note(f"{one_line(e)}; or /reset to start a new conversation")
            return
        timing = Timing()
        with ctrl_c_stops_the_answer() as pressed:
            answer = stream_text(self.loaded, self.conversation, ids, self.steps, self.sampling, write, timing,
                                 self.stop, cancel=pressed.is_set)
        write("\n")
        # a stopped answer is kept as it was shown: the next turn's prompt then shares the cache's tokens
        self.turns.append({"role": "assistant", "content": self._shown(self.loaded.tokenizer.decode(answer))})
        self._tell_why_it_stopped()
        note(f"{timing.summary()} | context: {len(self.conversation.cached)}/{self.conversation.capacity} tokens")

    def _shown(self, text: str) -> str:
        """The answer as shown: up to its first stop sequence."""
        return text[:min((i for i in (text.find(s) for s in self.stop if s) if i >= 0), default=len(text))]

    def _tell_why_it_stopped(self) -> None:
        reason = self.conversation.stop_reason
        if reason == StopReason.CANCELLED:
            note("stopped (Ctrl-C): the answer so far stays in the conversation")
        elif reason == StopReason.CONTEXT:
            note(f"the KV cache is full ({self.conversation.capacity} tokens): /reset starts a new conversation "
                 "(or raise --max-seq-len)")

    def reset(self, _: str = "") -> None:
        self.turns.clear()
        self.conversation.reset()
        kept = " (the system prompt stays)" if self.system else ""
        note(f"new conversation{kept} | context: 0/{self.conversation.capacity} tokens")

    def set_system(self, text: str) -> None:
        if not text:
            note(f"system: {self.system}" if self.system else "no system prompt: /system TEXT sets one")
            return
        try:
            self.loaded.tokenizer.render_chat(self.messages(system=text))
        except ChatTemplateError as e:
            note(f"system prompt not set: {one_line(e)}")
            return
        self.system = text
        note("system prompt set (the next answer reads the conversation again under it)")

    def save(self, path: str) -> None:
        if not path:
            note("/save needs a file name: /save chat.json")
            return
        target = Path(path).expanduser()
        text = json.dumps({"messages": self.messages()}, indent=2, ensure_ascii=False) + "\n"
        try:
            with atomic_output(target, fix="save into a folder that exists and is writable") as f:
                f.write(text.encode("utf-8"))
        except (OSError, DllamaError) as e:
            note(f"not saved: {one_line(e)}")
            return
        note(f"saved {len(self.messages())} messages to {target}")


@dataclass(frozen=True)
class Command:
    run: Callable[[Chat, str], None]
    usage: str
    help: str


def _help(chat: Chat, _: str) -> None:
    for name, command in COMMANDS.items():
        note(f"  {(name + ' ' + command.usage).strip():<14} {command.help}")
    note(f"  keys: {chat.keys}")


COMMANDS: dict[str, Command] = {
    "/reset": Command(Chat.reset, "", "forget the conversation and empty the KV cache (the system prompt stays)"),
    "/system": Command(Chat.set_system, "TEXT", "set the system prompt (without TEXT: show it)"),
    "/save": Command(Chat.save, "FILE", 'write the conversation as JSON: {"messages": [{"role", "content"}, ...]}'),
    "/help": Command(_help, "", "this list"),
}


def handle(chat: Chat, line: str) -> None:
    """One line of input: a command, or a message for the model."""
    if not line.startswith("/"):
        chat.ask(line)
        return
    name, *argument = line.split(maxsplit=1)
    command = COMMANDS.get(name)
    if command is None:
        note(f"unknown command {name}: /help lists the commands")
        return
    command.run(chat, argument[0].strip() if argument else "")


@contextmanager
def ctrl_c_stops_the_answer() -> Iterator[threading.Event]:
    """While an answer streams, Ctrl-C (SIGINT) only sets the event generation polls before every token, so
    the KV cache ends on a whole token, on every node of a cluster too."""
    pressed = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.set())
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


class TerminalInput:
    """Lines typed at a terminal: editing, this session's history, multi-line input."""

    start = "Alt-Enter: a new line | Ctrl-C: stop the answer | Ctrl-D: quit"
    keys = TERMINAL_KEYS

    def __init__(self) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import InMemoryHistory

        self.session = PromptSession(history=InMemoryHistory(), key_bindings=_key_bindings(),
                                     prompt_continuation="... ")

    def read(self) -> Optional[str]:
        """The next line ("" for an empty one); None when the user ends the chat."""
        try:
            return self.session.prompt("> ")
        except (EOFError, KeyboardInterrupt):
            return None


def _key_bindings():
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("enter")
    def _enter(event) -> None:
        buffer = event.current_buffer
        if buffer.document.is_cursor_at_the_end and buffer.text.endswith("\\"):
            buffer.delete_before_cursor(1)
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @keys.add("escape", "enter")
    def _new_line(event) -> None:
        event.current_buffer.insert_text("\n")

    @keys.add("c-c")
    def _clear_or_end(event) -> None:
        if event.current_buffer.text:
            event.current_buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt())

    return keys


class PipedInput:
    """Lines from a pipe or a file, as `input()` reads them (the prompt still printed, for transcripts)."""

    start = "an empty line or the end of the input ends the chat"
    keys = PIPE_KEYS

    def read(self) -> Optional[str]:
        """The next line, joined with the following ones while it ends in a backslash; None at an empty line or
        the end of the input."""
        try:
            line = input("> ")
        except EOFError:
            return None
        while line.endswith("\\"):
            try:
                more = input("... ")
            except EOFError:
                line = line[:-1]
                break
            line = line[:-1] + "\n" + more
        return line if line.strip() else None


def is_terminal() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def run_chat(loaded: LoadedModel, system: Optional[str], steps: int, sampling: Sampling,
             stop: Sequence[str] = ()) -> None:
    lines = TerminalInput() if is_terminal() else PipedInput()
    note(f"max_seq_len {loaded.engine.max_seq_len} (--max-seq-len) | {lines.start} | /help: commands and keys")
    chat = Chat(loaded, steps, sampling, system, lines.keys, tuple(stop))
    while (line := lines.read()) is not None:
        if line.strip():
            handle(chat, line)
