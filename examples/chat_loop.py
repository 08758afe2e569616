"""A chat loop on capsule_actors: background tasks that talk back to the user's session.

Run it with ``python examples/chat_loop.py``. It starts a supervisor (state in ./.capsule), asks a
few questions for session "chat-1" and renders what the answering tasks send, as it arrives:
an immediate reply, a progress bar, the answer streamed word by word (joined on one line), and a
notification. The question history lives in the session's persistent store (``session.db``).
"""

from __future__ import annotations

import asyncio
import time

import capsule_actors as cpsl

app = cpsl.App("chat")

SESSION_ID = "chat-1"
QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Why is the sky blue?",
)
KNOWLEDGE = {
    "capital": "The capital of France is Paris.",
    "spider": "A spider has eight legs.",
    "sky": "Sunlight scatters off air molecules, and blue light scatters the most.",
}
STEPS = 4


def make_answer(question: str) -> str:
    for keyword, text in KNOWLEDGE.items():
        if keyword in question.lower():
            return text
    return "I do not know that one yet."


@app.task
async def answer(question: str, session: cpsl.Session) -> str:
    """Answers one question for the session, talking back while it works."""
    await session.reply(f"Good question! Looking into: {question}")
    # the history of every question asked in this session, kept across tasks and restarts
    history = session.db.update("history", lambda old: [*old, question], default=[])
    for step in range(1, STEPS + 1):
        await asyncio.sleep(0.05)  # pretend to think
        session.report_progress(step / STEPS, f"step {step}/{STEPS}")
    text = make_answer(question)
    async with session.stream() as stream:
        for i, word in enumerate(text.split()):
            await stream.write(word if i == 0 else " " + word)
            await asyncio.sleep(0.02)
    session.db.increment("answered")
    await session.notify(f"answered question #{len(history)} of this session", level="success")
    return text


class Renderer:
    """Prints each event as a line. The answers of several questions stream at once, so chunks
    are gathered per stream and each answer is printed on one line when its stream ends."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.streams: dict[str, list[str]] = {}

    def render(self, event: cpsl.TaskEvent) -> None:
        label = self.labels.get(event.task_id, event.task_id[-8:])
        data = event.data
        if event.kind == "reply":
            print(f"[{label}] bot: {data['text']}")
        elif event.kind == "progress":
            filled = round(data["fraction"] * 20)
            bar = "#" * filled + "." * (20 - filled)
            print(f"[{label}] [{bar}] {data['fraction']:4.0%} {data.get('message') or ''}".rstrip())
        elif event.kind == "stream":
            chunks = self.streams.setdefault(data["stream"], [])
            chunks.append(data["chunk"])
            if data["final"]:
                del self.streams[data["stream"]]
                print(f"[{label}] answer: {''.join(chunks)}  ({len(chunks) - 1} chunks)")
        elif event.kind == "notify":
            print(f"[{label}] ({data['level']}) {data['text']}")
        elif event.kind == "state" and data["state"] in ("FAILED", "CANCELLED"):
            print(f"[{label}] task {data['state'].lower()}: {data.get('error', '')}")


async def main() -> None:
    started = time.monotonic()
    async with app.start():
        store = app.session(SESSION_ID).db
        # resume where the last run stopped: old events are not shown again
        subscription = app.subscribe(SESSION_ID, after=store.get("cursor", 0))

        handles = []
        labels = {}
        for n, question in enumerate(QUESTIONS, 1):
            print(f"[q{n}] you: {question}", flush=True)
            h = await answer.asubmit(question, session=cpsl.Session(SESSION_ID))
            handles.append(h)
            labels[h.id] = f"q{n}"

        renderer = Renderer(labels)
        pending = set(labels)
        async with asyncio.timeout(30):  # a demo never hangs
            async for event in subscription:
                if event.task_id not in labels:
                    continue  # a task of an earlier run that ended after its cursor was saved
                renderer.render(event)
                if event.kind == "state" and event.data["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                    pending.discard(event.task_id)
                    if not pending:
                        break
        store["cursor"] = subscription.cursor

        history = store.get("history", [])
        print(f"history of {SESSION_ID} ({len(history)} questions, {store.get('answered', 0)} answered):")
        for i, question in enumerate(history, 1):
            print(f"  {i}. {question}")
    print(f"done in {time.monotonic() - started:.2f}s; state kept in {app.resolved_state_dir()}")


if __name__ == "__main__":
    asyncio.run(main())
