"""Text streamed as it is generated, and the timing summary dllama-run and its chat print after it."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

from dllama.cli.loading import LoadedModel
from dllama.runtime.conversation import Conversation
from dllama.runtime.sampler import Sampler, Sampling


@dataclass
class Timing:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0   # until the first generated token: the batched prefill
    generated_tokens: int = 0
    decode_steps: int = 0         # tokens after the first, each one forward pass
    decode_seconds: float = 0.0

    def summary(self) -> str:
        p_rate = self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0
        g_rate = self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0
        ms = 1000 * self.decode_seconds / self.decode_steps if self.decode_steps else 0.0
        return (f"prompt: {self.prompt_tokens} tokens, {p_rate:.2f} tokens/s | generated: {self.generated_tokens} "
                f"tokens, {g_rate:.2f} tokens/s, {ms:.1f} ms/token")


def timed_tokens(tokens: Iterator[int], prompt_tokens: Callable[[], int], timing: Timing) -> Iterator[int]:
    """Pass tokens through, charging the wait for the first one to the prompt (prefill)."""
    start = time.perf_counter()
    last = start
    for i, token in enumerate(tokens):
        now = time.perf_counter()
        if i == 0:
            timing.prompt_tokens += prompt_tokens()
            timing.prompt_seconds += now - start
        else:
            timing.decode_steps += 1
            timing.decode_seconds += now - last
        timing.generated_tokens += 1
        last = now
        yield token


def stream_text(loaded: LoadedModel, conversation: Conversation, prompt_ids: list[int], steps: int,
                sampling: Sampling, write: Callable[[str], None], timing: Timing, stop: Sequence[str] = (),
                cancel: Optional[Callable[[], bool]] = None, ignore_eos: bool = False) -> list[int]:
    """Generate up to `steps` tokens answering prompt_ids, writing their text as it comes (up to the first stop
    sequence, not included); returns their ids. `cancel()` is polled before every token (generate's);
    `conversation.stop_reason` says why it ended. `ignore_eos`: an end-of-sequence token does not stop it."""
    from dllama.runtime.generate import generate
    from dllama.runtime.serve.runner import StopScanner

    tok = loaded.tokenizer
    decoder = tok.stream_decoder()
    scanner = StopScanner(stop)
    out: list[int] = []
    tokens = generate(loaded.engine, prompt_ids, steps, eos_ids=() if ignore_eos else tok.eos_ids, cancel=cancel,
                      conversation=conversation, sampler=Sampler(sampling))

    def evaluated() -> int:  # known once generation has started
        return len(prompt_ids) - conversation.start_pos

    for token in timed_tokens(tokens, evaluated, timing):
        out.append(token)
        write(scanner.push(decoder.push(token)))
        if scanner.stopped:
            tokens.close()
            return out
    write(scanner.push(decoder.flush()))
    write(scanner.flush())
    return out


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
