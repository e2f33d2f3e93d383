"""`python -m ivl.bench {layers,gemv,ring,fp8,convert,data,inference,stream,vision,profile,train,host,serve,
release}`: the benchmarks behind docs/benchmarks.md."""

import argparse

from ivl.bench import (
    convert,
    data,
    fp8,
    gemv,
    host,
    inference,
    layers,
    profile,
    release,
    ring,
    serve,
    stream,
    train,
    vision,
)
from ivl.cuda_allocator import expandable_segments


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ivl.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    layers.add_arguments(sub.add_parser("layers", help=layers.__doc__.splitlines()[0]))
    gemv.add_arguments(sub.add_parser("gemv", help=gemv.__doc__.splitlines()[0]))
    ring.add_arguments(sub.add_parser("ring", help=ring.__doc__.splitlines()[0]))
    fp8.add_arguments(sub.add_parser("fp8", help=fp8.__doc__.splitlines()[0]))
    convert.add_arguments(sub.add_parser("convert", help=convert.__doc__.splitlines()[0]))
    data.add_arguments(sub.add_parser("data", help=data.__doc__.splitlines()[0]))
    inference.add_arguments(sub.add_parser("inference", help=inference.__doc__.splitlines()[0]))
    stream.add_arguments(sub.add_parser("stream", help=stream.__doc__.splitlines()[0]))
    vision.add_arguments(sub.add_parser("vision", help=vision.__doc__.splitlines()[0]))
    profile.add_arguments(sub.add_parser("profile", help=profile.__doc__.splitlines()[0]))
    train.add_arguments(sub.add_parser("train", help=train.__doc__.splitlines()[0]))
    host.add_arguments(sub.add_parser("host", help=host.__doc__.splitlines()[0]))
    serve.add_arguments(sub.add_parser("serve", help=serve.__doc__.splitlines()[0]))
    release.add_arguments(sub.add_parser("release", help=release.__doc__.splitlines()[0]))
    args = parser.parse_args()
    expandable_segments()
    commands = {
        "layers": layers.run,
        "gemv": gemv.run,
        "ring": ring.run,
        "fp8": fp8.run,
        "convert": convert.run,
        "data": data.run,
        "inference": inference.run,
        "stream": stream.run,
        "vision": vision.run,
        "profile": profile.run,
        "train": train.run,
        "host": host.run,
        "serve": serve.run,
        "release": release.run,
    }
    commands[args.command](args)


if __name__ == "__main__":
    main()
