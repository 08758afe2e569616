"""A tour of capsule_actors on the embedded default: no broker, no server to set up.

Run it with ``python examples/demo.py``. It starts a supervisor (state in ./.capsule), submits a
mix of tasks and prints each one as it finishes.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import capsule_actors as cpsl

app = cpsl.App("demo")


@app.task
async def fetch_price(symbol: str) -> float:
    """A slow API call: many of these run at once on one worker actor's event loop."""
    await asyncio.sleep(random.uniform(0.1, 0.5))
    return round(random.uniform(10, 500), 2)


@app.task(lock="report:{report_id}", retries=3, backoff=cpsl.Backoff(initial=0.1, jitter=False))
def build_report(report_id: int, attempts_file: str) -> str:
    """A flaky report job: fails on its first attempt, succeeds on the retry."""
    with open(attempts_file, "a+") as fh:
        fh.write("x")
        fh.seek(0)
        attempt = len(fh.read())
    if attempt == 1:
        raise ConnectionError("upstream timed out (first attempt fails on purpose)")
    return f"report {report_id} built on attempt {attempt}"


@app.task(process=True)
def crunch(n: int) -> str:
    """CPU-bound work in a process-isolated actor."""
    total = sum(i * i for i in range(n))
    return f"sum of squares below {n} = {total} (in pid {os.getpid()})"


@app.task
async def greet(name: str) -> str:
    session = cpsl.current_session()
    who = session.id if session else "nobody"
    return f"hello {name}, working for session {who!r}"


@app.task
async def broken() -> None:
    raise ValueError("this task fails on purpose")


async def main() -> None:
    started = time.monotonic()
    async with app.start():
        attempts_file = os.path.join(app.resolved_state_dir(), "demo-attempts")
        if os.path.exists(attempts_file):
            os.remove(attempts_file)
        handles = [await fetch_price.asubmit(s) for s in ("ACME", "GLOBEX", "INITECH")]
        handles.append(await build_report.asubmit(7, attempts_file))
        handles.append(await crunch.asubmit(2_000_000))
        handles.append(await greet.asubmit("ada", session=cpsl.Session("chat-42")))
        handles.append(await broken.asubmit())

        async def outcome(h: cpsl.TaskHandle) -> tuple[cpsl.TaskHandle, str]:
            try:
                return h, f"ok     {await h!r}"
            except Exception as exc:
                return h, f"failed {type(exc).__name__}: {exc}"

        for next_done in asyncio.as_completed([outcome(h) for h in handles]):
            h, text = await next_done
            info = await asyncio.to_thread(h.info)
            print(f"{time.monotonic() - started:6.2f}s  {h.name:<12} attempts={info.attempts}  {text}")
    print(f"done in {time.monotonic() - started:.2f}s; task history is kept in {app.resolved_state_dir()}")


if __name__ == "__main__":
    asyncio.run(main())
