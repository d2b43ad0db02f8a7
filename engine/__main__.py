"""Command line: ``python -m engine generate --prompt TEXT`` and ``python -m engine chat``.

``python -m engine generate --model <model> --prompt hi`` is the one-line answer to "does my model load?": it
fetches the model as a deployment would (Hub id, object store, directory), loads it and answers, or prints why
it cannot.
"""

from __future__ import annotations

import argparse
import sys
import time


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (default), a Hugging Face Hub id (org/name[@revision]), s3://... or gs://..., "
        "a HF directory, a .gguf file or dummy:<config>",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="tokens per request (prompt + output)")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


class ModelLoadError(Exception):
    """The engine could not be built for the model; the message says why."""


def _build_engine(args):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.weights import WeightLoadError

    try:
        config = EngineConfig.from_dict(
            {
                "model": args.model,
                "device": args.device,
                "dtype": args.dtype,
                "max_seq_len": args.max_seq_len,
                "max_batch_size": 1,
            }
        )
        return LLMEngine(config)
    except (ValueError, OSError, WeightLoadError) as exc:
        raise ModelLoadError(str(exc)) from exc


def _params(args):
    from engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )


def _chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def _stream(engine, request_id: str, prompt, params, out=sys.stdout):
    """Run one request, printing text as it is released; returns its final output."""
    engine.add_request(request_id, prompt, params)
    final = None
    while final is None:
        for output in engine.step():
            if output.request_id != request_id:
                continue
            out.write(output.new_text)
            out.flush()
            if output.finished:
                final = output
    out.write("\n")
    return final


def cmd_generate(args) -> int:
    params = _params(args)  # bad values fail before the model loads
    engine = _build_engine(args)
    prompt = args.prompt if args.raw else _chat_prompt(engine.tokenizer, [{"role": "user", "content": args.prompt}])
    start = time.perf_counter()
    final = _stream(engine, "cli", prompt, params)
    elapsed_s = time.perf_counter() - start
    if args.verbose:
        print(
            f"[{final.num_prompt_tokens} prompt + {final.num_output_tokens} output tokens in {elapsed_s:.2f} s, "
            f"finish_reason={final.finish_reason}]",
            file=sys.stderr,
        )
    engine.shutdown()
    return 0


def cmd_chat(args) -> int:
    params = _params(args)
    engine = _build_engine(args)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("Chat with the model. /reset clears the history, /exit (or Ctrl-D) quits.", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        from engine.errors import InvalidRequestError

        try:
            final = _stream(engine, f"chat-{turn}", _chat_prompt(engine.tokenizer, messages), params)
        except InvalidRequestError as exc:
            print(f"error: {exc}", file=sys.stderr)
            messages.pop()
            continue
        turn += 1
        messages.append({"role": "assistant", "content": final.text})
    engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description="Run the vAttention engine locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete one prompt and print the answer")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("-v", "--verbose", action="store_true", help="print token counts and timing to stderr")
    _add_engine_args(gen)
    chat = sub.add_parser("chat", help="interactive chat REPL")
    chat.add_argument("--system", default=None, help="system prompt")
    _add_engine_args(chat)
    args = parser.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    from engine.errors import InvalidRequestError

    try:
        return cmd_generate(args) if args.command == "generate" else cmd_chat(args)
    except InvalidRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
