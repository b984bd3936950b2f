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
        help="question asked when the stream reaches SECONDS, or at the end without it (repeatable)",
    )
    parser.add_argument("--system", default=None, help="system prompt fed before the stream")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--load-state", default=None, help="resume from a folder written by --save-state")
    parser.add_argument("--save-state", default=None, help="write the stream's memory here at the end")
    parser.add_argument("--overwrite", action="store_true", help="let --save-state replace an existing folder")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
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
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .streaming import StreamingSession, iter_video_frames

    timed, final = _parse_questions(args.ask)
    if args.video is None and args.load_state is None:
        raise ValueError("Give --video, --load-state, or both.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(args.model)

    def emit(event: dict) -> None:
        if args.json:
            print(json.dumps(event), flush=True)
        elif event["event"] == "answer":
            print(f"[{event['seconds']:.1f}s] Q: {event['question']}\n[{event['seconds']:.1f}s] A: {event['answer']}", flush=True)
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

    seconds = 0.0
    if args.video:
        # Frame by frame: the session feeds every complete chunk, and `ask` also sees the frames still waiting.
        for frame, seconds in iter_video_frames(args.video, fps=session.fps, max_frames=args.max_frames):
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
    """Standalone entry (`python -m infinitevl_hf.streaming_cli`); the `infinitevl` CLI wires `stream` to the same functions."""
    parser = add_stream_arguments(argparse.ArgumentParser(prog="infinitevl stream", description=__doc__.splitlines()[0]))
    return run_stream(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["add_stream_arguments", "run_stream", "main"]
