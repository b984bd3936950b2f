"""`infinitevl stream`: feed a video file or URL through a `StreamingSession` and answer questions along the way.

```
infinitevl stream MODEL --video clip.mp4 --fps 2 --ask 10:"What is happening?" --ask "Summarise the video."
```
`--ask SECONDS:QUESTION` is asked once the stream passes that time; `--ask QUESTION` at the end.
`--load-state`/`--save-state` resume a stream in another process. Output: one line per event
(`--json` for JSON lines).
"""

from __future__ import annotations

import argparse
import json


def add_stream_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `stream` subcommand's arguments to `parser`."""
    parser.add_argument("model", help="checkpoint folder or Hub id of an InfiniteVL model")
    parser.add_argument("--video", help="video file or http(s)/rtsp URL, decoded with PyAV")
    parser.add_argument("--fps", type=float, default=None,
                        help="frames per second sampled from the video (default 2, or the saved state's)")
    parser.add_argument("--frames-per-chunk", type=int, default=None,
                        help="frames per model call, a multiple of 2 (default 2, or the saved state's)")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    parser.add_argument("--max-pixels", type=int, default=None, help="upper bound on pixels per frame")
    parser.add_argument(
        "--ask", action="append", default=[], metavar="[SECONDS:]QUESTION",
        help="question asked when the stream's clock reaches SECONDS (a resumed stream continues its clock), "
        "or at the end without it (repeatable)",
    )
    parser.add_argument("--system", default=None, help="system prompt fed before the stream")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--load-state", default=None, help="resume from a folder written by --save-state")
    parser.add_argument("--save-state", default=None, help="write the stream's memory here at the end")
    parser.add_argument("--overwrite", action="store_true", help="let --save-state replace an existing folder")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (model loading and video feeding)")
    return parser


def _parse_questions(items: list[str]) -> tuple[list[tuple[float, str]], list[str]]:
    timed, final = [], []
    for item in items:
        head, sep, tail = item.partition(":")
        try:
            seconds = float(head) if sep else None
        except ValueError:
            seconds = None
        if seconds is not None and tail.strip():
            timed.append((seconds, tail.strip()))
        elif item.strip():
            final.append(item.strip())
        else:
            raise ValueError("--ask needs a question.")
    return sorted(timed), final


def run_stream(args: argparse.Namespace) -> int:
    """Run `infinitevl stream` with parsed `args`; returns the exit code."""
    import sys

    import torch
    from tqdm.auto import tqdm

    from .cli_inputs import check_device, check_infinitevl, is_random_tiny, quiet_loading, resolve_checkpoint
    from .demo import load
    from .stream_state import check_save_target
    from .streaming import StreamingSession, iter_video_frames

    timed, final = _parse_questions(args.ask)
    if args.video is None and args.load_state is None:
        raise ValueError("Give --video, --load-state, or both.")
    # Everything that can be refused is refused before the model loads and the video is decoded.
    model_path = resolve_checkpoint(args.model)
    device = check_device(args.device)
    if args.load_state:
        resolve_checkpoint(args.load_state, what="--load-state")
    if args.save_state:
        check_save_target(args.save_state, args.overwrite, flag="--overwrite")
    check_infinitevl(model_path)
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    with quiet_loading(args.quiet):
        model, processor = load(model_path, device=device, dtype=dtype)

    random_weights = is_random_tiny(model_path)

    def emit(event: dict) -> None:
        if args.json:
            print(json.dumps({**event, "random_weights": True} if random_weights and event["event"] == "answer" else event),
                  flush=True)
        elif event["event"] == "answer":
            text = f"{event['answer']!r}  (random weights: the text is meaningless)" if random_weights else event["answer"]
            print(f"[{event['seconds']:.1f}s] Q: {event['question']}\n[{event['seconds']:.1f}s] A: {text}", flush=True)
        else:
            print(" ".join(f"{k}={v}" for k, v in event.items()), flush=True)

    # Only the flags given on the command line override a loaded state's own settings.
    given = dict(frames_per_chunk=args.frames_per_chunk, fps=args.fps, max_pixels=args.max_pixels)
    settings = {key: value for key, value in given.items() if value is not None}
    if args.load_state:
        session = StreamingSession.load(args.load_state, model, processor, **settings)
    else:
        session = StreamingSession(model, processor, system_prompt=args.system, **settings)

    def answer(question: str, seconds: float) -> None:
        text = session.ask(question, max_new_tokens=args.max_new_tokens)
        emit({"event": "answer", "seconds": seconds, "question": question, "answer": text, **session.stats.as_dict()})

    # A resumed stream keeps its clock: the new video's frames (and --ask times) continue after the saved ones.
    start = session.clock
    seconds = start
    if args.video:
        # Frame by frame: the session feeds every complete chunk, and `ask` also sees the frames still waiting.
        frames = iter_video_frames(args.video, fps=session.fps, max_frames=args.max_frames)
        bar = tqdm(frames, desc="feeding video", unit="frame", total=args.max_frames, file=sys.stderr,
                   disable=args.quiet)
        for frame, video_seconds in bar:
            seconds = start + video_seconds
            session.add_frames([frame], [seconds])
            while timed and timed[0][0] <= seconds:
                answer(timed.pop(0)[1], seconds)
        emit({"event": "stream_end", "seconds": round(seconds, 3), **session.stats.as_dict()})
    for _, question in timed:
        answer(question, seconds)
    for question in final:
        answer(question, seconds)
    if args.save_state:
        path = session.save(args.save_state, overwrite=args.overwrite)
        emit({"event": "saved", "path": str(path)})
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m infinitevl_hf.streaming_cli`): `infinitevl stream ...`, with the same one-line
    errors and exit codes."""
    import sys

    from .cli import main as cli_main

    return cli_main(["stream", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["add_stream_arguments", "run_stream", "main"]
