"""An edge in a process of its own, under a file-descriptor limit of its own (the test process
keeps its limit): ``python -m tests.integration.smtp.edge_process --loop uvloop --nofile 48``.

It prints ``PORT <n>`` once listening, logs to standard error, and stops when its standard
input closes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import sys

import uvloop

from smtpq import DictStorage, Queue
from smtpq.edge import EdgeConfig, SmtpEdge


async def serve() -> None:
    loop = asyncio.get_running_loop()
    async with (
        Queue(DictStorage()) as queue,
        SmtpEdge(queue, EdgeConfig(port=0, hostname="mx.test", reverse_lookup=False)) as edge,
    ):
        print("PORT", edge.port, flush=True)
        done = asyncio.Event()
        loop.add_reader(sys.stdin.fileno(), done.set)  # readable at EOF: the test is done
        await done.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--nofile", type=int, required=True)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, hard))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (uvloop.run if args.loop == "uvloop" else asyncio.run)(serve())


if __name__ == "__main__":
    main()
