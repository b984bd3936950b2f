"""The `infinitevl` command. Each subcommand is one registered function calling library code.

    infinitevl                      main job on a tiny random-weight model: image Q&A, then a video stream
                                    compared with a full-attention model (cache bytes and ms per frame)
    infinitevl --model PATH_OR_ID   the same on a real checkpoint
    infinitevl generate PROMPT [--image PATH]
    infinitevl export MODEL OUTPUT  a self-contained trust_remote_code folder
    infinitevl convert ...          Qwen2.5-VL teacher -> InfiniteVL weights
    infinitevl stream MODEL --video FILE --ask 10:QUESTION   a constant-memory video stream with questions
    infinitevl distill --teacher T --student S --data D --stage 1|2 --out DIR
    infinitevl sft --model M --data D --out DIR [--lora-r 16]
    infinitevl env                  versions, CUDA, fla kernels
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .cli_inputs import check_device, check_infinitevl, is_random_tiny, quiet_loading, resolve_checkpoint
from .conversion.cli import add_convert_arguments, run_convert
from .streaming_cli import add_stream_arguments, run_stream
from .training.cli import add_distill_arguments, add_sft_arguments, run_distill, run_sft

COMMANDS = {}
RANDOM_WEIGHTS_NOTE = ("Note: the default model is a tiny checkpoint with RANDOM weights, written to a temporary folder: "
                       "its text is meaningless. The memory and timing comparison is the point; pass --model for real answers.")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit status 2
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def command(name: str, help: str):
    """Register `function(args) -> result` as subcommand `name`; `function.arguments(parser)` adds its flags."""
    def register(function):
        COMMANDS[name] = (function, help)
        return function
    return register


def _model_arguments(parser, default_help: str):
    parser.add_argument("--model", metavar="PATH_OR_ID", help=f"checkpoint folder or Hub id ({default_help})")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _device(args) -> str:
    return check_device(args.device)


def _resolve_model(args, workdir: str):
    """The checkpoint to use: `--model` (checked to be an InfiniteVL checkpoint with readable weights), or a freshly
    written tiny random-weight one (with a notice saying where it is)."""
    if args.model is None:
        from .tiny import tiny_checkpoint

        print(RANDOM_WEIGHTS_NOTE)
        path = tiny_checkpoint(Path(workdir) / "tiny-infinitevl")
        print(f"Tiny checkpoint: {path} (removed when the command ends)")
        return path
    model = resolve_checkpoint(args.model)
    check_infinitevl(model)
    return model


def _show_answer(text: str, model) -> str:
    """An answer as printed: a random-weight model's text is shown with repr (it may hold any character) and a note."""
    if model is None or is_random_tiny(str(model)):
        return f"{text!r}  (random weights: the text is meaningless)"
    return text


def _check_image(path) -> Path:
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {str(path)!r}")
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {str(path)!r}: {error}") from error
    return path


def main_job_arguments(parser):
    _model_arguments(parser, "default: a tiny random-weight model")
    parser.add_argument("--frames", type=int, default=40, help="number of synthetic video frames to stream (default 40)")
    parser.add_argument("--image", help="image to ask about (default: the bundled demo image)")
    parser.add_argument("--no-compare", action="store_true", help="skip the full-attention comparison model")
    parser.add_argument("--plot", default="infinitevl-stream.png", metavar="PNG",
                        help="where to plot cache bytes and ms per frame (default ./infinitevl-stream.png; needs matplotlib)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (model loading and writing included)")


def main_job(args):
    """Image Q&A, then stream frames and compare cache memory with a full-attention model. Returns a DemoResult."""
    from .demo import run_demo

    image = _check_image(args.image) if args.image else None
    if args.frames < 1:
        raise ValueError(f"--frames must be at least 1, got {args.frames}")
    device = _device(args)
    with tempfile.TemporaryDirectory(prefix="infinitevl-") as workdir, quiet_loading(args.quiet):
        model = _resolve_model(args, workdir)
        return run_demo(model, frames=args.frames, image=image, teacher=not args.no_compare,
                        plot_path=None if args.no_plot else args.plot, device=device, progress=not args.quiet)


@command("generate", help="answer a prompt, optionally about an image")
def generate(args):
    from .demo import generate_text, load

    image = _check_image(args.image) if args.image else None
    device = _device(args)
    with tempfile.TemporaryDirectory(prefix="infinitevl-") as workdir:
        path = _resolve_model(args, workdir)
        model, processor = load(path, device=device)
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": args.prompt}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        text = generate_text(model, processor, prompt, images=[image] if image else None,
                             max_new_tokens=args.max_new_tokens)
        print(_show_answer(text, None if args.model is None else path))
    return text


def _generate_arguments(parser):
    parser.add_argument("prompt", help="the question or instruction")
    parser.add_argument("--image", help="an image file the prompt is about")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    _model_arguments(parser, "default: a tiny random-weight model")


generate.arguments = _generate_arguments


@command("export", help="write a self-contained trust_remote_code checkpoint folder")
def export(args):
    from .export import export_checkpoint

    dropped: list[str] = []
    out = export_checkpoint(args.model, args.output, overwrite=args.overwrite, dropped=dropped)
    for item in dropped:
        print(f"left out (not infinitevl-hf code, would run under trust_remote_code): {item}")
    print(f"wrote {out}: loads with from_pretrained(..., trust_remote_code=True) without infinitevl-hf installed")
    return out


def _export_arguments(parser):
    parser.add_argument("model", help="checkpoint folder to export")
    parser.add_argument("output", help="output folder (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export or checkpoint written by infinitevl-hf (never any other folder)")


export.arguments = _export_arguments


@command("env", help="print versions, CUDA and fast-kernel availability")
def env(args):
    import platform

    import torch
    import transformers

    from . import __version__
    from .modeling.ops.gated_delta_rule.cuda import load_fla_gated_delta_rule

    info = {
        "infinitevl-hf": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda devices"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    kernels, reason = load_fla_gated_delta_rule()
    info["fla kernels"] = "importable" if kernels is not None else f"unavailable ({reason})"
    from .modeling.ops.dispatch import triton_available

    if not torch.cuda.is_available():
        info["fused decode"] = "unavailable: no CUDA device (generate decodes on the module path; the fused step needs CUDA)"
    elif not triton_available():
        info["fused decode"] = "unavailable: no Triton (static-cache generate captures the module path)"
    else:
        info["fused decode"] = "available: fused step over the Triton kernels (generate decodes through its CUDA graph)"
    for optional in ("matplotlib", "av", "torchvision"):
        try:
            module = __import__(optional)
            info[optional] = getattr(module, "__version__", "installed")
        except ImportError:
            info[optional] = "not installed"
    for key, value in info.items():
        print(f"{key + ':':<16} {value}")
    return info


env.arguments = lambda parser: None

def _library_command(name: str, help_text: str, add_arguments, run_function) -> None:
    """Register a subcommand whose flags and body live next to the library code it drives."""
    def function(args):
        status = run_function(args)
        if status:
            raise SystemExit(status)
        return status

    function.__doc__ = help_text
    function.arguments = add_arguments
    COMMANDS[name] = (function, help_text)


_library_command("convert", "convert a Qwen2.5-VL teacher checkpoint into InfiniteVL weights", add_convert_arguments, run_convert)
_library_command("stream", "stream a video through a constant-memory session and ask questions at any time",
                 add_stream_arguments, run_stream)
_library_command("distill", "distil a converted student from its Qwen2.5-VL teacher (stage 1: layer-wise, 2: logits)",
                 add_distill_arguments, run_distill)
_library_command("sft", "supervised fine-tuning on image-text conversations (full or LoRA)", add_sft_arguments, run_sft)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="infinitevl",
        description="InfiniteVL: a vision-language model with constant memory (sliding-window attention + Gated DeltaNet). "
        "Without a subcommand, runs the main job: answers a question about an image, then streams video frames one "
        "call at a time and prints cache memory and time per frame against a full-attention Qwen2.5-VL of the same shape.",
        epilog="Example: infinitevl --frames 40   |   infinitevl generate 'Describe it.' --image photo.jpg --model hustvl/InfiniteVL",
    )
    main_job_arguments(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (function, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=(function.__doc__ or help_text).strip())
        function.arguments(sub)
    return parser


def run(argv=None):
    """Parse `argv` and run the command; returns its result (exceptions propagate). `main` is the console entry."""
    args = build_parser().parse_args(argv)
    if args.command is None:
        return main_job(args)
    return COMMANDS[args.command][0](args)


EXPECTED_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, ValueError, ImportError, OSError)


def _expected_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError  # a corrupt file found while loading

    return (*EXPECTED_ERRORS, SafetensorError)


def error_line(error: BaseException) -> str:
    """The one line printed for an expected error."""
    import errno

    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" while writing {error.filename}" if error.filename else ""
        return f"no space left on device{where}: free some space and run again"
    return " ".join(str(error).split()) or type(error).__name__


def main(argv=None) -> int:
    """Console entry point: runs the command; expected errors print one `error: ...` line and return 2."""
    try:
        run(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except _expected_errors() as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
