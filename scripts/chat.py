"""Chat with a trained model: one answer with --prompt, or an interactive multi-turn session.

    python scripts/chat.py --model OUTPUT_DIR --prompt "Write 981 in words."     # the newest checkpoint, one answer
    python scripts/chat.py --model exported --system "You are terse."            # interactive
    python scripts/chat.py --model CKPT --prompt "Hi" --temperature 0.7 --seed 1 --max_new_tokens 64

--model is a checkpoint folder, its model folder, an output_dir (its newest complete checkpoint) or an export
(scripts/export.py), holding a whole model or a LoRA adapter (loaded onto its base with PEFT, unmerged; --base
when the base has moved). The tokenizer comes from that folder, the chat template from its template.json
(``native``, the tokenizer's own, when it records none; --template to choose), so prompts are rendered as in
training.

Answers are greedy unless --temperature is above 0, and stop at eos or the template's end-of-turn marker.
With --prompt the answer is printed to stdout and the script exits. Without it, each line read from stdin is
a user turn and the answer is printed; the history is kept, ``/reset`` clears it, ``/exit`` or end of input
quits. A line of what was loaded goes to stderr. Runs on a GPU when there is one (--device to choose).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

from sft.errors import UserError
from sft.cli import run_tool
from sft.export import (find_model_folder, load_model, load_template, load_tokenizer, model_source,
                        parameter_count)
from sft.generation import conversation, generate_answer, stop_rule


@dataclass
class ChatOptions:
    """Which model, and how to answer."""

    model: str
    """A checkpoint folder, its model folder, an output_dir (its newest complete checkpoint) or an export."""
    prompt: Optional[str] = None
    """Answer this one message and exit; without it, chat interactively on stdin."""
    system: Optional[str] = None
    """A system message opening the conversation."""
    max_new_tokens: int = 256
    """The most tokens an answer may have."""
    temperature: float = 0.0
    """0 answers greedily; above 0, answers are sampled at this temperature."""
    seed: int = 0
    """Seed of the sampling (with --temperature above 0)."""
    template: Optional[str] = None
    """The chat template (native, chatml, qwen2_5, qwen3, llama3, base, alpaca); default: the one the model was
    trained with (its template.json), else native."""
    base: Optional[str] = None
    """A LoRA adapter's base model folder, when it is no longer where adapter_config.json says."""
    cluster_name: Optional[str] = None
    """The model folder in the checkpoint, when it holds several (default: the only one)."""
    device: str = "auto"
    """auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:1, ..."""


def read_line(interactive: bool) -> Optional[str]:
    """The next line of input, None at its end (input() gives line editing at a terminal)."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line if line else None


COMMANDS = "/reset clears the history, /exit (or end of input) quits"


def chat_session(read: Callable[[], Optional[str]], write: Callable[[str], None],
                 respond: Callable[[list[dict]], str], system: Optional[str] = None) -> int:
    """Interactive chat: each line ``read`` gives (None at end of input) is a user turn, answered with
    ``respond(messages)`` (the history so far included) and written; ``/reset`` clears the history,
    ``/exit`` quits. Returns the number of turns answered."""
    history: list[dict] = []
    turns = 0
    while True:
        line = read()
        if line is None:
            return turns
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return turns
        if line == "/reset":
            history = []
            write("(history cleared)")
            continue
        if line.startswith("/") and " " not in line:
            write(f"(unknown command {line}: {COMMANDS})")
            continue
        answer = respond(conversation(line, history, system))
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
        turns += 1
        write(answer)


def main(options: ChatOptions) -> None:
    if options.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens: must be at least 1, got {options.max_new_tokens}")
    if options.temperature < 0:
        raise UserError(f"--temperature: must be 0 (greedy) or above, got {options.temperature}")
    source = model_source(find_model_folder(options.model, options.cluster_name, flag="--model"), options.base)
    tokenizer = load_tokenizer(source)
    template = load_template(source, tokenizer, options.template)

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if options.device == "auto" else options.device
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device {device}: not a device; auto, cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA GPU; use --device cpu (or auto)")
    model = load_model(source, merge=False, device=device)
    torch.manual_seed(options.seed)
    stops = stop_rule(tokenizer, template)
    print(f"loaded {source.describe()} | {parameter_count(model):,} parameters | template {template.name} | "
          f"{device} | {'greedy' if options.temperature == 0 else f'temperature {options.temperature}'}",
          file=sys.stderr)

    def respond(messages: list[dict]) -> str:
        return generate_answer(model, tokenizer, template, messages, options.max_new_tokens, options.temperature, stops)

    if options.prompt is not None:
        print(respond(conversation(options.prompt, system=options.system)))
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"type a message; {COMMANDS}", file=sys.stderr)
    try:
        chat_session(lambda: read_line(interactive), lambda text: print(text, flush=True), respond, options.system)
    except KeyboardInterrupt:  # Ctrl-C quits like /exit
        print(file=sys.stderr)


if __name__ == "__main__":
    run_tool(main, ChatOptions)
