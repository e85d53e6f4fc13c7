"""`python -m pipeline.chat <model dir or run dir>`: talk to an ablated model in the terminal.

Each line you type is one user turn, rendered with the model's own chat template; the answer is
streamed as it is generated (greedy unless `--sample`). `/reset` forgets the conversation, `/quit`
(or end of input) leaves. `--compare` also answers with the original model, read from the ablate
artifact's manifest (where the ablate stage recorded the source directory) or from `--original <dir>`,
each model keeping its own conversation. Weights are loaded from safetensors only, and a model's own
code is never run unless `--trust-remote-code` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence, TextIO

from pipeline import artifacts
from pipeline.errors import PipelineError

HELP = "type a message; /reset forgets the conversation, /quit leaves"


def model_dir(path: Path) -> Path:
    """The model directory behind a model dir, a run folder (its `model` link or run.json) or an ablate artifact."""
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "run.json").is_file():
        stages = json.loads((path / "run.json").read_text(encoding="utf-8")).get("stages", {})
        if "ablate" in stages and (Path(stages["ablate"]["dir"]) / "model" / "config.json").is_file():
            return Path(stages["ablate"]["dir"]) / "model"
        raise PipelineError(f"{path}/run.json names no ablated model (the run did not include ablate); "
                            "run `python -m pipeline` with ablate in run.stages first")
    raise PipelineError(f"{path} is not a model directory (no config.json) nor a run folder (no run.json)")


def original_dir(model: Path) -> Path:
    """The source checkpoint the ablate stage copied, as its manifest recorded it."""
    manifest = artifacts.read_manifest(model.resolve().parent) or {}
    source = manifest.get("source", {}).get("dir")
    if not source or not (Path(source) / "config.json").is_file():
        raise PipelineError(f"--compare: the original model of {model} is not recorded or no longer exists "
                            f"({source or 'no ablate manifest beside it'}); pass --original <model dir>")
    return Path(source)


class Speaker:
    """One loaded model with its own conversation."""

    def __init__(self, name: str, path: Path, trust_remote_code: bool, device: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
            self.model = AutoModelForCausalLM.from_pretrained(
                str(path), use_safetensors=True, trust_remote_code=trust_remote_code, dtype="auto").to(device)
        except (OSError, ValueError) as error:
            raise PipelineError(f"cannot load {path}: {str(error).splitlines()[0]}") from error
        if not getattr(self.tokenizer, "chat_template", None):
            raise PipelineError(f"{path} has no chat template (chat_template.jinja or tokenizer_config.json)")
        self.model.eval()
        self.name, self.device, self.messages = name, device, []

    def answer(self, text: str, out: TextIO, max_new_tokens: int, sample: bool, temperature: float) -> str:
        import torch

        self.messages.append({"role": "user", "content": text})
        inputs = self.tokenizer.apply_chat_template(
            self.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(self.device)
        streamer = _Streamer(self.tokenizer, out)
        options = {"do_sample": True, "temperature": temperature} if sample else {"do_sample": False}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                                         pad_token_id=pad, **options)
        reply = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def _Streamer(tokenizer, out: TextIO):  # noqa: N802 (a class factory: transformers is imported late)
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def chat(speakers: Sequence[Speaker], lines: TextIO, out: TextIO, max_new_tokens: int, sample: bool,
         temperature: float) -> None:
    """Read turns from `lines` until /quit or end of input; stream each speaker's answer to `out`."""
    out.write(HELP + "\n")
    while True:
        out.write("> ")
        out.flush()
        line = lines.readline()
        if not line:  # end of input
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            return
        if text == "/reset":
            for speaker in speakers:
                speaker.messages.clear()
            out.write("(conversation reset)\n")
            continue
        for speaker in speakers:
            if len(speakers) > 1:
                out.write(f"[{speaker.name}] ")
            speaker.answer(text, out, max_new_tokens, sample, temperature)


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.chat", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="the ablated model directory, or a run folder (outputs/runs/<date>/<time>)")
    parser.add_argument("--compare", action="store_true", help="also answer with the original model")
    parser.add_argument("--original", type=Path, help="the original model directory (default: the one ablate recorded)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own Python code")
    args = parser.parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    try:
        if args.max_new_tokens < 1:
            raise PipelineError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
        if not args.path.exists():
            raise PipelineError(f"{args.path} does not exist; pass a model directory or a run folder")
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        ablated = model_dir(args.path)
        speakers = [Speaker("ablated", ablated, args.trust_remote_code, device)]
        if args.compare or args.original is not None:
            original = model_dir(args.original) if args.original is not None else original_dir(ablated)
            speakers.insert(0, Speaker("original", original, args.trust_remote_code, device))
        chat(speakers, stdin, stdout, args.max_new_tokens, args.sample, args.temperature)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
