"""Task UI: ``TaskCard`` (one task as text or HTML) and ``TaskBoard`` (a live kanban in the browser).

    import capsule_actors as cpsl

    print(cpsl.ui.TaskCard(h))                  # text, for terminals and logs
    html = cpsl.ui.TaskCard(h).html()           # HTML (Jupyter shows it by itself)
    cpsl.ui.TaskBoard(app, port=8765).run()     # or: capsule-actors board --port 8765

The web stack (Starlette, uvicorn) is imported only when a board is built, never by
``import capsule_actors``.
"""

from .board import TaskBoard
from .card import TaskCard, card_css, format_duration, progress_bar

__all__ = ["TaskBoard", "TaskCard", "card_css", "format_duration", "progress_bar"]
